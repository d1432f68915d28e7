#!/usr/bin/env python
"""Turn a model of ours (converted or fine-tuned) back into the original's `checkpoint.pt`.

    python conversion/convert_hf_to_openflamingo.py --model OUT --output checkpoint.pt

The file has the released format and the original's exact key names (`perceiver.layers.{j}.0.*`,
`lang_encoder.<layers>.{i}.gated_cross_attn_layer.*`, the token embeddings), so the original code reads it:
`model.load_state_dict(torch.load("checkpoint.pt"), strict=False)` on a model from
`open_flamingo.create_model_and_transforms(...)`. With `--include-lm` it also holds the LM's weights (for a
fine-tuned LM), in the names of the original's full state dict. A PEFT model must be merged first
(`merge_and_unload()`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_openflamingo.checkpoint_conversion import (  # noqa: E402
    ConversionError,
    convert_hf_to_openflamingo,
    quiet_libraries,
    raise_on_termination,
)

# the output dtypes, by the names the conversion functions take
DTYPES = ("bfloat16", "float16", "float32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="our model: a save_pretrained folder or a hub id")
    parser.add_argument("--output", required=True, help="the checkpoint.pt to write")
    parser.add_argument("--include-lm", action="store_true", help="also every LM weight (a fine-tuned LM)")
    parser.add_argument("--include-vision", action="store_true", help="also the vision tower (vision_encoder.*)")
    parser.add_argument(
        "--v1-duplicates",
        action="store_true",
        help="also the second copies of the gated blocks (lang_encoder.gated_cross_attn_layers.*), as the v1 "
        "(LLaMA) release has them",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="default: the model's stored dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--cache-dir", help="huggingface_hub cache folder (for a hub id)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    if args.no_progress:
        quiet_libraries()
    try:
        out = convert_hf_to_openflamingo(
            args.model,
            args.output,
            include_lm=args.include_lm,
            include_vision=args.include_vision,
            v1_duplicates=args.v1_duplicates,
            dtype=args.dtype,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
        )
    except (ConversionError, OSError, ValueError) as error:  # ValueError: a config that cannot be (e.g. its N)
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    raise_on_termination()  # a stopped conversion removes its temporary files
    sys.exit(main())
