"""Shared fixtures: the four tiny reference families converted through the conversion CLI, once per session."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from packaging import version
from safetensors.torch import load_file
from transformers import PreTrainedModel

import modeling_openflamingo  # noqa: F401 - registers the Auto classes

ROOT = Path(__file__).resolve().parent.parent
MEDIA, EOC, PAD = 401, 400, 402  # the tiny families' added tokens
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAMILIES = ["tiny-mpt", "tiny-mpt-1b-redpajama-200b", "tiny-neox", "tiny-llama"]
# Made with the original as the four were (open_flamingo 2.0.1, transformers 4.33.3, open-clip-torch 2.20.0, fp32 CPU)
# by a sweep over what those four do not vary; each has its own images (`images/`, PIL modes in spec.json) and a
# vision tower of width 16 (the LM's is 32):
# - MPT, seed 213, N=2 of 4 layers, `softmax_scale` 0.3, `use_cache` True, 3 rows; L, I;16 (2x3), RGB (1x1), P made
#   from RGBA, F images;
# - GPT-NeoX, seed 202, N=4 of 6 layers (one block), parallel residual, `rotary_pct` 0.25, 40 px images (25 patches),
#   text before the first <image>; P with transparency, LA, CMYK, RGBA images;
# - LLaMA, seed 206, N=4 of 6 layers, grouped-query attention (2 key/value heads), 3 images a row; I;16, F, LA, P made
#   from RGBA images.
SWEEP = ["sweep-mpt-s213-n2-kv-cache", "sweep-neox-s202-l6-n4-parallel", "sweep-llama-s206-l6-n4-gqa"]
# transformers 5.x before 5.24 cannot generate with flex attention and a static cache, whatever the model
needs_flex_with_static_cache = pytest.mark.skipif(
    version.parse("5") <= version.parse(transformers.__version__) < version.parse("5.24.0.dev0"),
    reason="transformers 5.x before 5.24 fails on a flex BlockMask with a static cache itself (`.contiguous()`)",
)
# transformers >= 5.23 names gradient checkpointing "activation checkpointing" (methods and `TrainingArguments`); the
# old names warn (deprecated); 4.x has the old names only. Tests use the installed version's.
NEW_NAMES = hasattr(PreTrainedModel, "activation_checkpointing_enable")
CHECKPOINTING = "activation_checkpointing" if NEW_NAMES else "gradient_checkpointing"


def enable_checkpointing(model: PreTrainedModel, **checkpoint_kwargs) -> None:
    """`model.activation_checkpointing_enable(...)`, or `gradient_checkpointing_enable(...)` on transformers 4.x."""
    kwargs = {f"{CHECKPOINTING}_kwargs": checkpoint_kwargs} if checkpoint_kwargs else {}
    getattr(model, f"{CHECKPOINTING}_enable")(**kwargs)


def is_checkpointing(model: PreTrainedModel) -> bool:
    return getattr(model, f"is_{CHECKPOINTING}")


def checkpointing_training_arguments(**checkpoint_kwargs) -> dict:
    """`TrainingArguments` keywords that turn checkpointing on, under the installed version's name."""
    return {CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": checkpoint_kwargs or None}


def load_cli():
    """The conversion CLI module (a script, not part of the package)."""
    path = ROOT / "conversion" / "convert_openflamingo_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_openflamingo_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_args(family: str, output_dir: Path, **overrides: str) -> list[str]:
    src = FIXTURES / family
    spec = json.loads((src / "spec.json").read_text())
    args = {
        "--checkpoint": str(src / "checkpoint.pt"),
        "--lm": str(src / "lm"),
        "--tokenizer": str(src / "tokenizer"),
        "--open-clip-config": str(src / "open_clip_config.json"),
        "--open-clip-weights": str(src / "open_clip.pt"),
        "--cross-attn-every-n-layers": str(spec["cross_attn_every_n_layers"]),
        "--output-dir": str(output_dir),
    }
    args.update(overrides)
    return [item for pair in args.items() for item in pair]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """family -> folder converted by the CLI (cached for the session)."""
    cache: dict[str, Path] = {}
    cli = load_cli()

    def get(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp("converted") / family
            assert cli.main(cli_args(family, out)) == 0
            cache[family] = out
        return cache[family]

    return get


@pytest.fixture(scope="session")
def loaded(converted):
    """family -> (fp32 model in eval mode, processor) of the converted fixture, loaded once per session."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = converted(family)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            cache[family] = (model, AutoProcessor.from_pretrained(path))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def reference():
    """family -> (spec dict, reference tensors)."""

    def get(family: str):
        src = FIXTURES / family
        return json.loads((src / "spec.json").read_text()), load_file(str(src / "reference.safetensors"))

    return get


@pytest.fixture(scope="session")
def tiny_images():
    from PIL import Image

    return [Image.open(FIXTURES / "tiny_images" / f"image_{i}.png") for i in range(6)]


def fixture_images(family: str, tiny_images: list) -> list:
    """The images a fixture's inputs were made from: its own (`images/`, as spec.json lists them), else the shared
    `tiny_images`."""
    from PIL import Image

    folder = FIXTURES / family / "images"
    if not folder.is_dir():
        return tiny_images
    names = json.loads((FIXTURES / family / "spec.json").read_text())["images"]
    return [Image.open(folder / name) for name in names]


def lm_cache_of(output) -> tuple[str, object]:
    """The LM's key/value cache in a model or `generate` output, and the keyword that takes it back: `cache` on
    transformers >= 5.24, `past_key_values` before."""
    name = "cache" if hasattr(output, "cache") else "past_key_values"
    return name, getattr(output, "cache", None) or output.past_key_values


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 12 tokens of the tiny families, with 2 `<image>` tokens each, and their 2 images."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 400, (2, 12), generator=generator)
    input_ids[:, 0] = MEDIA
    input_ids[:, 6] = EOC
    input_ids[:, 7] = MEDIA
    return {"input_ids": input_ids, "pixel_values": torch.randn(2, 2, 3, 32, 32, generator=generator)}


def example_module(name: str) -> ModuleType:
    """`examples/<name>.py` as a module (the examples import their siblings, e.g. `demo_model`, from their folder)."""
    examples = str(ROOT / "examples")
    sys.path.insert(0, examples)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(examples)


def byte_level_processor(corpus: str, vocab_size: int, **tokenizer_kwargs):
    """An OpenFlamingoProcessor over a small byte-level BPE tokenizer trained on `corpus` (a GPT-NeoX-like vocabulary,
    whose tokens may hold several whitespace characters), with a 32 px image processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modeling_openflamingo import OpenFlamingoImageProcessor, OpenFlamingoProcessor

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([corpus * 50], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", **tokenizer_kwargs)
    return OpenFlamingoProcessor(OpenFlamingoImageProcessor(size=32), tokenizer)
