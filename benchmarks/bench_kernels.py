"""Kernel micro-benchmarks behind two statements of README's Benchmarks section, timed as CUDA graphs (no launch
overhead from the host), medians of 20 replays:

- attention forward + backward at of4b's shapes (batch 8, 32 heads, 255-256 tokens, head dim 80; and 64):
  SDPA with `is_causal=True` against the same attention with an explicit causal boolean mask (what a 4-D mask
  gives), and which kernels each takes;
- batch-1 GEMMs at of3b's decoding shapes: `F.linear` (cuBLAS), `torch.mv`, and a reduction compiled by inductor.

Usage (GPU): `python3 benchmarks/bench_kernels.py` (writes `$OUT/kernels.json`, default `.`).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

DEV = "cuda"


def graph_time_us(fn: Callable[[], object], calls: int = 50, reps: int = 20) -> float:
    """Median time of one call of `fn`, in microseconds, with `calls` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls * 1000)
    return sorted(times)[len(times) // 2]


def attention_fwd_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, **sdpa_kwargs: object
) -> None:
    out = F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    torch.autograd.grad(out, (q, k, v), grad_out)


def attention(results: dict) -> None:
    for head_dim in (80, 64):
        q, k, v = (
            torch.randn(8, 32, 256, head_dim, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
        )
        grad_out = torch.randn_like(q)
        mask = torch.ones(256, 256, dtype=torch.bool, device=DEV).tril()[None, None].expand(8, 1, 256, 256)

        causal = functools.partial(attention_fwd_bwd, q, k, v, grad_out, is_causal=True)
        masked = functools.partial(attention_fwd_bwd, q, k, v, grad_out, attn_mask=mask)
        for name, fn in (("causal", causal), ("bool4d", masked)):
            results[f"attn_fwd_bwd_hd{head_dim}_{name}_us"] = graph_time_us(fn, calls=10)
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            causal()
            masked()
            torch.cuda.synchronize()
        names = ("attention", "fmha", "flash", "sdpa")
        results[f"kernels_hd{head_dim}"] = sorted(
            {e.key for e in prof.key_averages() if any(n in e.key.lower() for n in names)}
        )


def batch1_gemms(results: dict) -> None:
    # (in_features, out_features) of of3b's decoding step: cross-attention to_q / to_out, MPT out_proj / Wqkv, MLP
    shapes = {
        "to_q": (2048, 512),
        "to_out": (512, 2048),
        "out_proj": (2048, 2048),
        "wqkv": (2048, 6144),
        "up": (2048, 8192),
        "down": (8192, 2048),
    }
    reduction = torch.compile(lambda x, w: (w.float() * x.float()).sum(-1).to(torch.bfloat16))
    for name, (k, n) in shapes.items():
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k**0.5
        reduction(x, w)
        results[f"gemv_{name}"] = {
            "linear": graph_time_us(lambda x=x, w=w: F.linear(x, w)),
            "mv": graph_time_us(lambda x=x, w=w: torch.mv(w, x[0])),
            "compiled_reduction": graph_time_us(lambda x=x, w=w: reduction(x, w)),
            "mb": n * k * 2 / 1e6,
        }


def main() -> None:
    torch.manual_seed(0)
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    attention(results)
    batch1_gemms(results)
    print(json.dumps(results, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
