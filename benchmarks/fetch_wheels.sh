#!/bin/bash
# Wheels for the GPU machine, which has no package index (Python 3.12, x86_64); run on a machine with one, from the
# repository root. `.whl-ours/`: transformers and what it needs, for our side (run_device.sh installs them into
# /tmp/ours, ahead of the machine's own packages); `.whl/`: the original (open-flamingo 2.0.1 with transformers
# 4.40.2, as README.md "Reproduce" says), unless ORIGINAL=0. Both are git-ignored, for the device's `carry`.
set -euo pipefail
TRANSFORMERS=${TRANSFORMERS:-transformers==5.25.0}
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${target[@]}" -d .whl-ours "$TRANSFORMERS"
rm -f .whl-ours/numpy-*.whl  # torch's numpy, the machine's own, stays
if [ "${ORIGINAL:-1}" = 1 ]; then
  python3 -m pip download -q --no-deps "${target[@]}" -d .whl transformers==4.40.2 tokenizers==0.19.1 \
    huggingface_hub==0.23.4 open-clip-torch==2.20.0 open-flamingo==2.0.1 einops-exts ftfy wcwidth
fi
du -sh .whl-ours .whl 2>/dev/null || true
