#!/usr/bin/env python
"""Offline demo: few-shot captioning with the tiny demo model (or `--model` for a converted real one)."""

from __future__ import annotations

import argparse

import torch
from demo_model import add_model_arguments, demo_images, load_model_and_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()

    model, processor = load_model_and_processor(args)
    images = demo_images()
    prompt = (
        "<image>Output:A photo of two cats.<|endofchunk|><image>Output:A bathroom sink.<|endofchunk|><image>Output:"
    )
    inputs = processor(images=[images[:3]], text=[prompt]).to(model.device)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=3)
    caption = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    print(f"model: {model.name_or_path}")
    print(f"pixel_values: {tuple(inputs['pixel_values'].shape)}, prompt tokens: {inputs['input_ids'].shape[1]}")
    print(f"caption: {caption!r}")


if __name__ == "__main__":
    main()
