#!/usr/bin/env python
"""Few-shot image captioning, as the original OpenFlamingo evaluation does it (COCO / Flickr30k).

Each demonstration is `<image>Output:{caption}<|endofchunk|>` followed by a newline, the query `<image>Output:`
(`open_flamingo/eval/evaluate.py`, `evaluate_captioning`); generation uses beam search
with 3 beams, at most 20 new tokens and length_penalty 0 (the evaluation's defaults), and the output is post-processed
as there: cut at the first "Output", double quotes removed. Several query images are captioned in one batch.

Runs offline on the tiny demo model (random weights: the captions are gibberish); pass `--model` for a converted
OpenFlamingo folder or hub id.
"""

from __future__ import annotations

import argparse

import torch
from demo_model import (
    add_beam_search_arguments,
    add_model_arguments,
    demo_images,
    generation_kwargs,
    load_model_and_processor,
)
from PIL import Image

DEMONSTRATIONS = ["A photo of two cats on a couch.", "A white bathroom sink under a mirror."]


def caption_prompt(caption: str | None = None) -> str:
    """`<image>Output:{caption}<|endofchunk|>` for a demonstration, `<image>Output:` for the query."""
    return f"<image>Output:{caption}<|endofchunk|>" if caption is not None else "<image>Output:"


def postprocess_captioning_generation(text: str) -> str:
    """The original evaluation's post-processing: keep what precedes the first "Output", drop double quotes."""
    return text.split("Output", 1)[0].replace('"', "")


def build_prompt(num_shots: int) -> str:
    """The demonstrations, each followed by "\n", then the query. Zero-shot, as in the original evaluation: two
    demonstrations' text, no images (so the model still sees the format)."""
    context = "".join(caption_prompt(c) + "\n" for c in DEMONSTRATIONS[: num_shots or 2])
    return (context.replace("<image>", "") if num_shots == 0 else context) + caption_prompt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--images", nargs="*", help="query images to caption (default: four demo images)")
    parser.add_argument("--shots", type=int, default=2, choices=range(len(DEMONSTRATIONS) + 1))
    add_beam_search_arguments(parser, max_new_tokens=20)
    args = parser.parse_args()

    model, processor = load_model_and_processor(args)
    images = demo_images()
    shot_images = images[: args.shots]  # demonstration images (stand-ins for the captions above)
    queries = [Image.open(p) for p in args.images] if args.images else images[2:6]

    prompt = build_prompt(args.shots)
    batch = processor(images=[shot_images + [query] for query in queries], text=[prompt] * len(queries))
    batch = batch.to(args.device)
    with torch.no_grad():
        generated = model.generate(**batch, **generation_kwargs(args))
    new_tokens = generated[:, batch["input_ids"].shape[1] :]
    for i, text in enumerate(processor.batch_decode(new_tokens, skip_special_tokens=True)):
        print(f"image {i}: {postprocess_captioning_generation(text)!r}")


if __name__ == "__main__":
    main()
