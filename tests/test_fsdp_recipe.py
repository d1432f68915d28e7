"""The multi-GPU FSDP recipe of the 9B shape (`examples/fsdp_of9b.py`, GitHub issue 7): its tiny shape run with 2 CPU
processes (gloo) through torchrun, the data it makes, and the of9b shape's parameter counts (meta device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from modeling_openflamingo.processing_openflamingo import interleaved_label_mask

try:
    from .conftest import ROOT, example_module
except ImportError:  # imported outside the package
    from conftest import ROOT, example_module

pytest.importorskip("accelerate")

EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "fsdp_of9b.py"


def fsdp_on_cpu_available() -> str | None:
    """Why 2-process FSDP2 on CPU cannot run here, or None if it can."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401 - FSDP2 (torch >= 2.6)
    except ImportError:
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


def run_recipe(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the recipe with 2 CPU processes; return its JSON summary."""
    reason = fsdp_on_cpu_available()
    if reason:
        pytest.skip(reason)
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    command += ["--output-dir", str(tmp_path / "run"), "--output-json", str(summary_path), *args]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    assert "reload check: match=True" in process.stdout or "--check-reload" not in args, process.stdout[-3000:]
    return json.loads(summary_path.read_text())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_shape_on_two_cpu_processes(tmp_path, precision):
    """fp32: the reloaded model's logits are exactly the FSDP model's. bf16 (the GPU recipe's precision: model built
    in bf16, trainables upcast to fp32, FSDP2 mixed precision): exact too once FSDP2's input casting is mirrored."""
    steps = 4
    summary = run_recipe(
        tmp_path, "--shape", "tiny", "--max-steps", str(steps), "--timing-warmup-steps", "1", "--check-reload",
        "--precision", precision,
    )  # fmt: skip
    assert summary["world_size"] == 2 and summary["device_type"] == "cpu"
    assert summary["precision"] == precision and summary["gradient_checkpointing"]
    assert summary["environment"]["NCCL_NVLS_ENABLE"] == "0"
    assert summary["loss_finite"] and len(summary["losses"]) == steps
    assert [rank["rank"] for rank in summary["ranks"]] == [0, 1]
    for rank in summary["ranks"]:
        assert rank["tokens_per_s"] > 0 and len(rank["step_times_s"]) == steps and rank["timed_steps"] == steps - 1
        assert rank["peak_rss_gb"] > 0
    assert summary["tokens_per_s_per_gpu"] > 0 and summary["tokens_per_step_per_gpu"] == 2 * 48
    # FSDP units: every decoder layer, cross-attention block, Perceiver layer and CLIP encoder layer, and the root
    units = summary["fsdp_units"]
    assert units["MptBlock"] == 4 and units["OpenFlamingoGatedCrossAttentionBlock"] == 2
    assert units["OpenFlamingoPerceiverLayer"] == 2 and units["CLIPEncoderLayer"] == 2
    assert units["OpenFlamingoForConditionalGeneration"] == 1
    parameters = summary["parameters"]
    trained = parameters["perceiver"] + parameters["gated_cross_attn_layers"] + parameters["new_token_embeddings"]
    assert parameters["trainable"] == trained < parameters["total"]

    reload = summary["reload"]
    assert reload["same_shape"] and reload["logits_shape"] == [2, 48, 512]
    assert reload["match"] and reload["max_abs_diff"] <= 1e-5, reload
    assert reload["fsdp_input_casting_mirrored"] == (precision == "bf16")
    assert reload["reloaded_class"] == "OpenFlamingoForConditionalGeneration"
    saved = tmp_path / "run" / "saved"
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("OpenFlamingoForConditionalGeneration")
    assert list(saved.glob("*.safetensors"))


def test_synthetic_interleaved_samples():
    recipe = example_module("fsdp_of9b")
    config = recipe.shape("of9b").config
    dataset = recipe.SyntheticInterleavedDataset(config, num_samples=4, seq_len=256, images_per_sample=5, seed=0)
    sample = dataset[1]
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.shape == labels.shape == sample["attention_mask"].shape == (256,)
    assert sample["attention_mask"].all() and sample["pixel_values"].shape == (5, 3, 224, 224)
    media, eoc = config.media_token_id, config.eoc_token_id
    assert (ids == media).sum() == 5 and (ids == eoc).sum() == 5 and (ids == config.pad_token_id).sum() == 0
    assert ids.max() <= max(media, eoc)
    expected = interleaved_label_mask(ids, media, eoc, config.pad_token_id)
    expected[0] = -100
    assert torch.equal(labels, expected)
    assert (labels[ids == media] == -100).all() and (labels[ids == eoc] == eoc).all()
    assert 0 < (labels != -100).sum() < 256
    assert torch.equal(dataset[1]["input_ids"], ids) and not torch.equal(dataset[2]["input_ids"], ids)
    with pytest.raises(ValueError, match="cannot hold"):
        recipe.SyntheticInterleavedDataset(config, num_samples=1, seq_len=9, images_per_sample=5)


def test_of9b_shape_parameter_counts():
    """The full-size shape, built on the meta device: CLIP ViT-L/14, MPT-7B (vocab 50280), N=4."""
    result = example_module("fsdp_of9b").main(["--describe"])
    parameters = result["parameters"]
    assert parameters["vision_model"] == 303_179_776
    assert parameters["language_model"] == 6_648_664_064
    assert parameters["perceiver"] == 63_019_008 and parameters["gated_cross_attn_layers"] == 1_115_815_952
    assert parameters["new_token_embeddings"] == 3 * 4096
    assert parameters["total"] == 8_130_691_088 and parameters["trainable"] == 1_178_847_248
    units = result["auto_wrap_units"]
    assert units["MptBlock"] == 32 and units["OpenFlamingoGatedCrossAttentionBlock"] == 8
    assert units["CLIPEncoderLayer"] == 24 and units["OpenFlamingoPerceiverLayer"] == 6


def test_scaling_against_a_baseline(tmp_path):
    recipe = example_module("fsdp_of9b")
    workload = {"shape": "of9b", "seq_len": 256, "images_per_sample": 5, "per_device_batch_size": 8}
    workload.update(precision="bf16", gradient_checkpointing=True)
    baseline = {**workload, "world_size": 1, "tokens_per_s_per_gpu": 1000.0, "tokens_per_s_total": 1000.0}
    (tmp_path / "one.json").write_text(json.dumps(baseline))
    run = {**workload, "world_size": 4, "tokens_per_s_per_gpu": 900.0, "tokens_per_s_total": 3600.0}
    scaling = recipe.scaling(run, str(tmp_path / "one.json"))
    assert scaling["comparable"] and scaling["baseline_world_size"] == 1
    assert scaling["per_gpu_efficiency"] == 0.9 and scaling["speedup_total"] == 3.6
    assert not recipe.scaling({**run, "seq_len": 128}, str(tmp_path / "one.json"))["comparable"]


def test_a_shape_too_large_for_the_cpu_hosts_memory_is_refused_before_building(monkeypatch):
    """On the CPU every process builds the whole model before FSDP shards it: the of9b shape on a host without the
    memory stops at once with the figures (not an out-of-memory kill minutes later); the tiny shape goes on."""
    recipe = example_module("fsdp_of9b")
    if sys.platform == "linux":  # read from /proc/meminfo
        assert 0 < recipe.available_host_memory_gib() < 1e6
    monkeypatch.setattr(recipe, "available_host_memory_gib", lambda: 24.0)
    of9b = recipe.shape("of9b").config
    with pytest.raises(SystemExit, match=r"each of the 2 processes .* 8\.13 B parameters in float32 take 60\.6 GiB .* "
                       r"24\.0 GiB available\. Run on GPUs, or `--shape tiny`"):  # fmt: skip
        recipe.check_host_memory(of9b, torch.float32, 2)
    recipe.check_host_memory(recipe.shape("tiny").config, torch.float32, 2)
    monkeypatch.setattr(recipe, "available_host_memory_gib", lambda: None)  # not known: no check
    recipe.check_host_memory(of9b, torch.float32, 2)


def test_the_memory_available_is_that_of_the_process_cgroup_where_less(tmp_path):
    """In a container (Docker's `--memory`, a Kubernetes pod) /proc/meminfo shows the whole host's memory, while the
    process may take only what its memory cgroup allows: the check reads the least (cgroup v2 and v1, the limit
    less the usage, the page cache counted as free, that of a cgroup above the process's too)."""
    recipe = example_module("fsdp_of9b")
    proc, cgroups, gib = tmp_path / "proc", tmp_path / "cgroup", 2**30
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:  {512 * 2**20} kB\nMemAvailable:  {500 * 2**20} kB\n")

    def cgroup(folder: Path, limit: str, usage: int, stat: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        v1 = folder.is_relative_to(cgroups / "memory")
        (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit + "\n")
        (folder / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(stat)

    # no cgroup file (not Linux, or no memory controller): the host's figure
    assert recipe.available_host_memory_gib(proc, cgroups) == 500.0
    # cgroup v2, a container at its own cgroup's root: 32 GiB limit, 20 GiB used of which 4 GiB page cache
    (proc / "self" / "cgroup").write_text("0::/\n")
    stat = f"anon {16 * gib}\nfile {5 * gib}\nactive_file {gib}\ninactive_file {3 * gib}\nshmem {gib}\n"
    cgroup(cgroups, str(32 * gib), 20 * gib, stat)
    assert recipe.available_host_memory_gib(proc, cgroups) == 16.0
    # unlimited ("max"): the host's; a limit set on a cgroup above the process's counts
    cgroup(cgroups, "max", 20 * gib, "")
    (proc / "self" / "cgroup").write_text("0::/user.slice/session.scope\n")
    cgroup(cgroups / "user.slice" / "session.scope", "max", 1 * gib, "")
    assert recipe.available_host_memory_gib(proc, cgroups) == 500.0
    cgroup(cgroups / "user.slice", str(8 * gib), 2 * gib, "")
    assert recipe.available_host_memory_gib(proc, cgroups) == 6.0
    # cgroup v1, a container whose /proc/self/cgroup names the host's path (its mount starts at its own cgroup)
    (proc / "self" / "cgroup").write_text("4:memory:/docker/0123abcd\n3:cpu,cpuacct:/docker/0123abcd\n")
    stat = f"inactive_file 0\ntotal_inactive_file {gib}\ntotal_active_file {gib}\n"  # (total_: with those below)
    cgroup(cgroups / "memory", str(24 * gib), 2 * gib, stat)
    assert recipe.available_host_memory_gib(proc, cgroups) == 24.0
    # v1 without a limit: the page-rounded maximum
    cgroup(cgroups / "memory", "9223372036854771712", 1 * gib, "")
    assert recipe.available_host_memory_gib(proc, cgroups) == 500.0
