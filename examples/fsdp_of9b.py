#!/usr/bin/env python
"""FSDP training run of the OpenFlamingo-9B shape (CLIP ViT-L/14 + MPT-7B, cross-attention every 4th layer) with
`Trainer` across the GPUs of one host, on random full-size weights and synthetic interleaved data (GitHub issue 7).

What it runs: FSDP2 full-shard (`Trainer`'s own FSDP path, configured as `examples/finetune.py --fsdp` does) with
auto-wrap of the classes in `model._no_split_modules` (MPT decoder layers, gated cross-attention blocks, Perceiver
layers, CLIP encoder layers), gradient checkpointing (non-reentrant), bf16 mixed precision, and the original's recipe
(`freeze_for_training()`: Perceiver, cross-attention blocks and the added tokens' embedding rows trainable). The model
is built with random weights directly on each rank's GPU in bf16 (16 GB for 9B, before sharding; no download, no fp32
copy); the data are MMC4-style samples made directly as tensors (5 images and 256 tokens per sample by default).

What it records: per-rank tokens/s (median over the steps after `--timing-warmup-steps`, the time between successive
optimizer-step ends, CUDA-synchronised), per-rank peak memory (`torch.cuda.max_memory_allocated` during training, and
separately during model build + sharding; on CPU the peak RSS), the losses, and with `--baseline-json` (the summary of
a 1-GPU run) the scaling from 1 to N GPUs. Rank 0 prints a table and writes a JSON summary (`--output-json`).

`--check-reload`: after training, the FSDP model's logits on a fixed batch (gathered as FSDP computes them), then
`Trainer.save_model` under FSDP (full state dict), then rank 0 alone loads the saved folder with
`AutoModelForImageTextToText.from_pretrained` and compares its logits on the same batch (under bf16 with FSDP2's
per-unit input casting mirrored, within bf16 tolerance; fp32 rounding otherwise).

Launch with torchrun (one process per GPU). NCCL's NVLink multicast (NVLS) is kept off: the script sets
`NCCL_NVLS_ENABLE=0` unless the variable is already set.

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node 2 examples/fsdp_of9b.py \\
        --max-steps 30 --per-device-batch-size 8 --check-reload --output-json of9b_2gpu.json
    torchrun --standalone --nproc_per_node 2 examples/fsdp_of9b.py --shape tiny --max-steps 4   # CPU smoke run (gloo)
    # (on the CPU each process builds the whole model: a shape that does not fit the host's memory is refused)
    python examples/fsdp_of9b.py --describe          # parameter counts and FSDP units of the shape (meta device)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from finetune import CPUFSDPTrainer, FlamingoTrainer, checkpointing_arguments, fsdp_training_arguments
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    MptConfig,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from modeling_openflamingo import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration
from modeling_openflamingo.checkpoint_conversion import preset_config
from modeling_openflamingo.configuration_openflamingo import VIT_L_14_CONFIG
from modeling_openflamingo.processing_openflamingo import interleaved_label_mask

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape and its default workload."""

    config: OpenFlamingoConfig
    seq_len: int
    images_per_sample: int
    per_device_batch_size: int


def shape(name: str) -> Shape:
    """The `of9b` shape (OpenFlamingo-9B: CLIP ViT-L/14 224 px + MPT-7B, N=4) or a `tiny` one for CPU smoke runs."""
    if name == "of9b":  # the released model's full-size config (embedded in the conversion presets)
        return Shape(
            preset_config("OpenFlamingo-9B-vitl-mpt7b"), seq_len=256, images_per_sample=5, per_device_batch_size=8
        )
    if name == "tiny":
        vision = CLIPVisionConfig(
            **dict(
                VIT_L_14_CONFIG,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                patch_size=8,
                image_size=32,
                projection_dim=32,
            )
        )
        text = MptConfig(d_model=64, n_heads=4, n_layers=4, max_seq_len=128, vocab_size=512)
        config = OpenFlamingoConfig(
            vision_config=vision,
            text_config=text,
            cross_attn_every_n_layers=2,
            cross_attn_heads=2,
            cross_attn_dim_head=16,
            perceiver_depth=2,
            perceiver_heads=2,
            perceiver_dim_head=16,
            perceiver_num_latents=8,
            media_token_id=510,
            eoc_token_id=509,
            pad_token_id=511,
        )
        return Shape(config, seq_len=48, images_per_sample=3, per_device_batch_size=2)
    raise ValueError(f"unknown shape {name!r} (of9b or tiny)")


class SyntheticInterleavedDataset(torch.utils.data.Dataset):
    """MMC4-style interleaved samples made directly as tensors (no tokenizer, no image decoding).

    Each sample: a little text, then per image `<image>`, a caption, `<|endofchunk|>` and some text up to the next
    image; `seq_len` tokens, all real (no padding). Labels as the original's MMC4 training made them
    (`interleaved_label_mask`: -100 for `<image>`, the text before the first image and the text between each
    `<|endofchunk|>` and the next `<image>`; position 0 never a target). Text tokens are random ids below the three
    added tokens; pixel values are drawn from a fixed pool of random images. Sample `i` is the same on every call.
    """

    def __init__(
        self, config: OpenFlamingoConfig, num_samples: int, seq_len: int, images_per_sample: int, seed: int = 0
    ) -> None:
        segment = seq_len // max(images_per_sample, 1)
        if images_per_sample < 1 or segment < 2:
            raise ValueError(f"{seq_len} tokens cannot hold {images_per_sample} images (<image> and <|endofchunk|>).")
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.images_per_sample = images_per_sample
        self.seed = seed
        self.media, self.eoc, self.pad = config.media_token_id, config.eoc_token_id, config.pad_token_id
        self.text_ids_below = min(self.media, self.eoc, self.pad)
        size = config.vision_config.image_size
        generator = torch.Generator().manual_seed(seed)
        self.image_pool = torch.randn(16, config.vision_config.num_channels, size, size, generator=generator)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        segment = self.seq_len // self.images_per_sample
        prefix = self.seq_len - segment * self.images_per_sample

        def text(length: int) -> torch.Tensor:
            return torch.randint(0, self.text_ids_below, (length,), generator=generator)

        pieces = [text(prefix)]
        for _ in range(self.images_per_sample):
            caption = int(torch.randint(segment // 4, segment - 1, (1,), generator=generator))  # 0 .. segment - 2
            pieces += [torch.tensor([self.media]), text(caption), torch.tensor([self.eoc]), text(segment - 2 - caption)]
        input_ids = torch.cat(pieces)
        labels = interleaved_label_mask(input_ids, self.media, self.eoc, self.pad)
        labels[0] = -100
        images = torch.randint(0, len(self.image_pool), (self.images_per_sample,), generator=generator)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": labels,
            "pixel_values": self.image_pool[images],
        }


class StepTimer(TrainerCallback):
    """Per-rank step times (between successive optimizer-step ends, CUDA-synchronised) and peak memory.

    At the first step's begin the model is sharded and the optimizer made: the peak memory so far (model build and
    sharding) is kept as the setup peak and the counter reset, so that the training peak is that of the steps alone.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start: float | None = None
        self.step_ends: list[float] = []
        self.setup_peak_bytes: int | None = None
        self.train_peak_bytes: int | None = None
        self.train_peak_reserved_bytes: int | None = None

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the clock (and the training memory peak) at the first step."""
        if self.start is not None:
            return
        self._synchronize()
        if self.device.type == "cuda":
            self.setup_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Record the end of an optimizer step."""
        self._synchronize()
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        """Read the training memory peak."""
        if self.device.type == "cuda":
            self.train_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.train_peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)

    def step_times(self) -> list[float]:
        """Seconds per optimizer step, in order (the first one includes the first step's one-off costs)."""
        if self.start is None:
            return []
        ends = [self.start, *self.step_ends]
        return [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]


def parameter_counts(model: OpenFlamingoForConditionalGeneration) -> dict[str, int]:
    """Parameter counts of the whole model, its parts, and what the recipe trains (tied weights counted once)."""

    def count(module: torch.nn.Module, trainable: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    counts = {
        "total": count(model),
        "trainable": count(model, trainable=True),
        "vision_model": count(model.vision_model),
        "language_model": count(model.language_model),
        "perceiver": count(model.perceiver),
        "gated_cross_attn_layers": count(model.gated_cross_attn_layers),
    }
    rows = model._modules.get("new_token_embeddings")
    if rows is not None:
        counts["new_token_embeddings"] = count(rows)
    return counts


def fsdp_units(model: torch.nn.Module) -> dict[str, int]:
    """How many FSDP units (modules `fully_shard` was applied to) of each class the wrapped model has."""
    from torch.distributed.fsdp import FSDPModule

    units = Counter(type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule))
    return dict(sorted(units.items()))


def build_model(config: OpenFlamingoConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """Random weights, made directly on `device` in `dtype` (no full fp32 copy), with the recipe's trainables.

    The gates start at 0.5 (tanh ~0.46, as in `benchmarks/`) rather than 0, so that the images count in the logits
    that `--check-reload` compares; the compute is the same either way.
    """
    torch.manual_seed(seed)  # the same weights on every rank
    with torch.device(device):
        model = OpenFlamingoForConditionalGeneration._from_config(config, dtype=dtype)
    if device.type != "meta":
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(0.5)
                block.ff_gate.fill_(0.5)
    model.freeze_for_training()
    return model


def cgroup_memory_headroom(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes that this process's memory cgroup, and each above it, still lets it take (the limit less the usage; the
    page cache, which the kernel reclaims, counted as free, as MemAvailable counts it), the least of them; None where
    no cgroup file tells.
    A container's limit (Docker's `--memory`, a Kubernetes pod's) shows in its cgroup, not in /proc/meminfo."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    headrooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "" and path:  # cgroup v2
            root, limit_file, usage_file, prefix = cgroups, "memory.max", "memory.current", ""
        elif "memory" in controllers.split(","):  # v1
            root, limit_file, usage_file = cgroups / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            prefix = "total_"  # (the figures of the cgroup and those below it)
        else:
            continue
        parts = [part for part in path.split("/") if part]
        # the process's cgroup and those above it, as far as this mount shows them (a container's mount starts at
        # its own cgroup, while /proc/self/cgroup may name the host's path)
        for depth in range(len(parts), -1, -1):
            folder = root.joinpath(*parts[:depth])
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit == "max":
                    continue
                usage = int((folder / usage_file).read_text())
                stat = (row.split() for row in (folder / "memory.stat").read_text().splitlines())
                counts = {fields[0]: int(fields[1]) for fields in stat if len(fields) == 2}
                reclaimable = sum(counts.get(f"{prefix}{lru}_file", 0) for lru in ("active", "inactive"))
            except (OSError, ValueError):
                continue
            headrooms.append(int(limit) - usage + reclaimable)
    return min(headrooms) if headrooms else None


def available_host_memory_gib(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The memory available to this process in GiB: the host's (`MemAvailable` of /proc/meminfo), or less where its
    memory cgroup allows less ([`cgroup_memory_headroom`]); None where neither is known."""
    figures = []
    try:
        fields = dict(line.split(":", 1) for line in (proc / "meminfo").read_text().splitlines() if ":" in line)
        figures.append(int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    headroom = cgroup_memory_headroom(proc, cgroups)
    if headroom is not None:
        figures.append(max(headroom, 0))
    return min(figures) / GIB if figures else None


def check_host_memory(config: OpenFlamingoConfig, dtype: torch.dtype, processes: int) -> None:
    """On the CPU, each of the host's `processes` builds the whole model before FSDP shards it: refuse at once, with
    the figures, a shape whose weights alone do not fit the host's available memory (rather than be killed later)."""
    available = available_host_memory_gib()
    if available is None:
        return
    weights = parameter_counts(build_model(config, torch.device("meta"), dtype, 0))["total"]
    needed = weights * dtype.itemsize * processes / GIB
    if needed > available:
        raise SystemExit(
            f"error: on the CPU each of the {processes} processes builds the whole model before FSDP shards it: "
            f"{weights / 1e9:.2f} B parameters in {str(dtype).removeprefix('torch.')} take {needed:.1f} GiB for the "
            f"weights alone, and this host has {available:.1f} GiB available. Run on GPUs, or `--shape tiny` for a "
            "CPU smoke run."
        )


def release_optimizer_state(trainer: Any) -> None:
    """Free the optimizer's state (after training), so that the reload check has the memory."""
    optimizer = getattr(trainer, "optimizer", None)
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
    if optimizer is not None:
        optimizer.state.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fsdp_unit_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the modules that `fully_shard` was applied to ("" for the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def cast_unit_inputs(model: torch.nn.Module, unit_names: list[str], dtype: torch.dtype) -> None:
    """Cast the floating-point inputs of these submodules to `dtype`, as FSDP2's `MixedPrecisionPolicy` does for each
    FSDP unit (`cast_forward_inputs`). With bf16 parameters this is the mixed precision of accelerate's FSDP2 (there is
    no autocast under it); it differs from a plain bf16 model in, e.g., MPT's ALiBi bias, which each decoder layer then
    gets in bf16 rather than fp32."""
    from torch.utils._pytree import tree_map

    def cast(value: Any) -> Any:
        return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value

    def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> tuple[Any, Any]:
        return tree_map(cast, args), tree_map(cast, kwargs)

    for name in unit_names:
        model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)


def check_reload(
    trainer: Any, batch: dict[str, torch.Tensor], saved: Path, bf16: bool, device: torch.device
) -> dict[str, Any] | None:
    """Logits of the FSDP model vs those of the folder it saves, loaded by rank 0 alone (None on other ranks).

    Under bf16 the reloaded model runs in bf16 with FSDP2's input casting mirrored (`cast_unit_inputs`), which is the
    computation the FSDP model does; its logits without that casting (a plain bf16 model) are reported as well.
    """
    import torch.distributed as dist

    model = trainer.model  # the FSDP2 model (`fully_shard` works in place)
    model.eval()
    inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        fsdp_logits = model(**inputs).logits.float()
    unit_names = fsdp_unit_names(model)
    release_optimizer_state(trainer)
    start = time.perf_counter()
    trainer.save_model(str(saved))  # full state dict, written by rank 0
    dist.barrier()
    save_s = time.perf_counter() - start
    result = None
    if dist.get_rank() == 0:
        start = time.perf_counter()
        dtype = torch.bfloat16 if bf16 else torch.float32
        reloaded = AutoModelForImageTextToText.from_pretrained(saved, dtype=dtype).to(device).eval()
        reload_s = time.perf_counter() - start
        with torch.no_grad():
            plain_logits = reloaded(**inputs).logits.float()
            if bf16:
                cast_unit_inputs(reloaded, unit_names, torch.bfloat16)
                logits = reloaded(**inputs).logits.float()
            else:
                logits = plain_logits
        rtol, atol = (1.6e-2, 1e-2) if bf16 else (0.0, 1e-5)  # bf16: torch.testing's bf16 rtol; fp32: rounding
        difference = (fsdp_logits - logits).abs()
        result = {
            "logits_shape": list(logits.shape),
            "same_shape": tuple(fsdp_logits.shape) == tuple(logits.shape),
            "max_abs_diff": difference.max().item(),
            "max_abs_diff_plain": (fsdp_logits - plain_logits).abs().max().item(),
            "max_abs_logit": logits.abs().max().item(),
            "argmax_agreement": (fsdp_logits.argmax(-1) == logits.argmax(-1)).float().mean().item(),
            "rtol": rtol,
            "atol": atol,
            "match": bool((difference <= atol + rtol * logits.abs()).all()),
            "dtype": str(dtype).removeprefix("torch."),
            "fsdp_input_casting_mirrored": bf16,
            "reloaded_class": type(reloaded).__name__,
            "save_s": round(save_s, 2),
            "reload_s": round(reload_s, 2),
        }
        del reloaded
        gc.collect()
    dist.barrier()
    return result


def scaling(summary: dict[str, Any], baseline_path: str) -> dict[str, Any]:
    """Throughput relative to a run on fewer GPUs (normally 1) of the same workload."""
    baseline = json.loads(Path(baseline_path).read_text())
    keys = ("shape", "seq_len", "images_per_sample", "per_device_batch_size", "precision", "gradient_checkpointing")
    per_gpu, base_per_gpu = summary["tokens_per_s_per_gpu"], baseline["tokens_per_s_per_gpu"]
    return {
        "baseline": baseline_path,
        "baseline_world_size": baseline["world_size"],
        "baseline_tokens_per_s_per_gpu": base_per_gpu,
        "comparable": all(summary.get(k) == baseline.get(k) for k in keys),
        "per_gpu_efficiency": round(per_gpu / base_per_gpu, 4),
        "speedup_total": round(summary["tokens_per_s_total"] / baseline["tokens_per_s_total"], 4),
    }


def print_table(summary: dict[str, Any]) -> None:
    """The per-rank numbers as a table (rank 0)."""
    memory = "peak GB (train / setup / reserved)" if summary["device_type"] == "cuda" else "peak RSS GB"
    print(f"\n{summary['shape']} on {summary['world_size']} x {summary['device']}, {summary['precision']}")
    print(f"{'rank':>4}  {'tokens/s':>10}  {'s/step (median)':>15}  {memory}")
    for rank in summary["ranks"]:
        if summary["device_type"] == "cuda":
            mem = f"{rank['peak_memory_gb']} / {rank['setup_peak_memory_gb']} / {rank['peak_reserved_gb']}"
        else:
            mem = f"{rank['peak_rss_gb']}"
        print(f"{rank['rank']:>4}  {rank['tokens_per_s']:>10.1f}  {rank['step_time_median_s']:>15.4f}  {mem}")
    print(
        f"tokens/s per GPU (median over ranks): {summary['tokens_per_s_per_gpu']:.1f}; "
        f"total: {summary['tokens_per_s_total']:.1f}; loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    )
    if "scaling" in summary:
        s = summary["scaling"]
        print(
            f"vs {s['baseline_world_size']} GPU(s): per-GPU efficiency {s['per_gpu_efficiency']:.3f}, "
            f"speedup {s['speedup_total']:.3f}" + ("" if s["comparable"] else " (NOT the same workload)")
        )
    if summary.get("reload") is not None:
        r = summary["reload"]
        print(
            f"reload check: match={r['match']}, max|diff| {r['max_abs_diff']:.3g} (plain {r['dtype']} model: "
            f"{r['max_abs_diff_plain']:.3g}), max|logit| {r['max_abs_logit']:.3g}"
        )


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (from nvidia-smi), or None."""
    import subprocess

    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["of9b", "tiny"], default="of9b")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--per-device-batch-size", type=int, help="default: 8 (of9b), 2 (tiny)")
    parser.add_argument("--seq-len", type=int, help="tokens per sample; default: 256 (of9b), 48 (tiny)")
    parser.add_argument("--images-per-sample", type=int, help="default: 5 (of9b), 3 (tiny)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1, help="on the cross-attention blocks only")
    parser.add_argument("--optim", help="TrainingArguments.optim (default: Trainer's)")
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="bf16: model built in bf16, trainables upcast to fp32 by accelerate, bf16 mixed precision; "
        "fp32: all fp32. auto: bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--timing-warmup-steps", type=int, default=5, help="steps left out of the median step time")
    parser.add_argument("--output-dir", default="fsdp-of9b-run", help="Trainer output; the saved model goes in saved/")
    parser.add_argument("--output-json", help="summary JSON (default: OUTPUT_DIR/summary.json)")
    parser.add_argument("--baseline-json", help="summary JSON of a run on fewer GPUs: adds the scaling")
    parser.add_argument("--check-reload", action="store_true", help="save under FSDP, reload on rank 0, same logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--describe", action="store_true", help="print the shape's parameters and units, no training")
    return parser.parse_args(argv)


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """The shape's parameter counts and FSDP wrap classes, built on the meta device (no memory, no launcher)."""
    config = shape(args.shape).config
    model = build_model(config, torch.device("meta"), torch.bfloat16, args.seed)
    wrapped = sorted(model._no_split_modules)
    units = Counter(type(m).__name__ for m in model.modules() if type(m).__name__ in wrapped)
    result = {
        "shape": args.shape,
        "parameters": parameter_counts(model),
        "auto_wrap_units": dict(sorted(units.items())),
    }
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, time, optionally check the reload; return the summary (the same on every rank, `reload` on rank 0)."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NCCL reads it when the first communicator is made, below
    args = parse_args(argv)
    if args.describe:
        return describe(args)
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("Launch with torchrun, e.g. `torchrun --standalone --nproc_per_node 2 examples/fsdp_of9b.py`.")
    import torch.distributed as dist

    selected = shape(args.shape)
    batch_size = args.per_device_batch_size or selected.per_device_batch_size
    seq_len = args.seq_len or selected.seq_len
    images_per_sample = args.images_per_sample or selected.images_per_sample
    on_cpu = not torch.cuda.is_available()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and not on_cpu)
    output_dir = Path(args.output_dir)
    if on_cpu:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes on this host
        check_host_memory(selected.config, torch.bfloat16 if bf16 else torch.float32, processes)

    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        bf16=bf16,
        use_cpu=on_cpu,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **checkpointing_arguments(args.gradient_checkpointing),
        **({"optim": args.optim} if args.optim else {}),
        **fsdp_training_arguments(on_cpu),
    )
    device = training_args.device  # starts the process group: cuda:LOCAL_RANK (NCCL), or cpu (gloo)
    rank, world_size = training_args.process_index, training_args.world_size

    start = time.perf_counter()
    model = build_model(selected.config, device, torch.bfloat16 if bf16 else torch.float32, args.seed)
    build_s = time.perf_counter() - start
    parameters = parameter_counts(model)
    num_samples = args.max_steps * batch_size * args.gradient_accumulation_steps * world_size
    dataset = SyntheticInterleavedDataset(selected.config, num_samples, seq_len, images_per_sample, args.seed)
    timer = StepTimer(device)
    trainer_class = CPUFSDPTrainer if on_cpu else FlamingoTrainer
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start

    times = timer.step_times()
    timed = times[args.timing_warmup_steps :] or times[1:] or times
    step_time = statistics.median(timed)
    tokens_per_step = batch_size * seq_len * args.gradient_accumulation_steps
    local = {
        "rank": rank,
        "tokens_per_s": round(tokens_per_step / step_time, 2),
        "step_time_median_s": round(step_time, 5),
        "step_times_s": [round(t, 5) for t in times],
        "timed_steps": len(timed),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3),
    }
    if device.type == "cuda":
        local["peak_memory_gb"] = round(timer.train_peak_bytes / GIB, 3)
        local["peak_reserved_gb"] = round(timer.train_peak_reserved_bytes / GIB, 3)
        local["setup_peak_memory_gb"] = round(timer.setup_peak_bytes / GIB, 3)
    ranks: list[Any] = [None] * world_size
    dist.all_gather_object(ranks, local)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    per_gpu = statistics.median(r["tokens_per_s"] for r in ranks)
    summary: dict[str, Any] = {
        "shape": args.shape,
        "world_size": world_size,
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": "bf16" if bf16 else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "seq_len": seq_len,
        "images_per_sample": images_per_sample,
        "per_device_batch_size": batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_steps": args.max_steps,
        "timing_warmup_steps": args.timing_warmup_steps,
        "tokens_per_step_per_gpu": tokens_per_step,
        "tokens_per_s_per_gpu": per_gpu,
        "tokens_per_s_total": round(sum(r["tokens_per_s"] for r in ranks), 2),
        "ranks": ranks,
        "losses": losses,
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": losses[-1] if losses else float("nan"),
        "loss_finite": bool(losses) and all(math.isfinite(loss) for loss in losses),
        "parameters": parameters,
        "fsdp_units": fsdp_units(trainer.model),
        "build_s": round(build_s, 2),
        "train_s": round(train_s, 2),
        "argv": sys.argv if argv is None else argv,
        "environment": {
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "accelerate": __import__("accelerate").__version__,
            "cuda": torch.version.cuda,
            "nvidia_driver": nvidia_driver() if device.type == "cuda" else None,
        },
    }
    if args.baseline_json:
        summary["scaling"] = scaling(summary, args.baseline_json)
    if args.check_reload:
        check = default_data_collator([dataset[i] for i in range(2)])
        summary["reload"] = check_reload(trainer, check, output_dir / "saved", bf16, device)
    if rank == 0:
        output_json = Path(args.output_json or output_dir / "summary.json")
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(summary, indent=2))
        print_table(summary)
        print(f"summary: {output_json}")
    dist.barrier()
    return summary


if __name__ == "__main__":
    try:
        main()
    finally:
        # An orderly end while the interpreter is whole: the FSDP model, its device meshes and their collectives' state
        # sit in reference cycles, which would otherwise be freed during the interpreter's shutdown (a rank aborted
        # there once in CI: "terminate called without an active exception"); free them, then the process group
        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
