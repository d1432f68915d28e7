"""Run 116's experiment (copy it to benchmarks/ of the tree to time, run there): where the of3b batch-8 fast-path
call's prompt part goes (host vs prompt graph), and the prompt step captured with compiled blocks."""

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_openflamingo as B  # noqa: E402

try:
    from modeling_openflamingo import fast_decoding as FD
except ImportError:
    from modeling_openflamingo import modeling_openflamingo as FD

OUT = os.environ.get("OUT", ".")
TAG = os.environ.get("TAG", "head")
VARIANTS = os.environ.get("VARIANTS", "").split(",")
res = {"tag": TAG}


def med_wall(fn, n=15):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def med_gpu(fn, n=30, before=None):
    ts = []
    for _ in range(n):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


model = B.build("of3b")
batch = 8
ids = B.prompt(batch)
pix = torch.randn(batch, 3, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
kw = dict(
    input_ids=ids,
    attention_mask=torch.ones_like(ids),
    pixel_values=pix,
    do_sample=False,
    pad_token_id=B.PAD,
    **B.generate_kwargs("compiled"),
)
full = dict(kw, max_new_tokens=64, min_new_tokens=64)
one = dict(kw, max_new_tokens=1, min_new_tokens=1)
for _ in range(3):
    model.generate(**full)
res["call64_ms"] = med_wall(lambda: model.generate(**full))
res["tok_s"] = batch * 64 / res["call64_ms"] * 1e3
model.generate(**one)
model.generate(**one)
res["call1_ms"] = med_wall(lambda: model.generate(**one))
decoders = list(FD._STATIC_DECODERS[model].values())
steps = [p for d in decoders for p in d.prompt_steps.values()]
res["decoders"] = len(decoders)
res["prompt_steps"] = len(steps)
# the prompt step of the 64-token decoder
dec64 = [d for d in decoders if d.max_len >= 96 + 64][0]
pstep = list(dec64.prompt_steps.values())[0]
res["prompt_graph"] = pstep.graph is not None
reset = dec64._reset_positions
res["prompt_replay_gpu_ms"] = med_gpu(pstep.run, before=reset)
reset()
pstep.run()
res["decode_replay_gpu_ms"] = med_gpu(dec64.replay, n=20)  # positions 96..116 of 192
res["vision_eager_gpu_ms"] = med_gpu(lambda: model.get_image_features(pix))
print(json.dumps(res), flush=True)

if TAG == "head":
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        reset()
        pstep._step()
        reset()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pstep._step()
            torch.cuda.synchronize()
    with open(os.path.join(OUT, f"prompt_step_{TAG}_kernels.tsv"), "w") as f:
        f.write("name\tcalls\tself_device_us\n")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
            if e.self_device_time_total > 0:
                f.write(f"{e.key}\t{e.count}\t{e.self_device_time_total:.1f}\n")

    def capture_prompt():
        g = FD._capture_cuda_graph(pstep._step, reset)
        return med_gpu(g.replay, before=reset)

    for variant in VARIANTS:
        t0 = time.perf_counter()
        if variant == "vision":
            for layer in model.repeated_blocks()[: model.config.vision_config.num_hidden_layers]:
                layer.compile(dynamic=False)
        elif variant == "all":
            model.compile_repeated_blocks(dynamic=False)
        elif variant == "all-maxat":
            torch._dynamo.reset()
            model.compile_repeated_blocks(dynamic=False, mode="max-autotune-no-cudagraphs")
        else:
            continue
        with torch.no_grad():
            ms = capture_prompt()
        res[f"prompt_replay_gpu_ms_{variant}"] = ms
        res[f"compile_s_{variant}"] = time.perf_counter() - t0
        print(json.dumps(res), flush=True)

with open(os.path.join(OUT, f"exp_prompt_{TAG}.json"), "w") as f:
    json.dump(res, f, indent=1)
