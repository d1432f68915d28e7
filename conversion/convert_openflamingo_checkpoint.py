#!/usr/bin/env python
"""Convert an original OpenFlamingo model into a transformers `save_pretrained` folder (and publish it).

One of the six released models, everything downloaded from the Hugging Face Hub:

    python conversion/convert_openflamingo_checkpoint.py --preset OpenFlamingo-3B-vitl-mpt1b --output-dir OUT
    python conversion/convert_openflamingo_checkpoint.py --preset OpenFlamingo-9B-deprecated --lm LLAMA_7B_HF \\
        --output-dir OUT                                     # v1: LLaMA-7B is yours to supply

Every part can be overridden, with a local path or a hub id (org/name[/file][@revision]):

    python conversion/convert_openflamingo_checkpoint.py --checkpoint checkpoint.pt --lm LM_DIR --tokenizer TOK_DIR \\
        --vision openai/clip-vit-large-patch14 --cross-attn-every-n-layers 1 --output-dir OUT

Check a preset without downloading anything (the full-size model on the meta device):

    python conversion/convert_openflamingo_checkpoint.py --preset OpenFlamingo-9B-vitl-mpt7b --dry-run

The result loads with `AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True)` (or after
`import modeling_openflamingo`) and `AutoProcessor.from_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_openflamingo.checkpoint_conversion import (  # noqa: E402
    ConversionError,
    convert_openflamingo_checkpoint,
    dry_run,
    quiet_libraries,
    raise_on_termination,
)
from modeling_openflamingo.conversion_hub import push_folder_to_hub, push_problem  # noqa: E402
from modeling_openflamingo.conversion_presets import (  # noqa: E402
    DEFAULT_VISION,
    PRESETS,
    TRANSFORMERS_VISION,
    get_preset,
)

# the output dtypes, by the names the conversion functions take
DTYPES = ("bfloat16", "float16", "float32")


def shard_size(value: str) -> str | int:
    """`--max-shard-size`, checked before anything is read: bytes, or a size such as 5GB / 500MB / 2GiB."""
    from transformers.utils.hub import convert_file_size_to_int

    if value.isdigit():
        return int(value)
    try:
        convert_file_size_to_int(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        help=f"one of the released models, which fills in every part: {', '.join(PRESETS)} (--list-presets)",
    )
    parser.add_argument("--list-presets", action="store_true", help="print the presets and their parts, then exit")
    parts = parser.add_argument_group("parts (each a local path or a hub id; override the preset's)")
    parts.add_argument("--checkpoint", help="checkpoint.pt, a training checkpoint, or a hub repo holding checkpoint.pt")
    parts.add_argument("--lm", help="language model: HF folder or hub id (config.json + weights)")
    parts.add_argument("--tokenizer", help="the LM's tokenizer (default: the preset's, else --lm)")
    parts.add_argument(
        "--vision",
        help=f"vision tower: an open_clip folder/repo (default {DEFAULT_VISION}) or a transformers CLIP "
        f"folder/repo (e.g. {TRANSFORMERS_VISION}); its vision weights are used",
    )
    parts.add_argument("--open-clip-config", help="open_clip model config JSON (with --open-clip-weights)")
    parts.add_argument("--open-clip-weights", help="open_clip state dict (visual.* keys, or the visual tower alone)")
    parts.add_argument(
        "--cross-attn-every-n-layers",
        type=int,
        help="N: a gated block before every N-th layer (default: the preset's, else the checkpoint's blocks' places)",
    )
    parts.add_argument(
        "--quick-gelu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "the vision tower's activation (default: QuickGELU for presets and for sources whose name contains "
            "'openai', else the open_clip config's quick_gelu; required when that config has none)"
        ),
    )
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", help="the folder to write (written elsewhere first, moved into place at the end)")
    out.add_argument("--dtype", choices=DTYPES, help="default: the checkpoint's dtype")
    out.add_argument("--max-shard-size", default="5GB", type=shard_size, help="largest safetensors shard (default 5GB)")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier conversion in --output-dir (a folder that is not one is refused)",
    )
    out.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the converted folder to this hub repo")
    out.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    out.add_argument("--cache-dir", help="huggingface_hub cache folder for the downloads")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    check = parser.add_argument_group("checking")
    check.add_argument(
        "--dry-run",
        action="store_true",
        help="build the full-size model on the meta device and check every key and shape; downloads no weights",
    )
    check.add_argument("--manifest", help="with --dry-run: write the checkpoint's expected keys and shapes (JSON)")
    args = parser.parse_args(argv)
    if args.preset is not None:
        try:
            get_preset(args.preset)
        except ConversionError as error:
            parser.error(str(error))
    if args.cross_attn_every_n_layers is not None and args.cross_attn_every_n_layers < 1:
        parser.error(f"--cross-attn-every-n-layers must be >= 1; got {args.cross_attn_every_n_layers}")
    if not args.list_presets and not args.dry_run and not args.output_dir:
        parser.error("--output-dir is required (unless --dry-run or --list-presets)")
    if args.private and not args.push_to_hub:
        parser.error("--private goes with --push-to-hub")
    if args.manifest and not args.dry_run:
        parser.error("--manifest goes with --dry-run")
    if args.dry_run and args.push_to_hub:
        parser.error("--dry-run writes no folder, so there is nothing for --push-to-hub to upload")
    if args.push_to_hub and not args.list_presets and (problem := push_problem(args.push_to_hub)):
        parser.error(f"--push-to-hub {args.push_to_hub}: {problem}")  # before hours of conversion, not after
    if args.dry_run and (args.vision or args.quick_gelu is not None or args.open_clip_weights):
        # the dry run reads no weights: its vision tower is the released ViT-L/14, or --open-clip-config's
        parser.error(
            "--dry-run checks the vision tower of --open-clip-config (default: the released CLIP ViT-L/14); "
            "--vision, --open-clip-weights and --quick-gelu are not read by it"
        )
    return args


def list_presets() -> str:
    """The presets as a table."""
    lines = []
    for preset in PRESETS.values():
        lines.append(
            f"{preset.name}: {preset.title}\n    checkpoint: {preset.checkpoint}/checkpoint.pt\n"
            f"    lm: {preset.lm or '(yours: --lm)'}  [{preset.lm_family}"
            f"{', instruction-tuned' if preset.instruction_tuned else ''}]\n"
            f"    tokenizer: {preset.tokenizer or '(the LM folder)'}\n"
            f"    vision: {DEFAULT_VISION} (or {TRANSFORMERS_VISION})\n"
            f"    cross_attn_every_n_layers: {preset.cross_attn_every_n_layers}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    if args.list_presets:
        print(list_presets())
        return 0
    if args.no_progress:
        quiet_libraries()
    try:
        if args.dry_run:
            report = dry_run(
                preset=args.preset,
                checkpoint=args.checkpoint,
                lm=args.lm,
                tokenizer=args.tokenizer,
                vision_config=args.open_clip_config,
                cross_attn_every_n_layers=args.cross_attn_every_n_layers,
                cache_dir=args.cache_dir,
            )
            print(report.summary())
            if args.manifest:
                Path(args.manifest).write_text(
                    json.dumps({k: list(v) for k, v in report.checkpoint_manifest.items()}, indent=1) + "\n"
                )
                print(f"Wrote {args.manifest}")
            return 0
        out = convert_openflamingo_checkpoint(
            checkpoint=args.checkpoint,
            lm=args.lm,
            tokenizer=args.tokenizer,
            open_clip_config=args.open_clip_config,
            open_clip_weights=args.open_clip_weights,
            cross_attn_every_n_layers=args.cross_attn_every_n_layers,
            output_dir=args.output_dir,
            dtype=args.dtype,
            overwrite=args.overwrite,
            preset=args.preset,
            vision=args.vision,
            quick_gelu=args.quick_gelu,
            max_shard_size=args.max_shard_size,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            repo_id=args.push_to_hub,
        )
        print(f"Wrote {out}")
        if args.push_to_hub:
            url = push_folder_to_hub(out, args.push_to_hub, private=True if args.private else None)
            print(f"Pushed to https://huggingface.co/{args.push_to_hub} ({url})")
    except (ConversionError, OSError, ValueError) as error:  # ValueError: a config that cannot be (e.g. its N)
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise_on_termination()  # a stopped conversion removes its temporary files
    sys.exit(main())
