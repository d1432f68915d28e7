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


# (out_features, in_features) of the weights one of3b decoding step multiplies by one row, and the tied output layer
DECODING_WEIGHTS = {
    "to_q": (512, 2048),
    "to_out": (2048, 512),
    "out_proj": (2048, 2048),
    "wqkv": (6144, 2048),
    "up": (8192, 2048),
    "down": (2048, 8192),
    "lm_head": (50432, 2048),
}


def batch1_gemms(results: dict) -> None:
    """Batch-1 products at of3b's decoding shapes (the output layer aside), weights repeated in a graph (L2-resident):
    cuBLAS, `torch.mv` and an inductor reduction."""
    reduction = torch.compile(lambda x, w: (w.float() * x.float()).sum(-1).to(torch.bfloat16))
    for name, (n, k) in DECODING_WEIGHTS.items():
        if name == "lm_head":
            continue
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k**0.5
        reduction(x, w)
        results[f"gemv_{name}"] = {
            "linear": graph_time_us(lambda x=x, w=w: F.linear(x, w)),
            "mv": graph_time_us(lambda x=x, w=w: torch.mv(w, x[0])),
            "compiled_reduction": graph_time_us(lambda x=x, w=w: reduction(x, w)),
            "mb": n * k * 2 / 1e6,
        }


def rotating_time_us(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Median time of `fn(w)` over weights that together exceed the L2 cache (as in a decoding step, where each
    weight is read from HBM): one CUDA graph of one call per weight."""
    calls = iter([])

    def call() -> None:
        nonlocal calls
        try:
            w = next(calls)
        except StopIteration:
            calls = iter(weights)
            w = next(calls)
        fn(w)

    for _ in range(3 * len(weights)):  # warm-up: compiles, and leaves `calls` at the start of the list
        call()
    return graph_time_us(call, calls=len(weights), reps=10)


def small_batch_linear(results: dict, sweep: bool) -> None:
    """The Triton batch-1 kernel (`modeling_openflamingo.decoding_kernels`) against cuBLAS (`F.linear`) at of3b's
    decoding shapes, weights read from HBM; with `sweep`, every launch configuration of a grid."""
    from modeling_openflamingo import decoding_kernels as sbl

    grid = [
        {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": ns}
        for bn in (2, 4, 8, 16, 32)
        for bk in (128, 256, 512, 1024)
        for nw in (4, 8)
        for ns in (2, 3, 4)
        if bn * bk <= 16384
    ]
    for name, (n, k) in DECODING_WEIGHTS.items():
        copies = max(4, -(-256 * 2**20 // (n * k * 2)))
        weights = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
        reference = F.linear(x.float(), weights[0].float())
        default = sbl.kernel_config(n, k)
        entry = {
            "mb": n * k * 2 / 1e6,
            "cublas_us": rotating_time_us(lambda w, x=x: F.linear(x, w), weights),
            "kernel_us": rotating_time_us(lambda w, x=x: sbl.launch_linear(x, w, None), weights),
            "kernel_config": default,
            "kernel_max_abs_err": (sbl.launch_linear(x, weights[0], None).float() - reference).abs().max().item(),
            "cublas_max_abs_err": (F.linear(x, weights[0]).float() - reference).abs().max().item(),
        }
        if sweep:
            timed = []
            for config in grid:
                try:
                    us = rotating_time_us(lambda w, x=x, c=config: sbl.launch_linear(x, w, None, c), weights)
                except Exception as e:  # a configuration Triton cannot compile (e.g. out of resources)
                    print(f"{name} {config}: {type(e).__name__}", flush=True)
                    continue
                timed.append((us, config))
            timed.sort(key=lambda t: t[0])
            entry["sweep_best"] = [{"us": round(us, 2), **c} for us, c in timed[:8]]
        for key in ("cublas", "kernel"):
            entry[f"{key}_tb_per_s"] = round(entry["mb"] / entry[f"{key}_us"], 3)  # MB per us = TB/s
        print(name, json.dumps(entry), flush=True)
        results[f"small_batch_linear_{name}"] = entry
        del weights
        torch.cuda.empty_cache()


def single_query_attention(results: dict) -> None:
    """The Triton single-query attention kernel against `F.scaled_dot_product_attention` (cuDNN on Hopper) at the
    decoding step's shapes: of3b's MPT self-attention over a 192-position static cache (16 heads of 128, additive
    ALiBi mask) and cross-attention over 3 images' latents (8 heads of 64, boolean mask), batch 1 and 8; of9b's MPT
    (32 heads)."""
    from modeling_openflamingo import decoding_kernels

    cases = {"mpt_of3b": (16, 128, "additive"), "cross_attention": (8, 64, "bool"), "mpt_of9b": (32, 128, "additive")}
    for name, (heads, dim, kind) in cases.items():
        for batch in (1, 8):
            q = torch.randn(batch, 1, heads, dim, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(batch, heads, 192, dim, device=DEV, dtype=torch.bfloat16) for _ in range(2))
            if kind == "bool":
                mask = (torch.arange(192, device=DEV) // 64 == 2)[None, None, None].expand(batch, 1, 1, 192)
            else:
                mask = torch.randn(batch, heads, 1, 192, device=DEV, dtype=torch.bfloat16)
                mask[..., 160:] = torch.finfo(torch.bfloat16).min
            reference = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask if kind == "bool" else mask.float()
            )
            out = decoding_kernels.launch_attention(q, k, v, mask)
            results[f"single_query_attention_{name}_b{batch}"] = entry = {
                "sdpa_us": graph_time_us(
                    lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                ),
                "kernel_us": graph_time_us(lambda q=q, k=k, v=v, m=mask: decoding_kernels.launch_attention(q, k, v, m)),
                "kernel_max_abs_err": (out.float() - reference).abs().max().item(),
                "sdpa_max_abs_err": (F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float() - reference)
                .abs()
                .max()
                .item(),
            }
            print(name, batch, json.dumps(entry), flush=True)


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=("attention", "gemm", "small-batch-linear", "single-query-attention"), default=None
    )
    parser.add_argument("--gemv-sweep", action="store_true", help="time every launch configuration of a grid")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    torch.manual_seed(0)
    results: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    if args.only in (None, "attention"):
        attention(results)
    if args.only in (None, "gemm"):
        batch1_gemms(results)
    if args.only in (None, "small-batch-linear"):
        small_batch_linear(results, args.gemv_sweep)
    if args.only in (None, "single-query-attention"):
        single_query_attention(results)
    print(json.dumps(results, indent=1))
    with open(os.path.join(os.environ.get("OUT", "."), "kernels.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
