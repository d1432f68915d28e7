"""Sum a profile's kernels by kind: where a step's device time goes.

Reads the `*_kernels.tsv` that `bench_openflamingo.py --profile-train` (or `--profile`) writes next to its profile
table (one row per kernel name: calls, self device time) and prints the time of each kind, largest first.

    python3 benchmarks/kernels_by_kind.py benchmarks/results/2026-12-02-h200-run52-profile-*-kernels.tsv
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict

# (kind, pattern on the kernel's name), first match wins
KINDS: tuple[tuple[str, str], ...] = (
    ("GEMMs and the patch-embedding convolution (cuBLAS nvjet, CUTLASS)", r"nvjet|gemm|xmma|cutlass|cublas"),
    ("attention (cuDNN)", r"sdpa|flash|fmha|cudnn::fusion"),
    ("optimizer (MixedPrecisionAdamW's combo kernels: inductor names them by number only)", r"^triton_poi_fused_\d+$"),
    ("loss", r"nll_loss|log_softmax"),
    ("LayerNorms, forward and backward (with the residual sums, casts and gates fused into them)", r"layer_norm"),
    ("GELU / quick-GELU, forward and backward", r"gelu|sigmoid"),
    ("rotary embeddings", r"cat.*neg|neg.*cat|sin_kernel|cos_kernel"),
    ("other inductor kernels", r"^triton"),
)
OTHER = "other eager kernels (copies, masks, memsets)"


def kind_of(name: str) -> str:
    """The kind of a kernel, by its name (`KINDS`)."""
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return OTHER


def by_kind(path: str) -> list[tuple[str, int, float]]:
    """`(kind, kernels, microseconds)` of a `*_kernels.tsv`, largest time first."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            total = totals[kind_of(row["name"])]
            total[0] += int(row["calls"])
            total[1] += float(row["self_device_us"])
    return sorted(((kind, int(n), us) for kind, (n, us) in totals.items()), key=lambda item: -item[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tsv", nargs="+", help="*_kernels.tsv files")
    for path in parser.parse_args().tsv:
        rows = by_kind(path)
        total = sum(us for _, _, us in rows)
        print(f"{path}: {total / 1e3:.1f} ms of kernels")
        for kind, kernels, us in rows:
            print(f"{us / 1e3:8.2f} ms  {100 * us / total:5.1f}%  {kernels:5d} kernels  {kind}")


if __name__ == "__main__":
    main()
