# ruff: noqa
# A verbatim copy of ../shared/benchmarks/bench_reference.py (the script of the recorded baseline), kept here so
# that the original runs in the same GPU job as ours (benchmarks/run_device.sh).
"""Time the original OpenFlamingo (open-flamingo 2.0.1) at full size with random weights.

Runs on a CUDA machine in an environment with open-flamingo 2.0.1, transformers 4.40.x and
open-clip-torch 2.20.0. MOSAIC_GPT_CODE names a folder with the MosaicGPT remote code (for the
3B model). Prints one JSON line per measurement and writes them all to $OUT/reference_bench.json.

Usage: python bench_reference.py [of3b,of4b,of9b] [--train]
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import open_clip
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, MptConfig

from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance

VOCAB, TOK_LEN = 50432, 50280
EOC, MEDIA, PAD = 50277, 50278, 50279
DEV = os.environ.get("BENCH_DEV", "cuda")


def lm_config(name):
    if name == "of3b":
        d = tempfile.mkdtemp()
        code = os.environ["MOSAIC_GPT_CODE"]
        for fn in os.listdir(code):
            if fn.endswith(".py"):
                shutil.copy(os.path.join(code, fn), d)
        cfg = {
            "architectures": ["MosaicGPT"],
            "model_type": "mosaic_gpt",
            "auto_map": {
                "AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig",
                "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT",
            },
            "d_model": 2048,
            "n_heads": 16,
            "n_layers": 24,
            "mlp_ratio": 4,
            "max_seq_len": 2048,
            "vocab_size": VOCAB,
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_qk_ln": True,
            "attn_clip_qkv": None,
            "attn_impl": "torch",
            "attn_pdrop": 0,
            "resid_pdrop": 0,
            "emb_pdrop": 0,
            "no_bias": True,
            "low_precision_layernorm": True,
            "logit_scale": None,
            "softmax_scale": None,
            "prefix_lm": False,
            "attn_uses_sequence_id": False,
            "embedding_fraction": 1.0,
            "init_device": DEV,
            "param_init_fn": "kaiming_normal_",
            "init_std": 0.02,
            "use_cache": True,
        }
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        return AutoConfig.from_pretrained(d, trust_remote_code=True), 1, "transformer.blocks", True
    if name == "of4b":
        return (
            GPTNeoXConfig(
                hidden_size=2560,
                num_attention_heads=32,
                num_hidden_layers=32,
                intermediate_size=10240,
                rotary_pct=1.0,
                use_parallel_residual=False,
                vocab_size=VOCAB,
                bos_token_id=0,
                eos_token_id=0,
                tie_word_embeddings=False,
            ),
            2,
            "gpt_neox.layers",
            False,
        )
    if name == "of9b":
        return (
            MptConfig(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048, vocab_size=VOCAB),
            4,
            "transformer.blocks",
            False,
        )
    raise ValueError(name)


def build(name, dtype):
    cfg, every_n, layers_attr, mosaic = lm_config(name)
    with torch.device(DEV):
        clip = open_clip.create_model("ViT-L-14", pretrained=None, device=DEV)
        clip.visual.output_tokens = True
        lm = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
        if mosaic:

            class EmbeddingFnMixin:
                def get_input_embeddings(self):
                    return self.transformer.wte

                def set_input_embeddings(self, e):
                    self.transformer.wte = e

            extend_instance(lm, EmbeddingFnMixin)
        extend_instance(lm, FlamingoLMMixin)
        lm.set_decoder_layers_attr_name(layers_attr)
        lm.resize_token_embeddings(TOK_LEN)
        model = Flamingo(clip, lm, EOC, MEDIA, vis_dim=1024, cross_attn_every_n_layers=every_n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_gate"):
                p.fill_(0.5)
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model.to(DEV, dtype)


def prompt(batch, n_images=3, text_per_image=31, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row = []
        for _ in range(n_images):
            row += [MEDIA] + torch.randint(100, 50000, (text_per_image,), generator=g).tolist()
        rows.append(row)
    ids = torch.tensor(rows, device=DEV)
    return ids, torch.ones_like(ids)


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def bench_generate(model, name, batch, new_tokens=64, num_beams=1):
    ids, mask = prompt(batch)
    vision = torch.randn(batch, 3, 1, 3, 224, 224, device=DEV, dtype=next(model.parameters()).dtype)
    torch.cuda.reset_peak_memory_stats()

    def run():
        with torch.no_grad():
            out = model.generate(
                vision_x=vision,
                lang_x=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_beams=num_beams,
                pad_token_id=PAD,
                do_sample=False,
            )
        assert out.shape[1] == ids.shape[1] + new_tokens, out.shape

    med, ts = timed(run)
    rec = {
        "impl": "open_flamingo-2.0.1",
        "model": name,
        "what": "generate",
        "batch": batch,
        "num_beams": num_beams,
        "prompt_tokens": ids.shape[1],
        "images": 3,
        "new_tokens": new_tokens,
        "seconds_median": round(med, 4),
        "seconds_all": [round(t, 4) for t in ts],
        "new_tokens_per_s": round(batch * new_tokens / med, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "dtype": "bf16",
    }
    print(json.dumps(rec), flush=True)
    return rec


def bench_prefill(model, name, batch):
    ids, mask = prompt(batch)
    vision = torch.randn(batch, 3, 1, 3, 224, 224, device=DEV, dtype=next(model.parameters()).dtype)

    def run():
        with torch.no_grad():
            model(vision_x=vision, lang_x=ids, attention_mask=mask)

    med, ts = timed(run)
    rec = {
        "impl": "open_flamingo-2.0.1",
        "model": name,
        "what": "forward(prompt)",
        "batch": batch,
        "prompt_tokens": ids.shape[1],
        "images": 3,
        "seconds_median": round(med, 4),
    }
    print(json.dumps(rec), flush=True)
    return rec


def bench_train(name, batch=8, seq=256, n_images=5, steps=5):
    """fp32 weights under bf16 autocast, AdamW on the trainable parameters: the reference's amp_bf16 setup."""
    model = build(name, torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    per = seq // n_images
    ids, _ = prompt(batch, n_images=n_images, text_per_image=per - 1)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[labels == MEDIA] = -100
    vision = torch.randn(batch, n_images, 1, 3, 224, 224, device=DEV)
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(vision_x=vision, lang_x=ids, attention_mask=mask, labels=labels)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    med, ts = timed(step, reps=steps)
    rec = {
        "impl": "open_flamingo-2.0.1",
        "model": name,
        "what": "train_step",
        "batch": batch,
        "seq": ids.shape[1],
        "images_per_sample": n_images,
        "seconds_median": round(med, 4),
        "tokens_per_s": round(batch * ids.shape[1] / med, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "precision": "fp32 weights + bf16 autocast",
    }
    print(json.dumps(rec), flush=True)
    del model, opt
    torch.cuda.empty_cache()
    return rec


def main():
    names = (sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "of3b,of4b,of9b").split(",")
    recs = []
    for name in names:
        t = time.perf_counter()
        model = build(name, torch.bfloat16).eval()
        n_params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"model": name, "params": n_params, "build_s": round(time.perf_counter() - t, 1)}), flush=True)
        for b in (1, 8):
            recs.append(bench_prefill(model, name, b))
            recs.append(bench_generate(model, name, b))
        recs.append(bench_generate(model, name, 8, new_tokens=16, num_beams=3))
        del model
        torch.cuda.empty_cache()
        if "--train" in sys.argv and name != "of9b":
            recs.append(bench_train(name))
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "reference_bench.json"), "w") as f:
        json.dump(recs, f, indent=1)


if __name__ == "__main__":
    main()
