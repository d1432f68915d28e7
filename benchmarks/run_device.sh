#!/bin/bash
# One GPU job: our implementation, the bare language models and (when its wheels are in .whl/) the original
# open-flamingo 2.0.1, side by side, so that every ratio comes from one run on one machine.
#
# Usage, from the repository root on the GPU machine:
#   bash benchmarks/run_device.sh MODELS [arguments of bench_openflamingo.py]
# e.g. bash benchmarks/run_device.sh of4b --what prefill,generate,beam,train,lm
# Results: $OUT/openflamingo_bench.json, $OUT/reference_bench.json, logs, and the table of benchmarks/report.py.
set -u
models=${1:-of3b,of4b,of9b}
shift || true
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Our side's packages, when the machine's are older than wanted (e.g. a newer transformers): wheels in .whl-ours/.
# `.whl-ours/min/ours.txz` (benchmarks/fetch_wheels.sh): the same, installed and cut down to fit the device's carry.
ours=.
if [ -f .whl-ours/min/ours.txz ]; then
  mkdir -p /tmp/ours && tar xJf .whl-ours/min/ours.txz -C /tmp/ours
  ours=.:/tmp/ours
elif compgen -G ".whl-ours/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ours .whl-ours/*.whl
  ours=.:/tmp/ours
fi
PYTHONPATH=$ours python3 benchmarks/bench_openflamingo.py --models "$models" "$@" 2>&1 | tee "$OUT/openflamingo.log"
# The original cannot build of3b here: MosaicGPT's remote code is not on PyPI.
ref_models=$(echo "$models" | tr ',' '\n' | grep -v '^of3b$' | paste -sd, -)
if [ -d .whl ] && [ -n "$ref_models" ] && [ "${REFERENCE:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ref .whl/*.whl
  PYTHONPATH=/tmp/ref python3 benchmarks/bench_reference.py "$ref_models" ${REFERENCE_ARGS:---train} 2>&1 \
    | tee "$OUT/reference.log"
fi
python3 benchmarks/report.py "$OUT"/*_bench.json
