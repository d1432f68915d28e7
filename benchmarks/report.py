"""Merge the JSON records of bench_openflamingo.py and bench_reference.py into one markdown table.

Usage: python benchmarks/report.py FILE.json [FILE.json ...]

Ratios are taken against the original measured in the same files (the same GPU job). For of3b, whose original cannot
run there (MosaicGPT's remote code is not on PyPI), the ratio is against the original's recorded figures of
2026-11-24 on an H100 (`../shared/measurements/`), marked "(recorded)", and the GPU is named when ours ran on another.
Variants (training trainables and optimizer, the decoding kernels) are named in their cell where not the default.
Each file may hold several runs, each after its environment record (GPU, decoding kernels, `--tiny`); where the
files hold one measurement more than once, a cell shows the best and says "best of N". `--tiny` runs get no ratio
against the recorded full-size figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# The original on an H100 80GB HBM3, 2026-11-24 (open-flamingo 2.0.1, transformers 4.40.2, torch 2.11).
RECORDED: dict[tuple[str, str, int, int], tuple[float, float | None]] = {
    ("of3b", "forward(prompt)", 1, 1): (0.062, None),
    ("of3b", "forward(prompt)", 8, 1): (0.0643, None),
    ("of3b", "generate", 1, 1): (17.9, 4.85),
    ("of3b", "generate", 8, 1): (105.5, 5.19),
    ("of3b", "generate", 8, 3): (112.6, 6.36),
    ("of3b", "train_step", 8, 1): (8326.1, 31.45),
}


def load(paths: list[str]) -> list[dict[str, Any]]:
    """The measurements of each file, each with the GPU, decoding kernels and shapes (`tiny`) of the environment record
    before it (a file may hold several runs, each after its own environment record)."""
    records = []
    for path in paths:
        with open(path) as f:
            file_records = json.load(f)
        context: dict[str, Any] = {}
        for r in file_records:
            if r.get("what") == "environment":
                context = {k: r[k] for k in ("gpu", "decode_kernels", "tiny") if k in r}
            records.append({**context, **r})
    return [r for r in records if "error" not in r and r.get("what") not in ("environment", "build")]


def key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return r["model"], r["what"], r.get("batch", 1), r.get("num_beams", 1)


def value(r: dict[str, Any]) -> float:
    """Tokens/s (higher is better), or seconds for the prompt forward (lower is better)."""
    if r["what"] == "forward(prompt)":
        return r["seconds_median"]
    return r.get("new_tokens_per_s") or r.get("tokens_per_s")


def fmt(x: float | None, what: str) -> str:
    if x is None:
        return "-"
    if what == "forward(prompt)":
        return f"{x * 1000:.1f} ms"
    return f"{x:,.1f}"


def table(records: list[dict[str, Any]]) -> str:
    # (model, workload, batch, beams) -> column -> the column's runs (several where the files repeat a measurement:
    # the cell shows the best of them and says so)
    runs_of: dict[tuple[str, str, int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        impl = r["impl"]
        if impl.startswith("open_flamingo"):
            col = "original"
        elif "LM alone" in impl:
            col = f"lm-{r.get('mode', 'eager')}"
        else:
            col = f"ours-{r.get('mode', 'eager')}"
            # training variants: the trainables and the optimizer, where not the original benchmark's
            if r.get("trainables", "benchmark") != "benchmark":
                col += f", {r['trainables']} trainables"
            if r.get("optimizer", "adamw") != "adamw":
                col += ", MixedPrecisionAdamW" if r["optimizer"] == "mixed" else f", {r['optimizer']}"
            # decoding variants: the fast path's kernels, where not the default ones
            if r["what"] == "generate" and r.get("decode_kernels", "triton") != "triton":
                col += f", {r['decode_kernels']} decoding kernels"
        runs_of.setdefault(key(r), {}).setdefault(col, []).append(r)
    best_of = {"forward(prompt)": min}
    groups = {
        k: {c: best_of.get(k[1], max)(runs, key=value) for c, runs in columns.items()} for k, columns in runs_of.items()
    }
    lines = [
        "| model | workload | original | ours (eager) | ours (compiled) | best / original | "
        "peak GB original / ours | LM alone eager / compiled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"forward(prompt)": 0, "generate": 1, "train_step": 2}
    for k in sorted(groups, key=lambda k: (k[0], order.get(k[1], 9), k[3], k[2])):
        model, what, batch, beams = k
        g = groups[k]
        if not any(c.startswith("ours") for c in g):
            continue
        ours = {c: value(r) for c, r in g.items() if c.startswith("ours")}
        best = min if what == "forward(prompt)" else max
        best_col = best(ours, key=ours.get)
        ref = g.get("original")
        ref_value, ref_mem, recorded = (value(ref), ref.get("peak_mem_gb"), False) if ref else (None, None, False)
        if ref is None and k in RECORDED and not g[best_col].get("tiny"):  # (the recorded figures: full size)
            (ref_value, ref_mem), recorded = RECORDED[k], True
        if what == "forward(prompt)":
            ratio = ref_value / ours[best_col] if ref_value else None
        else:
            ratio = ours[best_col] / ref_value if ref_value else None
        if what == "generate":
            n = g[best_col].get("new_tokens", 64)
            workload = f"generate b{batch}" + (f" beams {beams}, {n} new" if beams > 1 else f", {n} new") + " tok/s"
        elif what == "train_step":
            workload = f"train step {batch}x{g[best_col].get('seq')}, {g[best_col].get('images_per_sample')} img, tok/s"
        else:
            workload = f"prompt forward b{batch}"
        repeats = len(runs_of[k].get("original", []))
        ref_text = fmt(ref_value, what) + (" (recorded)" if recorded else "")
        ref_text += f" (best of {repeats})" if repeats > 1 else ""
        ratio_text = f"{ratio:.1f}x" + (" (vs recorded)" if recorded else "") if ratio else "-"
        gpu = g[best_col].get("gpu", "")
        if ratio and recorded and gpu and "H100" not in gpu:  # the recorded figures are an H100's
            ratio_text += f", ours on an {gpu}"
        mem = f"{ref_mem if ref_mem is not None else '-'} / {g[best_col].get('peak_mem_gb', '-')}"
        lm = " / ".join(fmt(value(g[c]), what) if c in g else "-" for c in ("lm-eager", "lm-compiled"))
        # each column: its best run of any training variant (named where it is not the plain mode); the compiled
        # column is the best of the compiled modes (generate: "compiled"; training: "blocks", "blocks-cudagraphs", ...)
        cells = []
        for plain, in_column in (("ours-eager", True), ("ours-compiled", False)):
            runs = {c: v for c, v in ours.items() if c.startswith("ours-eager") == in_column}
            pick = best(runs, key=runs.get) if runs else None
            if pick is None:
                cells.append("-")
                continue
            notes = [] if pick == plain else [pick[5:]]
            if len(runs_of[k][pick]) > 1:
                notes.append(f"best of {len(runs_of[k][pick])}")
            cells.append(fmt(runs[pick], what) + (f" ({', '.join(notes)})" if notes else ""))
        lines.append(f"| {model} | {workload} | {ref_text} | {cells[0]} | {cells[1]} | {ratio_text} | {mem} | {lm} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "records", nargs="+", metavar="FILE.json", help="records of bench_openflamingo.py / bench_reference.py"
    )
    print(table(load(parser.parse_args(argv).records)))


if __name__ == "__main__":
    main(sys.argv[1:])
