"""Host time of the decoding fast path's per-call state check (`_decoding_state`) on a released shape.

The fast path compares the model's state (modules, modes, forward hooks, tensor addresses, adapters) with the one its
CUDA graphs were captured under at every `generate` call. This times it, and its parts, on the module tree of of3b,
of4b or of9b built on the meta device (no memory, no GPU: only the host's time counts).

Usage: python benchmarks/bench_state_check.py [--models of3b,of4b,of9b] [--number 200] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_openflamingo import flamingo_config  # noqa: E402

from modeling_openflamingo import OpenFlamingoForConditionalGeneration  # noqa: E402
from modeling_openflamingo.fast_decoding import (  # noqa: E402
    _decoding_state,
    _module_hook_ids,
    _walked_modules,
)


def time_ms(function: object, number: int, repeat: int) -> float:
    """Median over `repeat` runs of the mean time of one call, in ms."""
    return statistics.median(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e3


def time_parts(name: str, number: int, repeat: int) -> dict:
    """The state check's time on `name`'s module tree, and its parts' (ms)."""
    with torch.device("meta"):
        model = OpenFlamingoForConditionalGeneration._from_config(flamingo_config(name), dtype=torch.bfloat16)
    _decoding_state(model)  # the walk, made once
    modules = _walked_modules(model)[1]
    parts = {
        "state_check": lambda: _decoding_state(model),
        "walked_modules": lambda: _walked_modules(model),
        "modes": lambda: tuple([module.training for module in modules]),
        "hooks": lambda: _module_hook_ids(modules),
    }
    record = {"model": name, "modules": len(modules), "python": platform.python_version(), "torch": torch.__version__}
    record.update({f"{part}_ms": round(time_ms(fn, number, repeat), 4) for part, fn in parts.items()})
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="of3b,of4b,of9b")
    parser.add_argument("--number", type=int, default=200, help="calls per timed run")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs (the median is reported)")
    args = parser.parse_args()
    for name in args.models.split(","):
        print(json.dumps(time_parts(name, args.number, args.repeat)))


if __name__ == "__main__":
    main()
