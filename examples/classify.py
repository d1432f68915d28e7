#!/usr/bin/env python
"""Few-shot image classification by ranking class names, as the original OpenFlamingo evaluation does it (ImageNet).

Each demonstration is `<image>Output:{class name}<|endofchunk|>`, the query `<image>Output:`; every class name is
scored by its log-likelihood after the query (`model.score_continuations`), averaged over its tokens as in the
original evaluation (`--sum` for the total). The prompt and its images run through the model once; its KV cache is
shared by all class names.

Runs offline on the tiny demo model (random weights: the ranking is arbitrary); pass `--model` for a converted
OpenFlamingo folder or hub id.
"""

from __future__ import annotations

import argparse

from demo_model import add_model_arguments, demo_images, load_model_and_processor
from PIL import Image

CLASS_NAMES = ["tabby cat", "washbasin", "school bus", "golden retriever", "pizza", "mountain bike"]
DEMONSTRATIONS = ["tabby cat", "washbasin"]


def classification_prompt(class_name: str | None = None) -> str:
    """`<image>Output:{class_name}<|endofchunk|>` for a demonstration, `<image>Output:` for the query."""
    return f"<image>Output:{class_name}<|endofchunk|>" if class_name is not None else "<image>Output:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--images", nargs="+", help="query images to classify (default: four demo images)")
    parser.add_argument("--classes", nargs="+", default=CLASS_NAMES)
    parser.add_argument("--sum", action="store_true", help="rank by total log-likelihood instead of per-token mean")
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()

    model, processor = load_model_and_processor(args)
    images = demo_images()
    queries = [Image.open(p) for p in args.images] if args.images else images[2:6]

    prompt = "".join(classification_prompt(c) for c in DEMONSTRATIONS) + classification_prompt()
    batch = processor(images=[images[:2] + [query] for query in queries], text=[prompt] * len(queries))
    # class names tokenized on their own, without special tokens, as the original evaluation does
    class_ids = processor.tokenizer(args.classes, add_special_tokens=False)["input_ids"]
    scores = model.score_continuations(
        **batch.to(args.device), continuations=class_ids, normalize_length=not args.sum
    )  # (num_queries, num_classes)
    top = scores.topk(min(args.top_k, len(args.classes)), dim=-1)
    for i, (values, indices) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        ranked = ", ".join(f"{args.classes[j]} ({v:.3f})" for v, j in zip(values, indices, strict=True))
        print(f"image {i}: {ranked}")


if __name__ == "__main__":
    main()
