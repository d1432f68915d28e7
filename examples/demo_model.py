"""The tiny offline demo model: the MosaicGPT (OpenFlamingo-3B layout) reference fixture, converted once.

Examples take `--model PATH_OR_HUB_ID` for a real converted model; without it they use this tiny model (random
weights, so its text is gibberish, but every step is the real pipeline). No download is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "tiny-mpt-1b-redpajama-200b"
DEMO_IMAGES = ROOT / "tests" / "fixtures" / "tiny_images"


def demo_model_dir() -> Path:
    """Folder of the converted tiny demo model (made on first use, under the user's cache folder)."""
    from modeling_openflamingo.checkpoint_conversion import convert_openflamingo_checkpoint

    cache = Path(os.environ.get("OPENFLAMINGO_DEMO_DIR", Path.home() / ".cache" / "openflamingo-hf" / "tiny-demo"))
    if not (cache / "config.json").is_file():
        if cache.exists() and (not cache.is_dir() or any(cache.iterdir())):
            raise SystemExit(
                f"error: the demo model is converted into {cache} (OPENFLAMINGO_DEMO_DIR, or the default under "
                "~/.cache), which holds something else: set OPENFLAMINGO_DEMO_DIR to a new or empty folder."
            )
        convert_openflamingo_checkpoint(
            checkpoint=FIXTURE / "checkpoint.pt",
            lm=FIXTURE / "lm",
            tokenizer=FIXTURE / "tokenizer",
            open_clip_config=FIXTURE / "open_clip_config.json",
            open_clip_weights=FIXTURE / "open_clip.pt",
            cross_attn_every_n_layers=1,
            output_dir=cache,
            overwrite=True,
        )
    return cache


def demo_images() -> list:
    """The six fixture images (assorted sizes and modes: RGB, RGBA, L, P)."""
    from PIL import Image

    return [Image.open(DEMO_IMAGES / f"image_{i}.png") for i in range(6)]


def resolve_model(model: str | None) -> str:
    """`--model` if given (a converted folder or hub id), else the tiny demo model."""
    return model if model else str(demo_model_dir())


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model` ([`resolve_model`] reads it), as every example takes it."""
    parser.add_argument("--model", help="converted OpenFlamingo folder or hub id (default: the tiny demo model)")


def available_device(name: str) -> str:
    """`name` if this torch can run on that device (argparse's `type` for `--device`), else a clear usage error."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device: {error}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            raise argparse.ArgumentTypeError(f"{name!r}: torch {torch.__version__} ({build}) sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{name!r}: torch sees {count} CUDA device(s), numbered from 0")
    elif device.type == "meta":
        raise argparse.ArgumentTypeError(f"{name!r} holds no data: the examples need a device that computes")
    elif device.type != "cpu":  # mps, xpu, ...: whether this torch makes a tensor there (its error says why not)
        try:
            torch.empty(0, device=device)
        except Exception as error:
            reason = (str(error).strip().split(". ")[0].splitlines() or [type(error).__name__])[0]
            raise argparse.ArgumentTypeError(f"{name!r}: torch {torch.__version__} cannot use it: {reason}") from None
    return name


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device`: CUDA when there is one, else the CPU."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=available_device)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device` and `--dtype`, as the inference examples take them."""
    add_model_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_beam_search_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The evaluation's generation settings (3 beams, length_penalty 0), and `--static-cache` for the fast path."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--length-penalty", type=float, default=0.0)
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="decode with a static KV cache (transformers 5): on a GPU, the fast path (one compiled step replayed as "
        "a CUDA graph, the same sequences; its first call compiles for about a minute, so it pays off over many "
        "batches)",
    )


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`generate` arguments from [`add_beam_search_arguments`]'s options (`length_penalty` with beams only: greedy
    decoding has none, and transformers warns of it)."""
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "num_beams": args.num_beams,
        "cache_implementation": "static" if args.static_cache else None,
    }
    if args.num_beams > 1:
        kwargs["length_penalty"] = args.length_penalty
    return kwargs


def load_model_and_processor(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model (in eval mode, on `args.device` in `args.dtype`) and processor named by `add_model_arguments`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_openflamingo  # noqa: F401 - registers the Auto classes

    path = resolve_model(args.model)
    model = AutoModelForImageTextToText.from_pretrained(path).to(args.device, getattr(torch, args.dtype)).eval()
    return model, AutoProcessor.from_pretrained(path)
