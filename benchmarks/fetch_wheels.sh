#!/bin/bash
# Wheels for the GPU machine, which has no package index (Python 3.12, x86_64); run on a machine with one, from the
# repository root. `.whl-ours/`: transformers and what it needs, for our side (run_device.sh installs them into
# /tmp/ours, ahead of the machine's own packages); `.whl-ours/min/ours.txz`: the same installed and cut to what the
# benchmarks and tests import (transformers' auto, CLIP, MPT, GPT-NeoX and LLaMA models; no hub download, hub kernel
# or command-line packages), ~7 MB, which run_device.sh takes instead when it is there: the device's `carry` takes
# 64 MiB with the repository. `.whl/`: the original (open-flamingo 2.0.1 with transformers 4.40.2, as README.md
# "Reproduce" says), unless ORIGINAL=0. All git-ignored.
set -euo pipefail
TRANSFORMERS=${TRANSFORMERS:-transformers==5.25.0}
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${target[@]}" -d .whl-ours "$TRANSFORMERS"
rm -f .whl-ours/numpy-*.whl  # torch's numpy, the machine's own, stays
# the cut-down tree: the machine's own packages serve for what is left out
installed=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$installed" "${target[@]}" \
  $(ls .whl-ours/*.whl | grep -v -E "/(hf_xet|kernels|pydantic|pydantic_core|annotated_types|typing_inspection|typer|rich|pygments|markdown_it_py|mdurl|shellingham|annotated_doc|tomlkit)-")
rm -rf "$installed/bin"
for model in "$installed"/transformers/models/*/; do
  # (bloom: peft imports BloomPreTrainedModel, for the GPU tests with adapters; opt: a test of other LMs' input forms)
  case $(basename "$model") in auto | bloom | clip | encoder_decoder | gpt_neox | llama | mpt | opt) ;; *) rm -rf "$model" ;; esac
done
mkdir -p .whl-ours/min
tar cJf .whl-ours/min/ours.txz -C "$installed" .
rm -rf "$installed"
if [ "${ORIGINAL:-1}" = 1 ]; then
  python3 -m pip download -q --no-deps "${target[@]}" -d .whl transformers==4.40.2 tokenizers==0.19.1 \
    huggingface_hub==0.23.4 open-clip-torch==2.20.0 open-flamingo==2.0.1 einops-exts ftfy wcwidth
fi
du -sh .whl-ours .whl-ours/min .whl 2>/dev/null || true
