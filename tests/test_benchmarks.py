"""The benchmark script keeps working: its `--tiny` mode (small stand-ins of the released shapes) on the CPU, eager
prompt forward, decoding and training step, and the report made from its records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT


def test_benchmark_tiny_smoke_run_and_report(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "BENCH_DEV": "cpu"}
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
