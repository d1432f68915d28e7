#!/usr/bin/env python
"""Offline demo: few-shot captioning with the tiny demo model (or `--model` for a converted real one)."""

from __future__ import annotations

import argparse

import torch
from demo_model import demo_images, resolve_model
from transformers import AutoModelForImageTextToText, AutoProcessor

import modeling_openflamingo  # noqa: F401 - registers the Auto classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="converted OpenFlamingo folder or hub id (default: the tiny demo model)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()

    path = resolve_model(args.model)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    images = demo_images()
    prompt = (
        "<image>Output:A photo of two cats.<|endofchunk|><image>Output:A bathroom sink.<|endofchunk|><image>Output:"
    )
    inputs = processor(images=[images[:3]], text=[prompt])
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=3)
    caption = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"model: {path}")
    print(f"pixel_values: {tuple(inputs['pixel_values'].shape)}, prompt tokens: {inputs['input_ids'].shape[1]}")
    print(f"caption: {caption!r}")


if __name__ == "__main__":
    main()
