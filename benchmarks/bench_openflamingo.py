"""Time openflamingo-hf at full size with random weights on a CUDA GPU (no downloads).

The three released shapes (of3b, of4b, of9b), the workloads of the original's benchmark (`bench_reference.py`):
a prompt of 3 images and 96 tokens (an `<image>` every 32 tokens), 64 forced new tokens at batch 1 and 8, beam search
(3 beams, 16 new tokens, batch 8), a forward over the prompt, and a training step of 8 x 255 tokens with 5 images per
sample. The bare language model of each shape can be timed in the same process (`--what lm`).

Decoding modes:
  eager     `generate()` as is: dynamic KV cache, no compilation.
  compiled  `generate(cache_implementation="static")`: static KV cache; plain greedy and beam search calls take the
            model's fast path (the prompt step captured as a CUDA graph, the decoding step compiled and replayed as a
            CUDA graph), others `GenerationMixin`'s loop (with transformers' compiled step where it compiles one).
  hf-compiled  the same through `GenerationMixin`'s own decoding loop (the fast path bypassed).

Training modes (--train-modes): eager; blocks (`model.compile_repeated_blocks()`, regional compilation);
blocks-cudagraphs (the same with mode "reduce-overhead": CUDA graphs); blocks-stepgraph (regional compilation, and
the whole step, forward, backward and AdamW, captured as one CUDA graph; for GPT-NeoX (of4b), whose transformers code
checks a 2-D attention mask on the host, with a 4-D causal mask); compiled (`torch.compile` of the whole model).
The batch is what `OpenFlamingoDataCollator` makes (with `image_indices`).

Prints one JSON line per measurement and writes them all to $OUT/openflamingo_bench.json (or --out).

Usage: python benchmarks/bench_openflamingo.py [--models of3b,of4b,of9b] [--what prefill,generate,beam,train,lm]
           [--modes eager,compiled] [--reps 5]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CompileConfig, GPTNeoXConfig, MptConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_openflamingo import (  # noqa: E402
    OpenFlamingoConfig,
    OpenFlamingoForConditionalGeneration,
    decoding_kernels,
    fast_decoding,
)
from modeling_openflamingo.checkpoint_conversion import preset_config  # noqa: E402
from modeling_openflamingo.configuration_openflamingo import VIT_L_14_CONFIG  # noqa: E402
from modeling_openflamingo.data_collator import attention_mask_without_host_sync  # noqa: E402
from modeling_openflamingo.fast_decoding import _STATIC_DECODERS, _capture_cuda_graph, forget_decoders  # noqa: E402
from modeling_openflamingo.modeling_openflamingo import (  # noqa: E402
    add_mpt_static_cache_support,
    image_indices_from_input_ids,
)
from modeling_openflamingo.optimization import MixedPrecisionAdamW, autocast_linear_parameters  # noqa: E402

VOCAB = 50280
EOC, MEDIA, PAD = 50277, 50278, 50279
DEV = os.environ.get("BENCH_DEV", "cuda")  # (--tiny without a GPU: "cpu")
TINY = False  # --tiny: small shapes, for a smoke test of this script on a CPU
RECORDS: list[dict[str, Any]] = []
OUT_FILE = os.path.join(os.environ.get("OUT", "."), "openflamingo_bench.json")


# The released shapes: their full-size configs come from the conversion presets (embedded; nothing is downloaded).
PRESETS = {
    "of3b": "OpenFlamingo-3B-vitl-mpt1b",
    "of4b": "OpenFlamingo-4B-vitl-rpj3b",
    "of9b": "OpenFlamingo-9B-vitl-mpt7b",
}


def flamingo_config(name: str) -> OpenFlamingoConfig:
    """The config of a released shape: of3b (MosaicGPT-1B, every layer), of4b (RedPajama-3B GPT-NeoX, every 2nd),
    of9b (MPT-7B, every 4th), all with CLIP ViT-L/14; with --tiny, small stand-ins of the same LM families."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}")
    if not TINY:
        return preset_config(PRESETS[name])
    if name == "of4b":
        lm_config: Any = GPTNeoXConfig(
            hidden_size=64,
            num_attention_heads=4,
            num_hidden_layers=4,
            intermediate_size=128,
            rotary_pct=1.0,
            use_parallel_residual=False,
            vocab_size=VOCAB,
            tie_word_embeddings=False,
        )
    else:
        qk_ln = {"qk_ln": True} if name == "of3b" else {}
        lm_config = MptConfig(d_model=64, n_heads=4, n_layers=4, max_seq_len=256, vocab_size=VOCAB, attn_config=qk_ln)
    return OpenFlamingoConfig(
        vision_config=CLIPVisionConfig(
            **dict(VIT_L_14_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        ),
        text_config=lm_config,
        cross_attn_every_n_layers=2,
        media_token_id=MEDIA,
        eoc_token_id=EOC,
        pad_token_id=PAD,
    )


def build(name: str, dtype: torch.dtype = torch.bfloat16) -> OpenFlamingoForConditionalGeneration:
    """The full-size model, initialised directly on the GPU in `dtype`, gates at 0.5 (tanh ~0.46) as the baseline."""
    config = flamingo_config(name)
    with torch.device(DEV):
        model = OpenFlamingoForConditionalGeneration._from_config(config, dtype=dtype)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model.eval()


def prompt(batch: int, n_images: int = 3, text_per_image: int = 31, seed: int = 0) -> torch.Tensor:
    """`<image>` + `text_per_image` random tokens, `n_images` times per row (the reference benchmark's prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        for _ in range(n_images):
            row += [MEDIA] + torch.randint(100, 50000, (text_per_image,), generator=g).tolist()
        rows.append(row)
    return torch.tensor(rows, device=DEV)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else 0.0


def reset_peak_memory() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def device_ms(fn: Callable[[], Any], reps: int = 20, before: Callable[[], Any] | None = None) -> float:
    """Median device time of `fn()` in ms (CUDA events around it; `before()` runs outside them)."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def record(rec: dict[str, Any]) -> None:
    rec = {"impl": "openflamingo-hf", **rec}
    RECORDS.append(rec)
    print(json.dumps(rec), flush=True)
    with open(OUT_FILE, "w") as f:  # rewritten after every measurement: a job cut short keeps what it measured
        json.dump(RECORDS, f, indent=1)


def guarded(what: str, fn: Callable[[], None]) -> None:
    """Run one measurement; on failure record the error and go on with the next."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record({"what": what, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    reset_peak_memory()


def generate_kwargs(mode: str) -> dict[str, Any]:
    if mode == "eager":
        return {}
    if mode == "compiled":
        return {"cache_implementation": "static", "compile_config": CompileConfig()}
    if mode == "hf-compiled":  # as "compiled", but always through GenerationMixin's own loop (not the greedy fast path)
        return {"cache_implementation": "static", "compile_config": CompileConfig(), "return_dict_in_generate": False}
    if mode == "static":  # static cache, no compilation
        return {"cache_implementation": "static", "disable_compile": True}
    raise ValueError(mode)


def bench_prefill(
    model: OpenFlamingoForConditionalGeneration, name: str, batch: int, reps: int, mode: str = "eager"
) -> None:
    """The forward over the prompt (images included). mode "cudagraphs": `torch.compile(backend="cudagraphs")`."""
    ids = prompt(batch)
    pixel_values = torch.randn(batch, 3, 3, 224, 224, device=DEV, dtype=torch.bfloat16)
    forward = model if mode == "eager" else torch.compile(model, backend=mode)

    def run() -> None:
        with torch.no_grad():
            forward(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values, logits_to_keep=1)

    med, ts = timed(run, reps, warmup=1 if mode == "eager" else 3)
    record(
        {
            "model": name,
            "what": "forward(prompt)",
            "mode": mode,
            "batch": batch,
            "prompt_tokens": ids.shape[1],
            "images": 3,
            "seconds_median": round(med, 4),
            "seconds_all": [round(t, 4) for t in ts],
        }
    )


def bench_generate(
    model: Any, name: str, batch: int, mode: str, reps: int, new_tokens: int = 64, num_beams: int = 1, lm: bool = False
) -> None:
    ids = prompt(batch)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        num_beams=num_beams,
        do_sample=False,
        pad_token_id=PAD,
        **generate_kwargs(mode),
    )
    if not lm:
        kwargs["pixel_values"] = torch.randn(batch, 3, 3, 224, 224, device=DEV, dtype=torch.bfloat16)
    counters = torch._dynamo.utils.counters
    counters.clear()
    outputs = []
    if not lm:
        # the decoders of earlier workloads (other batch sizes or beams) would count in this one's peak memory
        forget_decoders(model)

    def run() -> None:
        out = model.generate(**kwargs)
        assert out.shape == (batch, ids.shape[1] + new_tokens), out.shape
        outputs.append(out)

    t0 = time.perf_counter()
    run()
    run()  # the first call compiles, the second records the CUDA graphs
    warmup_s = time.perf_counter() - t0
    reset_peak_memory()
    med, ts = timed(run, reps, warmup=0)
    same = all(torch.equal(o, outputs[-1]) for o in outputs[1:])
    # the fast path's decoders (mode "compiled"; those of an earlier mode on the same model do not count)
    decoders = list(_STATIC_DECODERS.get(model, {}).values()) if mode == "compiled" and not lm else []
    prompt_steps = [step for decoder in decoders for step in decoder.prompt_steps.values()]
    split = {}
    if decoders and num_beams == 1 and new_tokens > 1:
        # The fast path's call is its prompt step and `new_tokens - 1` decoding steps. A call for fewer tokens on the
        # same decoder (its cache length is the prompt and new tokens rounded up to a multiple of 64) gives one step's
        # time.
        needed = ids.shape[1] + new_tokens
        fewer = max(1, ((needed - 1) // 64) * 64 + 1 - ids.shape[1])
        half = dict(kwargs, max_new_tokens=fewer, min_new_tokens=fewer)
        model.generate(**half)
        half_med, _ = timed(lambda: model.generate(**half), reps, warmup=0)
        if fewer < new_tokens and len(_STATIC_DECODERS.get(model, {})) == len(decoders):
            step_s = (med - half_med) / (new_tokens - fewer)
            split = {
                "decode_step_ms": round(step_s * 1e3, 3),
                "prompt_step_ms": round((med - (new_tokens - 1) * step_s) * 1e3, 2),
            }
            # the prompt step's CUDA graph alone (the rest of `prompt_step_ms` is the call's host work before it),
            # from this call's decoder (the model may keep others, of earlier batch sizes); positions reset before
            # each replay (the next call loads and resets its own)
            ours = [d for d in decoders if d.token.shape[0] == batch and d.max_len >= needed]
            steps = [p for d in ours[:1] for p in d.prompt_steps.values() if p.input_ids.shape[1] == ids.shape[1]]
            if len(ours) == 1 and len(steps) == 1 and steps[0].graph is not None:
                split["prompt_graph_ms"] = round(device_ms(steps[0].run, before=ours[0]._reset_positions), 2)
    record(
        {
            "impl": f"transformers-{transformers.__version__} LM alone" if lm else "openflamingo-hf",
            "model": name,
            "what": "generate",
            "mode": mode,
            "batch": batch,
            "num_beams": num_beams,
            "prompt_tokens": ids.shape[1],
            "images": 0 if lm else 3,
            "new_tokens": new_tokens,
            "seconds_median": round(med, 4),
            "seconds_all": [round(t, 4) for t in ts],
            "new_tokens_per_s": round(batch * new_tokens / med, 1),
            "peak_mem_gb": peak_memory_gb(),
            "warmup_s": round(warmup_s, 1),
            "graph_breaks": sum(counters["graph_break"].values()),
            "repeatable": same,
            "dtype": "bf16",
            # the fast path's prompt step ran as a CUDA graph (False: it fell back to eager; None: no fast path)
            "prompt_graph": all(p.graph is not None for p in prompt_steps) if prompt_steps else None,
            **split,
        }
    )
    return outputs[-1]


def bench_train(
    name: str,
    reps: int,
    batch: int = 8,
    seq: int = 256,
    n_images: int = 5,
    mode: str = "eager",
    profile: bool = False,
    trainables: str = "benchmark",
    optimizer: str = "adamw",
) -> None:
    """One AdamW step. `trainables`: "benchmark", as the original's benchmark: Perceiver, cross-attention blocks and the
    whole input embedding matrix (tied to the output one in MPT); "recipe", `model.freeze_for_training()`: the same
    but only the added tokens' embedding rows, which is what the original's training script trains (it zeroes the
    gradient of every other row), without the matrix's gradient and optimizer state.

    Frozen weights (vision tower, LM) stay bf16; trainable ones are fp32 master weights; compute under bf16 autocast.
    `optimizer`: "adamw", `torch.optim.AdamW(fused=True)` on the fp32 trainable weights (autocast casts those of the
    Linear layers to bf16 in every step, and their gradients back); "mixed", `MixedPrecisionAdamW`: those Linear
    weights stored in bf16 with fp32 master weights in the optimizer (the same numbers in the forward, no casts).
    """
    modes = ("eager", "compiled", "blocks", "blocks-cudagraphs", "blocks-stepgraph")
    if mode not in modes:
        raise ValueError(f"train mode {mode!r}: one of {', '.join(modes)}")
    # On a CPU (the --tiny smoke test) all fp32 without autocast: CPU autocast runs LayerNorm on mixed dtypes.
    on_gpu = DEV == "cuda"
    model = build(name, torch.bfloat16 if on_gpu else torch.float32)
    if trainables == "benchmark":
        model.requires_grad_(False)
        for module in (model.perceiver, model.gated_cross_attn_layers, model.get_input_embeddings()):
            module.requires_grad_(True)
    elif trainables == "recipe":
        model.freeze_for_training()
    else:
        raise ValueError(f"trainables {trainables!r}: benchmark or recipe")
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # fp32 master weights
        param.data = param.data.float()
    model.train()
    if optimizer == "adamw":
        # blocks-stepgraph: the whole step (forward, backward, AdamW) captured as one CUDA graph
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True, capturable=mode == "blocks-stepgraph")
    elif optimizer == "mixed":
        low_precision = autocast_linear_parameters(model) if on_gpu else []
        opt = MixedPrecisionAdamW(params, lr=1e-4, low_precision_params=low_precision)
    else:
        raise ValueError(f"optimizer {optimizer!r}: adamw or mixed")
    per = seq // n_images
    g = torch.Generator().manual_seed(0)
    rows = [
        sum(([MEDIA] + torch.randint(100, 50000, (per - 1,), generator=g).tolist() for _ in range(n_images)), [])
        for _ in range(batch)
    ]
    ids = torch.tensor(rows, device=DEV)
    labels = ids.masked_fill(ids == MEDIA, -100)
    pixel_values = torch.randn(batch, n_images, 3, 224, 224, device=DEV, dtype=torch.bfloat16)
    # what OpenFlamingoDataCollator adds: which image each token follows, made on the host (no sync in the forward)
    image_indices = image_indices_from_input_ids(ids.cpu(), MEDIA, n_images).to(DEV)
    attention_mask = torch.ones_like(ids)
    if mode == "blocks-stepgraph":  # no host sync in a captured step
        attention_mask = attention_mask_without_host_sync(attention_mask, model.config)
    forward = torch.compile(model) if mode == "compiled" else model
    if mode in ("blocks", "blocks-stepgraph"):
        model.compile_repeated_blocks()
    if mode == "blocks-cudagraphs":  # each compiled block's forward and backward replayed as CUDA graphs
        model.compile_repeated_blocks(mode="reduce-overhead")

    def train_step() -> None:
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=on_gpu):
            loss = forward(
                input_ids=ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_indices=image_indices,
                labels=labels,
            ).loss
        loss.backward()
        opt.step()

    def step() -> None:
        if mode == "blocks-cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        train_step()
        opt.zero_grad(set_to_none=True)

    if mode == "blocks-stepgraph":
        # warm-up runs compile the blocks (forward, backward) and make AdamW's state; gradients are then allocated
        # (not accumulated) inside the capture, so that every replay overwrites them
        zero_grad = functools.partial(opt.zero_grad, set_to_none=True)
        step = _capture_cuda_graph(train_step, zero_grad, warm_up_runs=3).replay

    t0 = time.perf_counter()
    step()
    step()  # compiled modes: the backward compiles at the first step, the optimizer's at the second
    sync()
    warmup_s = time.perf_counter() - t0
    reset_peak_memory()
    med, ts = timed(step, reps)
    record(
        {
            "model": name,
            "what": "train_step",
            "mode": mode,
            "batch": batch,
            "seq": ids.shape[1],
            "images_per_sample": n_images,
            "seconds_median": round(med, 4),
            "seconds_all": [round(t, 4) for t in ts],
            "tokens_per_s": round(batch * ids.shape[1] / med, 1),
            "peak_mem_gb": peak_memory_gb(),
            "warmup_s": round(warmup_s, 1),
            "trainable_params": sum(p.numel() for p in params),
            "trainables": trainables,
            "optimizer": optimizer,
            "precision": (
                "fp32"
                if not on_gpu
                else "bf16 frozen weights, fp32 trainable weights, bf16 autocast"
                if optimizer == "adamw"
                else "bf16 frozen weights, trainable Linear weights bf16 + fp32 masters, other trainables fp32, "
                "bf16 autocast"
            ),
        }
    )
    if profile:
        write_profile(step, f"profile_{name}_train_{mode}.txt")


def bench_lm_alone(name: str, modes: list[str], reps: int) -> None:
    lm_config = flamingo_config(name).text_config
    lm_config.use_cache = True
    with torch.device(DEV):
        lm = AutoModelForCausalLM.from_config(lm_config, dtype=torch.bfloat16).eval()
    add_mpt_static_cache_support(lm, lm_config)  # MPT decodes with a static cache only with this fix
    for mode in modes:
        for batch in (1, 8):
            guarded("lm generate", lambda b=batch, m=mode: bench_generate(lm, name, b, m, reps, lm=True))


def write_profile(fn: Callable[[], Any], filename: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync()
    table = prof.key_averages().table(sort_by=f"self_{DEV}_time_total", row_limit=60, max_name_column_width=70)
    cpu_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, filename), "w") as f:
        f.write(table + "\n\n" + cpu_table)
    # every kernel, not only the table's first rows: for sums by kind (GEMMs, attention, fused elementwise, ...)
    with open(os.path.join(out, filename.removesuffix(".txt") + "_kernels.tsv"), "w") as f:
        f.write("name\tcalls\tself_device_us\n")
        for event in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
            if event.self_device_time_total > 0:
                f.write(f"{event.key}\t{event.count}\t{event.self_device_time_total:.1f}\n")
    print(table, flush=True)


def profile_decode(model: Any, name: str, batch: int, mode: str) -> None:
    """A torch.profiler table of one short generate call (where the time of a decoding step goes)."""
    ids = prompt(batch)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        pad_token_id=PAD,
        **generate_kwargs(mode),
    )
    kwargs["pixel_values"] = torch.randn(batch, 3, 3, 224, 224, device=DEV, dtype=torch.bfloat16)
    model.generate(**kwargs)
    model.generate(**kwargs)
    write_profile(lambda: model.generate(**kwargs), f"profile_{name}_b{batch}_{mode}.txt")


def bench_model(name: str, args: argparse.Namespace) -> None:
    whats, modes = args.what.split(","), args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if any(w in whats for w in ("prefill", "generate", "beam")) or args.profile:
        t = time.perf_counter()
        model = build(name)
        record(
            {
                "model": name,
                "what": "build",
                "params": sum(p.numel() for p in model.parameters()),
                "build_s": round(time.perf_counter() - t, 1),
            }
        )
        if "prefill" in whats:
            for batch in batches:
                for mode in args.prefill_modes.split(","):
                    guarded("prefill", lambda b=batch, m=mode: bench_prefill(model, name, b, args.reps, m))
        for mode in modes:
            if "generate" in whats:
                for batch in batches:
                    guarded("generate", lambda b=batch, m=mode: bench_generate(model, name, b, m, args.reps))
            if "beam" in whats:
                guarded("beam", lambda m=mode: bench_generate(model, name, 8, m, args.reps, new_tokens=16, num_beams=3))
        for item in filter(None, args.profile.split(",")):
            mode, batch = item.split(":")
            guarded("profile", lambda b=int(batch), m=mode: profile_decode(model, name, b, m))
        del model
        reset_peak_memory()
        torch._dynamo.reset()
    if "train" in whats:
        for mode in args.train_modes.split(","):
            profile = args.profile_train
            guarded(
                "train",
                lambda m=mode, p=profile: bench_train(
                    name, args.reps, mode=m, profile=p, trainables=args.trainables, optimizer=args.optimizer
                ),
            )
            torch._dynamo.reset()
    if "lm" in whats:
        guarded("lm", lambda: bench_lm_alone(name, modes, args.reps))
        torch._dynamo.reset()


def main() -> None:
    global DEV, TINY, OUT_FILE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="of3b,of4b,of9b")
    parser.add_argument("--what", default="prefill,generate,beam,train,lm")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prefill-modes", default="eager", help="eager, and/or a torch.compile backend")
    parser.add_argument(
        "--train-modes",
        default="eager,blocks",
        help="eager, blocks (model.compile_repeated_blocks()), blocks-cudagraphs, blocks-stepgraph, compiled",
    )
    parser.add_argument(
        "--inductor", default="", help="torch._inductor.config settings for every compilation, e.g. NAME=1,NAME2=0"
    )
    parser.add_argument(
        "--trainables",
        default="benchmark",
        choices=["benchmark", "recipe"],
        help="train step: the original benchmark's trainables (whole embedding matrix) or freeze_for_training()'s",
    )
    parser.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "mixed"],
        help="train step: torch's fused AdamW on fp32 trainables, or MixedPrecisionAdamW (bf16 Linear weights)",
    )
    parser.add_argument(
        "--decode-kernels",
        default="triton",
        choices=["triton", "triton-no-pdl", "library"],
        help="the fast path's decoding step: with modeling_openflamingo.decoding_kernels (and, at batch 1, "
        "programmatic dependent launch for them and inductor's kernels; triton-no-pdl: without it), or cuBLAS / "
        "cuDNN only",
    )
    parser.add_argument(
        "--prompt-blocks",
        default="compiled",
        choices=["compiled", "eager"],
        help="the fast path's prompt step: captured with the model's repeated blocks compiled, or as they are "
        "(modeling_openflamingo.fast_decoding.COMPILE_PROMPT_BLOCKS)",
    )
    parser.add_argument("--profile-train", action="store_true", help="write a profile of one training step")
    parser.add_argument("--profile", default="", help="MODE:BATCH pairs to profile, e.g. compiled:1,eager:8")
    parser.add_argument("--tiny", action="store_true", help="small shapes: a smoke test of this script")
    parser.add_argument("--out", default=OUT_FILE)
    args = parser.parse_args()
    TINY, OUT_FILE = args.tiny, args.out
    if TINY and "BENCH_DEV" not in os.environ and not torch.cuda.is_available():
        DEV = "cpu"  # the smoke test on a machine without a GPU (the full sizes need one: they stay on "cuda")
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    inductor = dict(item.split("=", 1) for item in filter(None, args.inductor.split(",")))
    for key, value in inductor.items():
        setattr(torch._inductor.config, key, type(getattr(torch._inductor.config, key))(int(value)))
    decoding_kernels.ENABLED = args.decode_kernels.startswith("triton")
    decoding_kernels.PROGRAMMATIC_DEPENDENT_LAUNCH = args.decode_kernels == "triton"
    fast_decoding.COMPILE_PROMPT_BLOCKS = args.prompt_blocks == "compiled"
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else DEV
    record(
        {
            "what": "environment",
            "inductor": inductor,
            "decode_kernels": args.decode_kernels,
            "prompt_blocks": args.prompt_blocks,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": gpu,
            "tiny": TINY,  # small stand-in shapes (a smoke test): not comparable with any full-size figure
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
        }
    )

    for name in args.models.split(","):
        bench_model(name, args)


if __name__ == "__main__":
    main()
