"""Run 120 experiment: does of4b's optimizer update hide behind compute when it runs on a second stream?

The of4b training step (one CUDA graph) spends ~9 ms (H100) in `MixedPrecisionAdamW`'s update, memory-bound, after
the backward. Without gradient clipping, each parameter's update could start as soon as its gradient is final
(during the rest of the backward), or the update could run beside the next step's frozen vision tower, which does
not read the trainables. Either helps only if a memory-bound update and compute-bound work share the GPU well. This
times, each as a CUDA graph (median of 20 replays):

- opt: the update alone (of4b, `freeze_for_training()` trainables, as the benchmark's "recipe");
- vision: the frozen CLIP ViT-L/14 forward on 40 images (8 x 5, the training benchmark's), no gradients;
- gemms: a chain of GEMMs at the LM's backward shapes (2040 rows; 2560 <-> 10240, 2560 -> 7680), ~ a third of it;
- vision+opt, gemms+opt: each with the update on a second stream, joined at the end (and with the other
  work on a stream of the highest priority).

Run from the repository root: python3 benchmarks/results/2026-12-06-h100-run120-optimizer-overlap-experiment.py
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_openflamingo as bench  # noqa: E402

from modeling_openflamingo.optimization import MixedPrecisionAdamW, autocast_linear_parameters  # noqa: E402


def time_graph(graph: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture(function, warm_up: int = 2) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm_up):
            function()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return graph


def main() -> None:
    torch.manual_seed(0)
    model = bench.build("of4b", torch.bfloat16)
    model.freeze_for_training()
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    opt = MixedPrecisionAdamW(params, lr=1e-5, low_precision_params=autocast_linear_parameters(model))
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    pixels = torch.randn(40, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    vision = model.vision_model
    weights = {
        (k, n): torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02
        for k, n in ((2560, 10240), (10240, 2560), (2560, 7680), (7680, 2560), (2560, 2560))
    }
    rows = torch.randn(2040, 2560, device="cuda", dtype=torch.bfloat16)

    def run_opt() -> None:
        opt.step()

    @torch.no_grad()
    def run_vision() -> None:
        vision(pixel_values=pixels)

    @torch.no_grad()
    def run_gemms() -> None:
        x = rows
        for _ in range(10):  # one LM layer's input-gradient products: MLP down^T, up^T, dense^T, QKV^T
            h = x @ weights[2560, 10240]
            x = h @ weights[10240, 2560]
            x = (x @ weights[2560, 2560]) * 0.01
            q = x @ weights[2560, 7680]
            x = (q @ weights[7680, 2560]) * 0.01

    def together(main, main_priority: int | None = None):
        """`main` beside the update on a second stream; `main_priority`: run `main` on a third stream of that priority
        (lower numbers first), the update's stream having the default."""
        side = torch.cuda.Stream()
        first = torch.cuda.Stream(priority=main_priority) if main_priority is not None else None

        def run() -> None:
            current = torch.cuda.current_stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                run_opt()
            if first is None:
                main()
            else:
                first.wait_stream(current)
                with torch.cuda.stream(first):
                    main()
                current.wait_stream(first)
            current.wait_stream(side)

        return run

    _, high = torch.cuda.Stream.priority_range()  # (lowest, highest): e.g. (0, -5)
    results: dict[str, float] = {}
    for name, function in (
        ("opt", run_opt),
        ("vision", run_vision),
        ("gemms", run_gemms),
        ("vision+opt", together(run_vision)),
        ("gemms+opt", together(run_gemms)),
        ("vision+opt(high priority main)", together(run_vision, main_priority=high)),
        ("gemms+opt(high priority main)", together(run_gemms, main_priority=high)),
    ):
        results[name] = round(time_graph(capture(function)), 3)
        print(f"{name:28s} {results[name]:8.3f} ms", flush=True)
    for main_name in ("vision", "gemms"):
        for suffix in ("", "(high priority main)"):
            both = results[f"{main_name}+opt{suffix}"]
            hidden = results[main_name] + results["opt"] - both
            print(f"{main_name}+opt{suffix}: {hidden:.3f} ms of the update's {results['opt']:.3f} hidden", flush=True)
    results["device"] = torch.cuda.get_device_name()
    results["torch"] = torch.__version__
    results["trainable_params"] = sum(p.numel() for p in params)
    with open(os.path.join(os.environ.get("OUT", "."), "overlap.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
