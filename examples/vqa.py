#!/usr/bin/env python
"""Few-shot visual question answering, as the original OpenFlamingo evaluation does it for VQAv2 and VizWiz.

Each demonstration is `<image>Question:{question} Short answer:{answer}<|endofchunk|>` followed by a newline, the
query ends `Short answer:` (`open_flamingo/eval/evaluate.py`, `evaluate_vqa`); generation uses beam search with 3
beams, at most 5 new tokens and length_penalty 0 (the evaluation's defaults), and the answer is post-processed as
there: cut at the first "Question", "Answer" or "Short", then at the first ", ". (The evaluation post-processes
OK-VQA answers otherwise, and generates up to 10 tokens for TextVQA: `--max-new-tokens 10`.)

Runs offline on the tiny demo model (random weights: the answers are gibberish); pass `--model` for a converted
OpenFlamingo folder or hub id.
"""

from __future__ import annotations

import argparse
import re

import torch
from demo_model import (
    add_beam_search_arguments,
    add_model_arguments,
    demo_images,
    generation_kwargs,
    load_model_and_processor,
)
from PIL import Image

DEMONSTRATIONS = [("How many cats are there?", "two"), ("What room is this?", "bathroom")]


def vqa_prompt(question: str, answer: str | None = None) -> str:
    """`<image>Question:{q} Short answer:{a}<|endofchunk|>`, or, for the query, ending at `Short answer:`."""
    if answer is None:
        return f"<image>Question:{question} Short answer:"
    return f"<image>Question:{question} Short answer:{answer}<|endofchunk|>"


def postprocess_vqa_generation(text: str) -> str:
    """The original evaluation's post-processing of a generated answer."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


def build_prompt(question: str, num_shots: int) -> str:
    """The demonstrations, each followed by "\n", then the query. Zero-shot, as in the original evaluation: two
    demonstrations' text, no images."""
    context = "".join(vqa_prompt(q, a) + "\n" for q, a in DEMONSTRATIONS[: num_shots or 2])
    return (context.replace("<image>", "") if num_shots == 0 else context) + vqa_prompt(question)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", help="the query image (default: a demo image)")
    parser.add_argument(
        "--questions", nargs="+", default=["What color is the bus?", "Is there a person?", "What is on the table?"]
    )
    parser.add_argument("--shots", type=int, default=2, choices=range(len(DEMONSTRATIONS) + 1))
    add_beam_search_arguments(parser, max_new_tokens=5)
    args = parser.parse_args()

    model, processor = load_model_and_processor(args)
    images = demo_images()
    shot_images = images[: args.shots]
    query = Image.open(args.image) if args.image else images[5]

    # one row per question, all in one batch
    texts = [build_prompt(question, args.shots) for question in args.questions]
    batch = processor(images=[shot_images + [query]] * len(texts), text=texts).to(args.device)
    with torch.no_grad():
        generated = model.generate(**batch, **generation_kwargs(args))
    new_tokens = generated[:, batch["input_ids"].shape[1] :]
    answers = processor.batch_decode(new_tokens, skip_special_tokens=True)
    for question, text in zip(args.questions, answers, strict=True):
        print(f"{question} -> {postprocess_vqa_generation(text)!r}")


if __name__ == "__main__":
    main()
