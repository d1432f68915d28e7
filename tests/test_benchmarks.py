"""The benchmark script keeps working: its `--tiny` mode (small stand-ins of the released shapes) on the CPU, eager
prompt forward, decoding and training step, and the report made from its records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from .conftest import ROOT


def test_benchmark_tiny_smoke_run_and_report(tmp_path):
    out = tmp_path / "bench.json"
    # as a user runs it: without BENCH_DEV, --tiny takes the CPU where there is no GPU
    env = {k: v for k, v in os.environ.items() if k != "BENCH_DEV"}
    if torch.cuda.is_available():
        env["BENCH_DEV"] = "cpu"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_openflamingo.py"), "--tiny", "--models", "of3b"]
    command += ["--what", "prefill,generate,train", "--modes", "eager", "--train-modes", "eager"]
    command += ["--batches", "1", "--reps", "1", "--out", str(out)]
    subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=600)
    records = json.loads(out.read_text())
    assert not [r for r in records if "error" in r]
    measured = {(r["what"], r.get("mode")) for r in records}
    assert {("forward(prompt)", "eager"), ("generate", "eager"), ("train_step", "eager")} <= measured
    train = next(r for r in records if r["what"] == "train_step")
    assert train["tokens_per_s"] > 0 and train["seq"] == 255 and train["precision"] == "fp32"
    report = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True, capture_output=True, text=True
    ).stdout
    assert "| of3b | train step 8x255, 5 img, tok/s |" in report
    # the training step with the library's trainables (`freeze_for_training`): the added tokens' rows, not the matrix
    command[command.index("prefill,generate,train")] = "train"
    command += ["--trainables", "recipe", "--optimizer", "mixed"]  # and with MixedPrecisionAdamW
    subprocess.run(command, check=True, env=env, cwd=tmp_path, capture_output=True)
    recipe = next(r for r in json.loads(out.read_text()) if r["what"] == "train_step")
    assert recipe["trainables"] == "recipe" and train["trainables"] == "benchmark"
    assert (recipe["optimizer"], train["optimizer"]) == ("mixed", "adamw")
    report = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(out)], check=True, capture_output=True, text=True
    ).stdout
    # an eager run of another variant stays in the eager column, named, and is not taken for a compiled one
    row = next(line for line in report.splitlines() if "train step" in line).split(" | ")
    assert row[3].endswith("(eager, recipe trainables, MixedPrecisionAdamW)") and row[4] == "-"
    assert 0 < train["trainable_params"] - recipe["trainable_params"] < 50280 * 64  # the matrix minus 3 rows


def test_report_names_the_decoding_kernels_and_the_gpu_of_a_ratio_against_the_recorded_h100(tmp_path):
    """Each file's environment (GPU, decoding kernels) reaches its measurements: a variant other than the default
    kernels is named in its cell, and a ratio against the original's recorded H100 figures names another GPU."""

    def job(name: str, decode_kernels: str, gpu: str, tok_per_s: float) -> str:
        environment = {"impl": "openflamingo-hf", "what": "environment", "gpu": gpu, "decode_kernels": decode_kernels}
        measurement = {"impl": "openflamingo-hf", "model": "of3b", "what": "generate", "mode": "compiled", "batch": 1}
        measurement.update(num_beams=1, new_tokens=64, new_tokens_per_s=tok_per_s, peak_mem_gb=4.9)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([environment, measurement]))
        return str(path)

    def row(*paths: str) -> list[str]:
        command = [sys.executable, str(ROOT / "benchmarks" / "report.py"), *paths]
        report = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return next(line for line in report.splitlines() if "generate b1" in line).split(" | ")

    h200 = row(job("a", "triton", "NVIDIA H200", 358.0), job("b", "library", "NVIDIA H200", 179.0))
    assert h200[4] == "358.0" and h200[5] == "20.0x (vs recorded), ours on an NVIDIA H200"
    library_best = row(job("c", "triton", "NVIDIA H100 80GB HBM3", 179.0), job("d", "library", "NVIDIA H100", 358.0))
    assert library_best[4] == "358.0 (compiled, library decoding kernels)" and library_best[5] == "20.0x (vs recorded)"


def test_report_reads_each_runs_environment_and_says_when_a_cell_is_the_best_of_several(tmp_path):
    """A file of several runs (each after its own environment record): each measurement gets its own run's kernels
    and shapes, a repeated measurement shows its best with "best of N" (not the last one silently), and a `--tiny` run
    gets no ratio against the recorded full-size figures."""

    def environment(decode_kernels: str, tiny: bool = False) -> dict:
        return {"impl": "openflamingo-hf", "what": "environment", "gpu": "NVIDIA H100",
                "decode_kernels": decode_kernels, "tiny": tiny}  # fmt: skip

    def generate(batch: int, tok_per_s: float) -> dict:
        return {"impl": "openflamingo-hf", "model": "of3b", "what": "generate", "mode": "compiled", "batch": batch,
                "num_beams": 1, "new_tokens": 64, "new_tokens_per_s": tok_per_s, "peak_mem_gb": 5.0}  # fmt: skip

    def rows(records: list[dict]) -> dict[str, list[str]]:
        path = tmp_path / "runs.json"
        path.write_text(json.dumps(records))
        command = [sys.executable, str(ROOT / "benchmarks" / "report.py"), str(path)]
        report = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        return {line.split(" | ")[1]: line.split(" | ") for line in report.splitlines() if "generate" in line}

    got = rows([environment("triton"), generate(8, 2100.0), environment("library"), generate(8, 1900.0)])
    assert got["generate b8, 64 new tok/s"][4] == "2,100.0"  # the triton run's (before: the library run's, unnamed)
    got = rows([environment("library"), generate(8, 2100.0), environment("triton"), generate(8, 1900.0)])
    assert got["generate b8, 64 new tok/s"][4] == "2,100.0 (compiled, library decoding kernels)"
    got = rows([environment("triton"), generate(1, 350.0), generate(1, 360.0), generate(1, 340.0)])
    assert got["generate b1, 64 new tok/s"][4] == "360.0 (best of 3)"
    assert got["generate b1, 64 new tok/s"][5] == "20.1x (vs recorded)"
    got = rows([environment("triton", tiny=True), generate(1, 9000.0)])
    assert got["generate b1, 64 new tok/s"][2] == "-" and got["generate b1, 64 new tok/s"][5] == "-"


def test_kernels_by_kind_sums_a_profiles_kernels(tmp_path):
    """`benchmarks/kernels_by_kind.py`: the kernels of a `*_kernels.tsv` (written next to a profile) summed by kind."""
    tsv = tmp_path / "profile_kernels.tsv"
    tsv.write_text(
        "name\tcalls\tself_device_us\n"
        "nvjet_sm90_tst_256x160_64x4_2x1_v_bz_coopA_NNT\t177\t18499.0\n"
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16\t32\t3869.0\n"
        "triton_poi_fused_14\t2\t768.0\n"
        "triton_red_fused__to_copy_add_native_layer_norm_view_3\t32\t702.5\n"
        "triton_poi_fused_gelu_gelu_backward_view_0\t32\t1475.0\n"
        "triton_poi_fused_add_view_3\t24\t670.0\n"
        "memset32\t2\t10.5\n"
    )
    command = [sys.executable, str(ROOT / "benchmarks" / "kernels_by_kind.py"), str(tsv)]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[0].endswith("26.0 ms of kernels")
    assert "18.50 ms" in lines[1] and "177 kernels  GEMMs" in lines[1]  # largest first
    by_kind = {line.split("kernels  ")[1]: line.split(" ms")[0].strip() for line in lines[1:]}
    assert len(by_kind) == 7
    assert by_kind["attention (cuDNN)"] == "3.87"
    assert next(ms for kind, ms in by_kind.items() if kind.startswith("optimizer")) == "0.77"
    assert next(ms for kind, ms in by_kind.items() if kind.startswith("LayerNorms")) == "0.70"
    assert next(ms for kind, ms in by_kind.items() if kind.startswith("GELU")) == "1.48"
    assert by_kind["other inductor kernels"] == "0.67"
    assert next(ms for kind, ms in by_kind.items() if kind.startswith("other eager")) == "0.01"
