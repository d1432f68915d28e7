#!/usr/bin/env python
"""Convert an original OpenFlamingo checkpoint into a transformers `save_pretrained` folder.

    python conversion/convert_openflamingo_checkpoint.py --checkpoint checkpoint.pt --lm LM_DIR --tokenizer TOK_DIR \
        --open-clip-config open_clip_config.json --open-clip-weights open_clip.pt \
        --cross-attn-every-n-layers 1 --output-dir OUT

The result loads with `AutoModelForImageTextToText.from_pretrained(OUT)` and `AutoProcessor.from_pretrained(OUT)`
(after `import modeling_openflamingo`, or with `trust_remote_code=True`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_openflamingo.checkpoint_conversion import ConversionError, convert_openflamingo_checkpoint  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the released checkpoint.pt (or a training checkpoint)")
    parser.add_argument("--lm", required=True, help="folder of the language model (config.json + weights)")
    parser.add_argument("--tokenizer", required=True, help="folder of the LM's tokenizer")
    parser.add_argument(
        "--open-clip-config", required=True, help="open_clip model config JSON (vision_cfg, quick_gelu)"
    )
    parser.add_argument("--open-clip-weights", required=True, help="open_clip state dict with the visual.* weights")
    parser.add_argument("--cross-attn-every-n-layers", type=int, required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = convert_openflamingo_checkpoint(
            checkpoint=args.checkpoint,
            lm=args.lm,
            tokenizer=args.tokenizer,
            open_clip_config=args.open_clip_config,
            open_clip_weights=args.open_clip_weights,
            cross_attn_every_n_layers=args.cross_attn_every_n_layers,
            output_dir=args.output_dir,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
