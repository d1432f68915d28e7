"""Converting between the original OpenFlamingo parts and our model, in both directions.

The original is three parts: a language model folder (HF layout), the CLIP vision tower (open_clip or transformers
weights) and `checkpoint.pt` (perceiver, gated cross-attention blocks, token embeddings). Every renaming between them
and our state dict is declared once, in the tables below, and read in both directions: `map_key` turns original names
into ours, `unmap_key` turns ours back into the original's (for `convert_hf_to_openflamingo.py`).

The conversion is planned before anything is read: every tensor of the model gets a source (file and key) and a
shape, and every mismatch is reported with the file and the key. `--dry-run` runs the same planning on shapes only.
Tensors are then read one at a time, cast to the target dtype and assigned to a model whose parameters were never
allocated, so peak memory stays near one copy of the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import json
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    MptConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from . import conversion_hub as hub
from .configuration_openflamingo import VIT_L_14_CONFIG, OpenFlamingoConfig, _is_int, gated_layer_indices
from .conversion_errors import ConversionError, _first_line
from .conversion_model_card import LICENSE_FILE, render_license, render_model_card
from .conversion_presets import CHECKPOINT_FILENAME, DEFAULT_VISION, Preset, get_preset
from .image_processing_openflamingo import OpenFlamingoImageProcessor
from .modeling_openflamingo import (
    _TRANSFORMERS_MAJOR,
    OpenFlamingoForConditionalGeneration,
    _drop_transformers_warnings,
)
from .processing_openflamingo import OpenFlamingoProcessor, add_openflamingo_tokens

# ====================================================================================================================
# The key tables
# ====================================================================================================================
#
# A rule is `(original, ours)`: two templates for the same tensor names, in the original's naming and in ours.
# `{i}` / `{j}` stand for a number, `{layers}` for the LM family's decoder-layer path (`DECODER_LAYERS`). A template
# ending in "." renames a prefix (the rest of the key is kept); any other template names one whole key. `None` on one
# side: the name has no counterpart on the other (dropped when converting in that direction). A tuple on our side: the
# original tensor is fused and splits, along dim 0, into that many of ours. The first matching rule wins; a key that no
# rule matches keeps its name.

Template = str | tuple[str, ...] | None
Rules = list[tuple[Template, Template]]

# The decoder-layer list of each LM family (the modules the original wraps in `FlamingoLayer`).
DECODER_LAYERS: dict[str, str] = {
    "mosaic_gpt": "transformer.blocks",
    "mpt": "transformer.blocks",
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
}

# The LM's own weights: the LM's hub checkpoint names (original) -> transformers' native names (ours).
LM_KEY_RULES: dict[str, Rules] = {
    # MosaicGPT (examples v0.0.4, OpenFlamingo-3B) -> transformers MPT, as llm-foundry's convert_examples_ckpt.py does
    "mosaic_gpt": [
        ("transformer.blocks.{i}.ln_1.", "transformer.blocks.{i}.norm_1."),
        ("transformer.blocks.{i}.ln_2.", "transformer.blocks.{i}.norm_2."),
        ("transformer.blocks.{i}.mlp.mlp_up.", "transformer.blocks.{i}.ffn.up_proj."),
        ("transformer.blocks.{i}.mlp.mlp_down.", "transformer.blocks.{i}.ffn.down_proj."),
        ("transformer.ln_f.", "transformer.norm_f."),
        (None, "lm_head.weight"),  # the output layer is `transformer.wte` (tied): no tensor of its own
    ],
    "mpt": [(None, "lm_head.weight")],
    "gpt_neox": [
        ("gpt_neox.layers.{i}.attention.bias", None),  # buffers of old checkpoints
        ("gpt_neox.layers.{i}.attention.masked_bias", None),
        ("gpt_neox.layers.{i}.attention.rotary_emb.inv_freq", None),
        # transformers >= 5.14 calls GPT-NeoX's head `lm_head`; whichever name the model has is used
        ("embed_out.", "lm_head."),
    ],
    "llama": [("model.layers.{i}.self_attn.rotary_emb.inv_freq", None)],
}
LM_FAMILIES = tuple(LM_KEY_RULES)

# checkpoint.pt (keys of the original `Flamingo` module) -> ours. Keys left under `lang_encoder.` then go through the
# LM's table and land under `language_model.`.
FLAMINGO_KEY_RULES: Rules = [
    ("perceiver.layers.{j}.0.", "perceiver.layers.{j}.attn."),
    ("perceiver.layers.{j}.1.0.", "perceiver.layers.{j}.ff.norm."),
    ("perceiver.layers.{j}.1.1.", "perceiver.layers.{j}.ff.fc1."),
    ("perceiver.layers.{j}.1.3.", "perceiver.layers.{j}.ff.fc2."),
    ("lang_encoder.{layers}.{i}.gated_cross_attn_layer.ff.0.", "gated_cross_attn_layers.{i}.ff.norm."),
    ("lang_encoder.{layers}.{i}.gated_cross_attn_layer.ff.1.", "gated_cross_attn_layers.{i}.ff.fc1."),
    ("lang_encoder.{layers}.{i}.gated_cross_attn_layer.ff.3.", "gated_cross_attn_layers.{i}.ff.fc2."),
    ("lang_encoder.{layers}.{i}.gated_cross_attn_layer.", "gated_cross_attn_layers.{i}."),
    # full (unfiltered) state dicts: each decoder layer is wrapped as `FlamingoLayer.decoder_layer`
    ("lang_encoder.{layers}.{i}.decoder_layer.", "lang_encoder.{layers}.{i}."),
    ("vision_encoder.", None),  # a full state dict's vision tower: placed by `plan_conversion` (open_clip names)
]
_CHECKPOINT_VISION_PREFIX = "vision_encoder."

# Second names of the same tensors in some checkpoints: (alias, primary), both in the original naming. The v1
# (LLaMA) checkpoint holds every gated block twice; full state dicts hold every decoder layer twice. An alias must equal
# its primary (checked); when the primary is absent, the alias is used in its place.
CHECKPOINT_ALIASES: Rules = [
    ("lang_encoder.gated_cross_attn_layers.{i}.", "lang_encoder.{layers}.{i}.gated_cross_attn_layer."),
    ("lang_encoder.old_decoder_blocks.{i}.", "lang_encoder.{layers}.{i}.decoder_layer."),
]

# What the released checkpoint.pt holds (the original's `filter_state_dict_to_trainable`): the trained modules (the
# perceiver, the gated blocks, the LM's input embeddings) and every LM parameter whose name contains "embed"; nothing
# of the vision tower.
RELEASED_LM_KEYS_CONTAIN = "embed"
INPUT_EMBEDDINGS: dict[str, str] = {
    "mosaic_gpt": "transformer.wte.weight",
    "mpt": "transformer.wte.weight",
    "gpt_neox": "gpt_neox.embed_in.weight",
    "llama": "model.embed_tokens.weight",
}


def in_released_checkpoint(original_key: str, family: str) -> bool:
    """Whether a `checkpoint.pt` key (original naming) is part of the released format."""
    if not original_key.startswith("lang_encoder."):
        return not original_key.startswith(_CHECKPOINT_VISION_PREFIX)
    lm_key = original_key[len("lang_encoder.") :]
    return (
        ".gated_cross_attn_layer." in original_key
        or lm_key == INPUT_EMBEDDINGS[family]
        or RELEASED_LM_KEYS_CONTAIN in lm_key
    )


# open_clip's visual tower -> transformers' CLIP vision transformer (`CLIPVisionModel` minus its wrapper prefix).
OPEN_CLIP_KEY_RULES: Rules = [
    ("conv1.weight", "embeddings.patch_embedding.weight"),
    ("class_embedding", "embeddings.class_embedding"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_pre.", "pre_layrnorm."),
    ("transformer.resblocks.{i}.ln_1.", "encoder.layers.{i}.layer_norm1."),
    ("transformer.resblocks.{i}.ln_2.", "encoder.layers.{i}.layer_norm2."),
    (
        "transformer.resblocks.{i}.attn.in_proj_weight",
        tuple(f"encoder.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
    ),
    (
        "transformer.resblocks.{i}.attn.in_proj_bias",
        tuple(f"encoder.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"),
    ),
    ("transformer.resblocks.{i}.attn.out_proj.", "encoder.layers.{i}.self_attn.out_proj."),
    ("transformer.resblocks.{i}.mlp.c_fc.", "encoder.layers.{i}.mlp.fc1."),
    ("transformer.resblocks.{i}.mlp.c_proj.", "encoder.layers.{i}.mlp.fc2."),
    ("ln_post.", "post_layernorm."),
    ("proj", None),  # the CLIP projection is not part of CLIPVisionModel (and OpenFlamingo does not use it)
]

# A transformers CLIP checkpoint (`CLIPModel` or `CLIPVisionModel`) -> the same vision transformer names.
TRANSFORMERS_CLIP_KEY_RULES: Rules = [
    ("vision_model.embeddings.position_ids", None),  # a buffer that old checkpoints saved
    ("vision_model.", ""),
    ("text_model.", None),
    ("visual_projection.", None),
    ("text_projection.", None),
    ("logit_scale", None),
]

# Wrappers of training-time checkpoints: DDP / torch.compile prefix the whole key; activation checkpointing and FSDP
# wrap modules anywhere in the tree.
CHECKPOINT_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
CHECKPOINT_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

# ---- the rule engine ----

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    pattern, position = "^", 0
    for match in _PLACEHOLDER.finditer(template):
        pattern += re.escape(template[position : match.start()]) + rf"(?P<{match.group(1)}>\d+)"
        position = match.end()
    pattern += re.escape(template[position:])
    is_prefix = template == "" or template.endswith(".")
    return re.compile(pattern if is_prefix else pattern + "$")


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _with_layers(rules: Rules, layers: str) -> Rules:
    def sub(template: Template) -> Template:
        if isinstance(template, tuple):
            return tuple(t.replace("{layers}", layers) for t in template)
        return None if template is None else template.replace("{layers}", layers)

    return [(sub(original), sub(ours)) for original, ours in rules]


def map_key(key: str, rules: Rules) -> str | tuple[str, ...] | None:
    """An original key in our naming: a name, a tuple of names (a fused tensor that splits), or None (no place)."""
    for original, ours in rules:
        if original is None or isinstance(original, tuple):
            continue
        match = _template_regex(original).match(key)
        if match:
            rest = key[match.end() :]
            if ours is None:
                return None
            if isinstance(ours, tuple):
                return tuple(_fill(t, match.groupdict()) + rest for t in ours)
            return _fill(ours, match.groupdict()) + rest
    return key


def unmap_key(key: str, rules: Rules) -> str | tuple[str, int, int] | None:
    """One of our keys in the original's naming: a name, `(fused name, part, parts)`, or None (no counterpart)."""
    for original, ours in rules:
        if ours is None:
            continue
        for index, template in enumerate(ours if isinstance(ours, tuple) else (ours,)):
            match = _template_regex(template).match(key)
            if match:
                if original is None:
                    return None
                name = _fill(original, match.groupdict()) + key[match.end() :]
                return (name, index, len(ours)) if isinstance(ours, tuple) else name
    return key


def lm_key_to_native(key: str, family: str, model_keys: Iterable[str] | None = None) -> str | None:
    """An LM checkpoint key (the LM's hub naming) -> transformers' native name (None: not a weight of the model).

    With `model_keys` (the LM's native keys), a renaming that the model does not use (GPT-NeoX `lm_head` on
    transformers < 5.14) is not applied.
    """
    native = map_key(key, LM_KEY_RULES[family])
    if model_keys is not None and native is not None:
        model_keys = model_keys if isinstance(model_keys, (set, frozenset, dict)) else set(model_keys)
        if native not in model_keys and key in model_keys:
            return key
    return native


def lm_key_to_original(key: str, family: str) -> str | None:
    """A native LM key -> the LM's hub checkpoint name (None: the original has no such tensor, e.g. a tied head)."""
    original = unmap_key(key, LM_KEY_RULES[family])
    return original if not isinstance(original, tuple) else original[0]


@functools.cache
def _flamingo_rules(family: str) -> Rules:
    return _with_layers(FLAMINGO_KEY_RULES, DECODER_LAYERS[family])


@functools.cache
def _alias_rules(family: str) -> Rules:
    return _with_layers(CHECKPOINT_ALIASES, DECODER_LAYERS[family])


def checkpoint_key_to_native(key: str, family: str, model_keys: Iterable[str] | None = None) -> str | None:
    """A `checkpoint.pt` key (without wrapper prefixes) -> our key; None: not a tensor of the model."""
    mapped = map_key(key, _flamingo_rules(family))
    if not isinstance(mapped, str):
        return None
    if not mapped.startswith("lang_encoder."):
        return mapped
    lm_keys = None
    if model_keys is not None:
        lm_keys = {k[len("language_model.") :] for k in model_keys if k.startswith("language_model.")}
    native = lm_key_to_native(mapped[len("lang_encoder.") :], family, lm_keys)
    return None if native is None else "language_model." + native


def native_key_to_checkpoint(key: str, family: str) -> str | None:
    """One of our keys (perceiver, gated blocks, LM) -> its `checkpoint.pt` name; None: it has no counterpart there.

    LM keys get the original's full-state-dict names (`lang_encoder.<layers>.{i}.decoder_layer.*` for decoder layers);
    the vision tower is not part of `checkpoint.pt` (see `export_openflamingo_state_dict`).
    """
    if key.startswith("language_model."):
        original = lm_key_to_original(key[len("language_model.") :], family)
        if original is None:
            return None
        key = "lang_encoder." + original
    elif key.startswith("vision_model."):
        return None
    original = unmap_key(key, _flamingo_rules(family))
    return original if isinstance(original, str) else None


def checkpoint_alias_primary(key: str, family: str) -> str | None:
    """The primary name of a `checkpoint.pt` alias key (v1 duplicate blocks, `old_decoder_blocks`), else None."""
    primary = map_key(key, _alias_rules(family))
    return primary if isinstance(primary, str) and primary != key else None


# ====================================================================================================================
# Reading files
# ====================================================================================================================


def _zip_pickle_name(path: Path) -> str | None:
    """The name of a zip-format torch file's pickle (`.../data.pkl`); None for any other file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
    except (zipfile.BadZipFile, OSError):
        return None


def _is_text(head: bytes) -> bool:
    """Whether a file's first bytes are printable UTF-8 text (a cut multi-byte character at the end allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return False
        text = head[: error.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (`torch.jit.save`: a zip with `constants.pkl` and `code/`)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _not_a_checkpoint(path: Path) -> tuple[str, bool]:
    """Why `path` (which torch could not read) is no torch checkpoint, from its first bytes; and whether that names
    what the file is (then torch's own text about it adds nothing)."""
    with open(path, "rb") as file:
        head = file.read(64)
    if head.startswith(b"version https://git-lfs"):
        return (
            "a Git LFS pointer, not the file itself (cloned without git-lfs?): run `git lfs pull` in its repository, "
            "or download it with huggingface_hub"
        ), True
    if head.lstrip()[:1] == b"<":
        return "an HTML or XML page, not a torch checkpoint (a web page saved in its place?)", True
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file, not a torch checkpoint (a config given in place of the weights?)", True
    if head and _is_text(head):
        return "a text file, not a torch checkpoint", True
    # an intact torch zip file whose pickle `weights_only=True` does not read (e.g. `pickle_protocol=4`)
    if _zip_pickle_name(path) is not None:
        return (
            "a torch file whose pickle weights_only=True cannot read: load it in its own project and save the "
            "tensors alone (torch.save(state_dict) with the default protocol, or safetensors)"
        ), False
    return "cannot be read as a torch checkpoint (truncated or corrupt?)", False


def load_torch_file(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """`torch.load(..., weights_only=True, mmap=True)` with errors that name the file (and, for pickles that need
    code, the entry that needs it). `verify`: check a zip-format file's records against their CRC-32 (one more read
    of the file; [`_check_zip_records`])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if _is_torchscript(path):  # (before torch, which would hand it to torch.jit.load with a warning, then refuse it)
        raise ConversionError(
            f"{path}: a TorchScript archive (torch.jit.save: code and weights, e.g. OpenAI's own ViT-L-14.pt), which "
            "is not loaded here (running its code is unsafe); take the weights as a state dict or safetensors "
            "instead: for OpenAI's CLIP, the default vision tower (timm/vit_large_patch14_clip_224.openai) or "
            "--vision openai/clip-vit-large-patch14."
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format: no mmap
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        try:  # a damaged record (the pickle's too) is the reason, whatever the unpickler made of its bytes
            _check_zip_records(path)
        except ConversionError as corrupt:
            raise corrupt from error
        except (zipfile.BadZipFile, OSError, EOFError):
            pass  # (not readable as a zip at all: told below)
        text = str(error)
        # torch wraps every unpickling failure of `weights_only=True` in advice to load the file without it: only
        # its own reason is passed on
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.DOTALL)
        message = " ".join(reason.group(1).split()) if reason else _first_line(error)
        # a global outside torch's allowlist (a training script's class), or in a module torch blocks outright
        # (`os`, `posix`, `sys`, ...: what a code-execution payload calls)
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        blocked = re.search(r"unsupported GLOBAL (\S+) whose module \S+ is blocked", text)
        refused = (unsupported or blocked).group(1) if unsupported or blocked else None
        culprit = (
            _find_unsafe_pickle_entry(path, refused)
            if unsupported or blocked or isinstance(error, pickle.PickleError)
            else None
        )
        where = f" {culprit}:" if culprit else ""
        if blocked:
            raise ConversionError(
                f"{path}:{where} refused with weights_only=True: loading it would call {blocked.group(1)}, which "
                "runs commands or touches the system, as malicious files do. Do not load it anywhere; get the "
                "weights from a source you trust."
            ) from error
        if unsupported or culprit:
            if unsupported:
                message = f"it needs {unsupported.group(1)}"
            raise ConversionError(
                f"{path}:{where} refused with weights_only=True: the file needs code to load, which is unsafe. "
                f"Load it in its own project and save the tensors alone (torch.save(state_dict) or safetensors). "
                f"({message})"
            ) from error
        why, named = _not_a_checkpoint(path)
        raise ConversionError(f"{path}: {why}." if named else f"{path}: {why}: {message}") from error
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}.")
    if verify:
        _check_zip_records(path)
    return dict(obj)


_CHECK_BAR_MIN_BYTES = 1 << 28  # files smaller than this are checked without a progress bar
# whether the conversion that is running shows progress bars (its `progress` argument), for those made deep inside it
_SHOW_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("openflamingo_conversion_progress", default=True)


@contextmanager
def _progress_shown(progress: bool) -> Iterator[None]:
    token = _SHOW_PROGRESS.set(progress)
    try:
        yield
    finally:
        _SHOW_PROGRESS.reset(token)


def _check_zip_records(path: Path) -> None:
    """Compare every record of a zip-format torch file with the CRC-32 the zip stores for it.

    torch's reader does not check them, so a flipped byte inside a tensor would load (and convert) silently. Records
    saved without a CRC (`torch.serialization.config.save.compute_crc32 = False` writes 0) are not checked.
    """
    if not zipfile.is_zipfile(path):  # the legacy (pre-zip) format has no checksums
        return
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if info.CRC != 0]
        total = sum(info.file_size for info in records)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"Checking {path.name}",
            disable=not _SHOW_PROGRESS.get() or total < _CHECK_BAR_MIN_BYTES,
            leave=False,
        ) as bar:
            for info in records:
                try:
                    with archive.open(info) as member:
                        while chunk := member.read(1 << 24):
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, OSError, EOFError) as error:
                    raise ConversionError(
                        f"{path}: record {info.filename} does not match its CRC-32 checksum: the file is corrupt "
                        f"(download it again). ({_first_line(error)})"
                    ) from error


class _Opaque:
    """Stands for an object of a class that a pickle names; never imports or calls anything."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        instance = object.__new__(cls)
        instance.children = list(args)
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.children.append(state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.children.append({key: value})

    def append(self, value: Any) -> None:
        self.children.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.children.extend(values)


_SAFE_PICKLE_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


def _find_unsafe_pickle_entry(path: Path, culprit: str | None = None) -> str | None:
    """Best effort: 'entry 'args' is a argparse.Namespace' for the first entry that is `culprit` (the global torch's
    unpickler refused), or without one (or when no entry is it), that needs non-torch code to load.

    The pickle is walked with every class replaced by an inert stand-in, so nothing is imported or executed.
    """
    name = _zip_pickle_name(path)
    if name is None:  # not a zip checkpoint: no details
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(name)
    except Exception:  # noqa: BLE001 - a damaged record: no details
        return None

    classes: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:
            qualname = f"{module}.{name}"
            if qualname not in classes:
                classes[qualname] = type(name, (_Opaque,), {"qualname": qualname})
            return classes[qualname]

        def persistent_load(self, pid: Any) -> None:
            return None

    try:
        import io

        root = Unpickler(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001
        return None

    def walk(obj: Any, where: str, depth: int = 0, culprit: str | None = None) -> str | None:
        if depth > 12:
            return None
        if isinstance(obj, _Opaque):
            if obj.qualname == culprit if culprit else not obj.qualname.startswith(_SAFE_PICKLE_MODULES):
                return f"entry {where or '(top level)'!s} is a {obj.qualname}"
            children: Iterable[tuple[str, Any]] = ((where, child) for child in obj.children)
        elif isinstance(obj, Mapping):
            children = ((f"{where}.{k}" if where else repr(k), v) for k, v in obj.items())
        elif isinstance(obj, (list, tuple)):
            children = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
        else:
            return None
        for child_where, child in children:
            found = walk(child, child_where, depth + 1, culprit)
            if found:
                return found
        return None

    return (walk(root, "", culprit=culprit) if culprit else None) or walk(root, "")


def unwrap_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept training checkpoints (`{"model_state_dict": ...}`) and DDP/FSDP/activation-checkpointing prefixes."""
    if "model_state_dict" in state_dict and isinstance(state_dict["model_state_dict"], Mapping):
        state_dict = state_dict["model_state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ConversionError(
                f"{path}: entry {key!r} is named by a {type(key).__name__}; a state dict's names are strings."
            )
        for part in CHECKPOINT_WRAPPER_PARTS:
            key = key.replace(part, "")
        while key.startswith(CHECKPOINT_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
        if value.is_meta or value.layout != torch.strided:
            what = "a meta tensor, with no data" if value.is_meta else f"a {value.layout} tensor"
            raise ConversionError(f"{path}: entry {key!r} is {what}; a weight is a dense tensor with its values.")
        out[key] = value
    if not out:
        raise ConversionError(f"{path} holds no tensors (an empty state dict).")
    return out


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorSource:
    """Named tensors of one input (a file, a folder of shards, or a manifest of shapes), read one at a time.

    The shapes and dtypes are known before any tensor is read, so a conversion can be planned and checked first.

    Args:
        name: how errors name the input (its path or hub id).
        shapes: key -> shape.
        dtypes: key -> dtype (optional).
        loader: key -> tensor; None for a manifest (shapes only).
    """

    def __init__(
        self,
        name: str,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, torch.dtype] | None = None,
        loader: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
        self.dtypes = dict(dtypes or {})
        self._loader = loader

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def keys(self) -> list[str]:
        """The keys, in the input's order."""
        return list(self.shapes)

    def load(self, key: str) -> torch.Tensor:
        """Read one tensor; errors name the input and the key."""
        if self._loader is None:
            raise ConversionError(f"{self.name}: a manifest of shapes; tensor {key!r} cannot be read.")
        try:
            return self._loader(key)
        except ConversionError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised with file and key named
            raise ConversionError(
                f"{self.name}: key {key!r} cannot be read (truncated or corrupt file?): {_first_line(error)}"
            ) from error

    def floating_dtype(self) -> torch.dtype | None:
        """The input's precision: the dtype its floating-point tensors promote to (`torch.promote_types`), so that a
        checkpoint mixing bf16 and fp32 tensors gives fp32 and none is rounded; float64 only when every one is (a stray
        float64 buffer does not double the model). None without floating-point tensors."""
        found = {dtype for dtype in self.dtypes.values() if dtype is not None and dtype.is_floating_point}
        found = (found - {torch.float64}) or found
        return functools.reduce(torch.promote_types, sorted(found, key=str)) if found else None

    @classmethod
    def from_state_dict(cls, name: str, state_dict: Mapping[str, torch.Tensor]) -> TensorSource:
        """A source over tensors already in memory (or memory-mapped)."""
        state_dict = dict(state_dict)
        return cls(
            name,
            {k: tuple(v.shape) for k, v in state_dict.items()},
            {k: v.dtype for k, v in state_dict.items()},
            state_dict.__getitem__,
        )

    @classmethod
    def from_manifest(
        cls, name: str, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype = torch.float32
    ) -> TensorSource:
        """A source of shapes only (for dry runs)."""
        return cls(name, shapes, dict.fromkeys(shapes, dtype), None)


def torch_file_source(path: str | os.PathLike, verify: bool = True) -> TensorSource:
    """A `torch.save`d state dict (or training checkpoint), memory-mapped; wrapper prefixes removed."""
    return TensorSource.from_state_dict(str(path), unwrap_checkpoint(load_torch_file(path, verify), path))


def safetensors_source(files: Iterable[str | os.PathLike], name: str | None = None) -> TensorSource:
    """One or more safetensors files (shards) as one source; only headers are read until a tensor is asked for."""
    from safetensors import safe_open

    files = [Path(f) for f in files]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    where: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    shapes[key] = tuple(view.get_shape())
                    dtypes[key] = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
                    where[key] = path
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise ConversionError(
                f"{path}: cannot be read as safetensors (truncated or corrupt?): {_first_line(error)}"
            ) from error

    handles: dict[Path, Any] = {}

    def load(key: str) -> torch.Tensor:
        path = where[key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        try:
            return handles[path].get_tensor(key)
        except Exception as error:  # noqa: BLE001
            raise ConversionError(
                f"{path}: key {key!r} cannot be read (truncated or corrupt?): {_first_line(error)}"
            ) from error

    return TensorSource(name or (str(files[0]) if len(files) == 1 else str(files[0].parent)), shapes, dtypes, load)


def weights_source(path: str | os.PathLike) -> TensorSource:
    """A weights file, by its format: safetensors, or a torch pickle (loaded with weights_only=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors_source([path])
    return torch_file_source(path)


_SHARD = r"(-\d+-of-\d+)?"


def hf_weight_files(files: Iterable[str]) -> list[str]:
    """The weight files of a HF model folder: `model*.safetensors` (+ index) if any, else `pytorch_model*.bin`."""
    files = list(files)
    safetensors = [f for f in files if re.fullmatch(rf"model{_SHARD}\.safetensors", f)]
    if safetensors:
        return safetensors + [f for f in files if f == "model.safetensors.index.json"]
    bins = [f for f in files if re.fullmatch(rf"pytorch_model{_SHARD}\.bin", f)]
    return bins + [f for f in files if f == "pytorch_model.bin.index.json"]


def hf_folder_source(folder: str | os.PathLike) -> TensorSource:
    """The weights of a HF model folder (single file or sharded; safetensors preferred over .bin)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder.")
    chosen = hf_weight_files(p.name for p in folder.iterdir())
    index = next((f for f in chosen if f.endswith(".index.json")), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        except Exception as error:  # noqa: BLE001
            raise ConversionError(f"{folder / index}: not a valid shard index: {_first_line(error)}") from error
    else:
        weights = sorted(f for f in chosen if not f.endswith(".json"))
        shards = [f for f in weights if not re.search(r"-\d+-of-\d+\.", f)][:1]
        if weights and not shards:
            raise ConversionError(
                f"{folder}: holds shards ({weights[0]}, ...) but not their index (model.safetensors.index.json or "
                "pytorch_model.bin.index.json), which names the shard of every tensor."
            )
    if not shards:
        raise FileNotFoundError(f"{folder}: no weights (model.safetensors, its shards, or pytorch_model.bin) found.")
    if shards[0].endswith(".safetensors"):
        return safetensors_source(
            [folder / s for s in shards], name=str(folder if len(shards) > 1 else folder / shards[0])
        )
    sources = [torch_file_source(folder / s) for s in shards]
    if len(sources) == 1:
        return sources[0]
    owner = {key: source for source in sources for key in source.keys()}
    return TensorSource(
        str(folder),
        {k: s.shapes[k] for k, s in owner.items()},
        {k: s.dtypes[k] for k, s in owner.items()},
        lambda key: owner[key].load(key),
    )


# ====================================================================================================================
# Configs
# ====================================================================================================================


def _lm_config_from_dict(raw: Mapping[str, Any], source: Any) -> tuple[PretrainedConfig, str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = raw.get("model_type")
    if family not in LM_FAMILIES:
        raise ConversionError(
            f"{source}: unknown LM family model_type={family!r}; supported: {', '.join(LM_FAMILIES)}."
        )
    if family in ("mosaic_gpt", "mpt"):
        config = (mosaic_gpt_to_mpt_config if family == "mosaic_gpt" else mpt_config_from_dict)(raw, source)
        if config.attn_config.qk_ln != (family == "mosaic_gpt"):
            # QK-LayerNorm tells the two apart (`lm_family_of`) except here: MosaicGPT without it, MPT with it
            config.original_model_type = family
        return config, family
    clean = {k: v for k, v in raw.items() if k not in ("auto_map", "_name_or_path")}
    config = CONFIG_MAPPING[family].from_dict(clean)
    if family == "gpt_neox":
        # An odd number of rotary dimensions (`int(head_dim * rotary_pct)`, e.g. 1 for 4-wide heads at 0.25) is
        # rotated differently by the transformers the original ran (4.3x broadcasts cos / sin one dimension wider
        # over the odd slice, widening queries and keys) and by today's: refused rather than computed otherwise.
        rope = getattr(config, "rope_parameters", None) or {}
        fraction = rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
        head_dim = config.hidden_size // config.num_attention_heads
        rotary = int(head_dim * fraction)
        if rotary % 2:
            raise ConversionError(
                f"{source}: GPT-NeoX with an odd number of rotary dimensions (int(head_dim * rotary_pct) = "
                f"int({head_dim} * {fraction}) = {rotary}) is not supported: the transformers the original ran and "
                "this one rotate them differently."
            )
    return config, family


def lm_config_from_dict(raw: Mapping[str, Any], source: Any = "config.json") -> tuple[PretrainedConfig, str]:
    """The LM's transformers config and its family from its hub `config.json` contents."""
    try:
        return _lm_config_from_dict(raw, source)
    except ConversionError:
        raise
    except KeyError as error:
        raise ConversionError(f"{source}: the LM config lacks {error.args[0]!r}.") from error
    except Exception as error:  # transformers' own checks: TypeError, ValueError, huggingface_hub's strict dataclasses
        message = " ".join(str(error).split()) or type(error).__name__
        raise ConversionError(f"{source}: the LM config is not one transformers accepts: {message}") from error


def _int_if_whole(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _require(source: Any, what: str, options: Mapping[str, tuple[Any, Any]]) -> None:
    for name, (value, needed) in options.items():
        if value != needed:
            raise ConversionError(f"{source}: {what} with {name}={value!r} is not supported (needs {needed!r}).")


def _exact_gelu_or_none(activation: Any) -> Any:
    """llm-foundry's `ffn_act_fn`: None where it names MPT's own activation (exact GELU), else itself."""
    if activation is None or (
        isinstance(activation, Mapping)
        and activation.get("name") == "gelu"
        and activation.get("approximate", "none") == "none"
        and set(activation) <= {"name", "approximate"}
    ):
        return None
    return activation


def mosaic_gpt_to_mpt_config(raw: Mapping[str, Any], source: Any = "config.json") -> MptConfig:
    """MosaicGPT's config as transformers' `MptConfig` (QK-LayerNorm kept in `attn_config.qk_ln`)."""
    _require(
        source,
        "MosaicGPT",
        {
            "alibi": (raw.get("alibi", True), True),
            "no_bias": (raw.get("no_bias", True), True),
            "prefix_lm": (raw.get("prefix_lm", False), False),
            "attn_uses_sequence_id": (raw.get("attn_uses_sequence_id", False), False),
            "logit_scale": (raw.get("logit_scale"), None),
            "mlp_ratio": (raw.get("mlp_ratio", 4), 4),
            "alibi_bias_max": (raw.get("alibi_bias_max", 8), 8),
            # (QK-LayerNorm after clipping: this package applies one or the other)
            "attn_clip_qkv with attn_qk_ln": (raw.get("attn_clip_qkv") if raw.get("attn_qk_ln") else None, None),
        },
    )
    n_heads = raw["n_heads"]
    if n_heads & (n_heads - 1):
        # MosaicGPT's ALiBi slopes are 2^(-8 i / n_heads), i = 1..n_heads; transformers' MPT interleaves those of the
        # next power of two instead: the same only for a power of two (MPT-1B has 16 heads)
        raise ConversionError(
            f"{source}: MosaicGPT with n_heads={n_heads} is not supported (needs a power of two: its ALiBi slopes "
            "differ from transformers' MPT otherwise)."
        )
    return MptConfig(
        d_model=raw["d_model"],
        n_heads=raw["n_heads"],
        n_layers=raw["n_layers"],
        expansion_ratio=raw.get("mlp_ratio", 4),
        max_seq_len=raw["max_seq_len"],
        vocab_size=raw["vocab_size"],
        resid_pdrop=float(raw.get("resid_pdrop", 0.0)),
        emb_pdrop=float(raw.get("emb_pdrop", 0.0)),
        layer_norm_epsilon=1e-5,
        no_bias=True,
        norm_type="low_precision_layernorm" if raw.get("low_precision_layernorm", False) else "layernorm",
        attn_config={
            "qk_ln": bool(raw.get("attn_qk_ln", False)),
            "clip_qkv": raw.get("attn_clip_qkv"),
            "softmax_scale": raw.get("softmax_scale"),
            "alibi": True,
            "alibi_bias_max": raw.get("alibi_bias_max", 8),
            "attn_pdrop": _int_if_whole(raw.get("attn_pdrop", 0)),
        },
        tie_word_embeddings=True,
        # as the hub config says (its code defaults to no cache): it decides how the original generated (`make_config`)
        use_cache=bool(raw.get("use_cache", False)),
    )


def mpt_config_from_dict(raw: Mapping[str, Any], source: Any = "config.json") -> MptConfig:
    """An MPT config (llm-foundry's hub layout or transformers') as transformers' `MptConfig`.

    Options that transformers' MPT silently ignores are refused unless they hold the value it implements.
    """
    attn = {k: v for k, v in dict(raw.get("attn_config") or {}).items() if k != "model_type"}
    ffn = dict(raw.get("ffn_config") or {})
    eps = raw.get("layer_norm_epsilon", raw.get("norm_eps", 1e-5))
    _require(
        source,
        "MPT",
        {
            "attn_config.alibi": (attn.get("alibi", True), True),
            "attn_config.alibi_bias_max": (attn.get("alibi_bias_max", 8), 8),
            "attn_config.attn_type": (attn.get("attn_type", "multihead_attention"), "multihead_attention"),
            "attn_config.prefix_lm": (attn.get("prefix_lm", False), False),
            "attn_config.attn_uses_sequence_id": (attn.get("attn_uses_sequence_id", False), False),
            "attn_config.clip_qkv with qk_ln": (attn.get("clip_qkv") if attn.get("qk_ln") else None, None),
            "no_bias": (raw.get("no_bias", True), True),
            "logit_scale": (raw.get("logit_scale"), None),
            # (options of later llm-foundry MPTs that transformers' MPT ignores, with the weights' names unchanged)
            "norm_type": (str(raw.get("norm_type") or "layernorm").replace("low_precision_", ""), "layernorm"),
            "attn_config.qk_gn": (attn.get("qk_gn", False), False),
            "attn_config.sliding_window_size": (attn.get("sliding_window_size", -1) or -1, -1),
            "ffn_config.ffn_type": (ffn.get("ffn_type", "mptmlp"), "mptmlp"),
            "ffn_config.ffn_act_fn": (_exact_gelu_or_none(ffn.get("ffn_act_fn")), None),
            "tie_word_embeddings": (raw.get("tie_word_embeddings", True), True),  # else its own lm_head, dropped
            "attn_config.attn_logit_softcapping": (attn.get("attn_logit_softcapping"), None),
            "final_logit_softcapping": (raw.get("final_logit_softcapping"), None),
            "block_overrides": (raw.get("block_overrides") or None, None),
            "norm_eps": (raw.get("norm_eps", eps), eps),  # llm-foundry's name; both given: they must agree
        },
    )
    return MptConfig(
        d_model=raw["d_model"],
        n_heads=raw["n_heads"],
        n_layers=raw["n_layers"],
        # transformers' MPT builds its MLP 4x wide whatever the config says (as the original's did): the weights'
        # shapes, checked when they are read, decide whether an `expansion_ratio` other than 4 converts
        expansion_ratio=4,
        max_seq_len=raw.get("max_seq_len", 2048),
        vocab_size=raw["vocab_size"],
        resid_pdrop=float(raw.get("resid_pdrop", 0.0)),
        emb_pdrop=float(raw.get("emb_pdrop", 0.0)),
        layer_norm_epsilon=eps,
        learned_pos_emb=bool(raw.get("learned_pos_emb", True)),
        no_bias=True,
        norm_type=raw.get("norm_type", "low_precision_layernorm"),
        embedding_fraction=float(raw.get("embedding_fraction", 1.0)),
        initializer_range=raw.get("initializer_range", 0.02),
        attn_config={
            "qk_ln": bool(attn.get("qk_ln", False)),
            "clip_qkv": attn.get("clip_qkv"),
            "softmax_scale": attn.get("softmax_scale"),
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_pdrop": _int_if_whole(attn.get("attn_pdrop", 0)),
        },
        tie_word_embeddings=True,
        # as the hub config says (its code defaults to no cache): it decides how the original generated (`make_config`)
        use_cache=bool(raw.get("use_cache", False)),
    )


def open_clip_vision_config(open_clip_config: Mapping[str, Any], quick_gelu: bool | None = None) -> CLIPVisionConfig:
    """`CLIPVisionConfig` of an open_clip model config (`{"vision_cfg": ..., "quick_gelu": ...}`, or the hub's
    `open_clip_config.json` with its `model_cfg`). `quick_gelu` overrides the config's activation."""
    cfg = open_clip_config.get("model_cfg", open_clip_config)
    vision = cfg.get("vision_cfg", cfg) if isinstance(cfg, Mapping) else cfg
    if not isinstance(vision, Mapping):
        raise ConversionError(f"open_clip config: vision_cfg is a {type(vision).__name__}, not an object of settings.")
    for name in ("width", "layers", "image_size", "patch_size"):
        if name not in vision:
            raise ConversionError(f"open_clip config: vision_cfg has no {name!r}.")
    for name in ("image_size", "patch_size"):
        if isinstance(vision[name], (list, tuple)):
            raise ConversionError(f"open_clip vision_cfg.{name}={vision[name]!r}: only square sizes are supported.")
    for name in ("width", "layers", "image_size", "patch_size", "head_width"):
        value = vision.get(name, 64)
        if not _is_int(value) or value < 1:
            raise ConversionError(f"open_clip vision_cfg.{name}={value!r}: a positive integer is needed.")
    mlp_ratio = vision.get("mlp_ratio", 4.0)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
        raise ConversionError(f"open_clip vision_cfg.mlp_ratio={mlp_ratio!r}: a positive number is needed.")
    # open_clip options that change what the tower computes (a tower that is not a plain ViT, the tokens the original
    # takes from it, layer scale, other norms) and that `CLIPVisionModel` does not have
    _require(
        "open_clip config",
        "a vision tower",
        {
            "timm_model_name": (vision.get("timm_model_name"), None),
            "global_average_pool": (bool(vision.get("global_average_pool", False)), False),  # tokens with the CLS one
            "pool_type": (vision.get("pool_type", "tok"), "tok"),
            "attentional_pool": (bool(vision.get("attentional_pool", False)), False),
            "input_patchnorm": (bool(vision.get("input_patchnorm", False)), False),
            "ls_init_value": (vision.get("ls_init_value"), None),
            "no_ln_pre": (bool(vision.get("no_ln_pre", False)), False),
            "pos_embed_type": (vision.get("pos_embed_type", "learnable"), "learnable"),
            "act_kwargs": (vision.get("act_kwargs") or None, None),
            "norm_kwargs": (vision.get("norm_kwargs") or None, None),
        },
    )
    width = vision["width"]
    if quick_gelu is None and "quick_gelu" not in cfg:
        # (the hub's timm/vit_large_patch14_clip_224.openai config has no such key: a copy of it under another name
        # would otherwise become a GELU tower, silently wrong for OpenAI's weights)
        raise ConversionError(
            "The open_clip config does not say the vision tower's activation (no 'quick_gelu' key): pass "
            "quick_gelu=True (--quick-gelu) for OpenAI's CLIP weights, which every released OpenFlamingo model uses, "
            "or quick_gelu=False (--no-quick-gelu) for weights trained with GELU (e.g. LAION's)."
        )
    use_quick_gelu = cfg["quick_gelu"] if quick_gelu is None else quick_gelu
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=width // vision.get("head_width", 64),
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_act="quick_gelu" if use_quick_gelu else "gelu",
        layer_norm_eps=1e-5,
        projection_dim=cfg.get("embed_dim", 512),
    )


def transformers_clip_vision_config(raw: Mapping[str, Any], source: Any = "config.json") -> CLIPVisionConfig:
    """The vision config of a transformers CLIP `config.json` (`clip` or `clip_vision_model`)."""
    model_type = raw.get("model_type")
    if model_type == "clip":
        if not isinstance(raw.get("vision_config") or {}, Mapping):
            raise ConversionError(f"{source}: vision_config is a {type(raw['vision_config']).__name__}, not an object.")
        vision = dict(raw.get("vision_config") or {})
        vision.setdefault("projection_dim", raw.get("projection_dim", 512))
    elif model_type == "clip_vision_model":
        vision = dict(raw)
    else:
        raise ConversionError(f"{source}: model_type={model_type!r} is not a transformers CLIP model.")
    vision.pop("model_type", None)
    try:
        config = CLIPVisionConfig(
            **{k: v for k, v in vision.items() if not k.startswith("_") and k != "transformers_version"}
        )
    except Exception as error:  # noqa: BLE001 - transformers' own checks (TypeError, its strict dataclasses)
        message = " ".join(str(error).split()) or type(error).__name__
        raise ConversionError(f"{source}: the CLIP vision config is not one transformers accepts: {message}") from error
    for name in _VISION_SIZES:
        value = getattr(config, name, None)
        if not _is_int(value) or value < 1:
            raise ConversionError(f"{source}: vision_config.{name}={value!r}: a positive integer is needed.")
    return config


# the sizes of a CLIP vision config that build the tower (checked: transformers 4.x does not, and torch then fails)
_VISION_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)


# ====================================================================================================================
# Inputs: a preset plus overrides, each a local path or a hub id
# ====================================================================================================================

_TOKENIZER_FILES = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|.*\.model|.*\.tiktoken|config\.json)"
)
# the files that hold a vocabulary (a `tokenizer_config.json` alone does not)
_TOKENIZER_VOCABULARY_FILES = re.compile(r"tokenizer\.json|vocab.*|merges\.txt|.*\.model|.*\.tiktoken")


def load_tokenizer(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder or hub repo (its tokenizer files only are downloaded), with OpenFlamingo's
    added tokens; a folder without a vocabulary (e.g. an LM folder holding weights only) is refused by name."""
    folder = hub.resolve_folder(
        spec, "tokenizer", lambda fs: [f for f in fs if _TOKENIZER_FILES.fullmatch(f)], cache_dir
    )
    if not any(_TOKENIZER_VOCABULARY_FILES.fullmatch(path.name) for path in folder.iterdir()):
        raise ConversionError(
            f"tokenizer: {folder} holds no tokenizer files (tokenizer.json, vocab.* / merges.txt, *.model or "
            "*.tiktoken); pass --tokenizer with the tokenizer the checkpoint was trained with (by default the LM's "
            "folder is used)."
        )
    kwargs: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    settings = _read_json(config_file, "tokenizer") if config_file.is_file() else {}
    if "clean_up_tokenization_spaces" not in settings:
        # decoded text as the original's: transformers 4.33 cleaned up tokenization spaces unless told otherwise
        # (" ." -> "."), later versions do not
        kwargs["clean_up_tokenization_spaces"] = True
    special_map = folder / "special_tokens_map.json"
    named = {**settings, **(_read_json(special_map, "tokenizer") if special_map.is_file() else {})}
    if named.get("pad_token") is None:
        # no pad token unless the files name one, as 4.33 read them: 5.x's GPT-NeoX class defaults to <|padding|>,
        # which left <PAD> unadded (a vocabulary one short of the checkpoint's, padding with another id)
        kwargs["pad_token"] = None
    # With a tokenizer.json, its pipeline as saved, as 4.33's fast tokenizers ran it: 5.x's model classes rebuild it
    # from the vocabulary (LLaMA's without the legacy prefix space: "<image>Output:" tokenized otherwise)
    has_pipeline = (folder / "tokenizer.json").is_file()
    if not has_pipeline and _TRANSFORMERS_MAJOR >= 5 and str(settings.get("tokenizer_class")).startswith("Llama"):
        raise ConversionError(
            f"tokenizer: {folder} holds a LLaMA sentencepiece model without tokenizer.json; transformers "
            f"{_TRANSFORMERS_MAJOR}.x builds its pipeline without the legacy prefix space that the original's "
            "transformers 4.33 used, so the token ids would differ from the ones the checkpoint was trained with "
            "(e.g. for '<image>Output:'). Make the tokenizer.json with transformers 4.x (`AutoTokenizer."
            "from_pretrained(folder).save_pretrained(folder)`), or convert with transformers 4.57."
        )
    loader = PreTrainedTokenizerFast if has_pipeline else AutoTokenizer
    try:  # (4.x warns that the files name another class: intended)
        with _drop_transformers_warnings(["The tokenizer class you load"], "transformers.tokenization_utils_base"):
            tokenizer = loader.from_pretrained(str(folder), **kwargs)
    except Exception as error:  # noqa: BLE001 - missing packages (protobuf, sentencepiece) and bad files alike
        raise ConversionError(f"tokenizer: {folder} cannot be loaded: {_first_line(error)}") from error
    return add_openflamingo_tokens(tokenizer)


_OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


@dataclass
class VisionInput:
    """The vision tower: its config, its weights and how their names map (`OPEN_CLIP_KEY_RULES` or
    `TRANSFORMERS_CLIP_KEY_RULES`)."""

    config: CLIPVisionConfig
    source: TensorSource
    rules: Rules
    kind: str  # "open_clip" or "transformers"
    origin: str  # what the user asked for (path or hub id), for the model card


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"{what}: {path} is not valid JSON: {_first_line(error)}") from error
    if not isinstance(data, dict):  # every file read here is a JSON object of settings
        raise ConversionError(f"{what}: {path} holds a JSON {type(data).__name__}, not an object of settings.")
    return data


def resolve_vision(
    vision: str | os.PathLike | None = None,
    open_clip_config: str | os.PathLike | None = None,
    open_clip_weights: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
    default_config: CLIPVisionConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VisionInput:
    """The vision tower from open_clip files, an open_clip folder/hub repo, or a transformers CLIP folder/hub repo.

    `quick_gelu` forces the activation (the OpenAI weights need QuickGELU; when unset it is assumed for sources whose
    name contains "openai", else taken from the open_clip config, and a config that does not say is an error).
    `default_config` is used for open_clip weights given without a config (a preset's ViT-L/14).
    """
    if vision is not None and open_clip_weights is not None:
        raise ConversionError("Pass either a vision source (--vision) or open_clip weights (--open-clip-weights).")
    if vision is not None and hub.is_local(vision) and Path(vision).expanduser().is_file():
        open_clip_weights, vision = vision, None
    if open_clip_config is not None and open_clip_weights is None:
        raise ConversionError(
            "--open-clip-config is the config of --open-clip-weights, which were not given (an open_clip folder or "
            "repo given as --vision brings its own config)."
        )
    origin = str(open_clip_weights or vision or DEFAULT_VISION)
    if quick_gelu is None and "openai" in origin.lower():
        quick_gelu = True

    if open_clip_weights is not None:
        weights = hub.resolve_file(open_clip_weights, _OPEN_CLIP_WEIGHTS[-2], "open_clip weights", cache_dir)
        if open_clip_config is not None:
            config_path = hub.resolve_file(open_clip_config, "open_clip_config.json", "open_clip config", cache_dir)
            config = open_clip_vision_config(_read_json(config_path, "open_clip config"), quick_gelu)
        elif default_config is not None:
            config = CLIPVisionConfig(**default_config.to_dict())
            if quick_gelu is not None:
                config.hidden_act = "quick_gelu" if quick_gelu else "gelu"
        else:
            raise ConversionError(f"{weights}: open_clip weights need their config (--open-clip-config).")
        return VisionInput(config, weights_source(weights), OPEN_CLIP_KEY_RULES, "open_clip", origin)

    spec = vision or DEFAULT_VISION
    files = hub.list_files(spec, "vision tower")
    open_clip_weight = next((f for f in _OPEN_CLIP_WEIGHTS if f in files), None)
    if "open_clip_config.json" in files and open_clip_weight:
        folder = hub.resolve_folder(
            spec, "vision tower", lambda _: ["open_clip_config.json", open_clip_weight], cache_dir
        )
        config = open_clip_vision_config(_read_json(folder / "open_clip_config.json", "open_clip config"), quick_gelu)
        return VisionInput(config, weights_source(folder / open_clip_weight), OPEN_CLIP_KEY_RULES, "open_clip", origin)
    if "config.json" in files and hf_weight_files(files):
        folder = hub.resolve_folder(spec, "vision tower", lambda fs: ["config.json", *hf_weight_files(fs)], cache_dir)
        config = transformers_clip_vision_config(_read_json(folder / "config.json", "CLIP config"), folder)
        if quick_gelu is not None:
            config.hidden_act = "quick_gelu" if quick_gelu else "gelu"
        return VisionInput(config, hf_folder_source(folder), TRANSFORMERS_CLIP_KEY_RULES, "transformers", origin)
    raise ConversionError(
        f"vision tower: {spec} holds neither open_clip files (open_clip_config.json + {_OPEN_CLIP_WEIGHTS[0]} or "
        f"{_OPEN_CLIP_WEIGHTS[2]}) nor a transformers CLIP model (config.json + model.safetensors)."
    )


@dataclass
class ConversionInputs:
    """Every part of a conversion, resolved to local files."""

    checkpoint: TensorSource
    checkpoint_origin: str
    lm: TensorSource
    lm_origin: str
    lm_config: PretrainedConfig
    lm_family: str
    tokenizer: Any
    tokenizer_origin: str
    vision: VisionInput
    cross_attn_every_n_layers: int
    preset: Preset | None = None


def _lm_files(files: list[str]) -> list[str]:
    weights = hf_weight_files(files)
    if not weights:
        raise ConversionError("the repo has no model*.safetensors or pytorch_model*.bin weights.")
    return ["config.json", *weights]


def resolve_inputs(
    preset: str | Preset | None = None,
    checkpoint: str | os.PathLike | None = None,
    lm: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vision: str | os.PathLike | None = None,
    open_clip_config: str | os.PathLike | None = None,
    open_clip_weights: str | os.PathLike | None = None,
    cross_attn_every_n_layers: int | None = None,
    quick_gelu: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ConversionInputs:
    """Fill the parts a preset defines, apply the overrides, download what is a hub id, and open every input."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset is not None:
        if lm is None and preset.lm is None:
            raise ConversionError(
                f"{preset.name}: its language model ({preset.lm_title}) is not on the hub under a fixed id; "
                "pass it with --lm (a folder or hub id of the HF-format weights)."
            )
        checkpoint = checkpoint if checkpoint is not None else preset.checkpoint
        lm = lm if lm is not None else preset.lm
        tokenizer = tokenizer if tokenizer is not None else (preset.tokenizer if lm == preset.lm else lm)
        if cross_attn_every_n_layers is None:
            cross_attn_every_n_layers = preset.cross_attn_every_n_layers
        if quick_gelu is None:
            quick_gelu = True  # the released models use OpenAI's CLIP weights, which need QuickGELU
    missing = [flag for flag, value in (("--checkpoint", checkpoint), ("--lm", lm)) if value is None]
    if missing:
        raise ConversionError(f"Without --preset, pass {', '.join(missing)}.")
    tokenizer = tokenizer if tokenizer is not None else lm

    checkpoint_path = hub.resolve_file(checkpoint, CHECKPOINT_FILENAME, "checkpoint", cache_dir)
    lm_dir = hub.resolve_folder(lm, "language model", _lm_files, cache_dir)
    lm_config_path = lm_dir / "config.json"
    if not lm_config_path.is_file():
        raise FileNotFoundError(f"{lm_config_path}: no such file (the LM folder needs its config.json).")
    raw_lm_config = _read_json(lm_config_path, "language model config")
    lm_config, family = lm_config_from_dict(raw_lm_config, lm_config_path)
    tok = load_tokenizer(tokenizer, cache_dir)
    vision_input = resolve_vision(
        vision,
        open_clip_config,
        open_clip_weights,
        quick_gelu,
        default_config=CLIPVisionConfig(**VIT_L_14_CONFIG) if preset is not None else None,
        cache_dir=cache_dir,
    )
    checkpoint_source = torch_file_source(checkpoint_path)
    if cross_attn_every_n_layers is None:
        cross_attn_every_n_layers = infer_cross_attn_every_n_layers(checkpoint_source)
    return ConversionInputs(
        checkpoint=checkpoint_source,
        checkpoint_origin=str(checkpoint),
        lm=hf_folder_source(lm_dir),
        lm_origin=str(lm),
        lm_config=lm_config,
        lm_family=family,
        tokenizer=tok,
        tokenizer_origin=str(tokenizer),
        vision=vision_input,
        cross_attn_every_n_layers=int(cross_attn_every_n_layers),
        preset=preset,
    )


# ====================================================================================================================
# The model skeleton (no memory for parameters) and its layout
# ====================================================================================================================


@contextmanager
def _no_init_weights() -> Iterator[None]:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory); buffers stay real."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            registered = module._parameters[name]
            kwargs = dict(registered.__dict__)
            kwargs["requires_grad"] = registered.requires_grad
            module._parameters[name] = type(registered)(registered.to("meta"), **kwargs)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_empty_model(config: OpenFlamingoConfig) -> OpenFlamingoForConditionalGeneration:
    """The model with every parameter on the meta device: no memory, no random initialisation.

    Fill it with `load_state_dict(state_dict, assign=True)` and `tie_weights()`; for a dry run its shapes suffice.
    """
    with _no_init_weights(), parameters_on_meta():
        model = OpenFlamingoForConditionalGeneration(config)
    model.tie_weights()
    return model


@dataclass
class ModelLayout:
    """What a model needs: its state-dict keys and shapes, the names tied to another, and its embedding matrices."""

    shapes: dict[str, tuple[int, ...]]
    tied: set[str]
    embedding_keys: set[str]
    vision_prefix: str
    gated_layers: list[int]
    cross_attn_every_n_layers: int
    num_lm_layers: int

    @property
    def required(self) -> list[str]:
        """The keys an input must provide (tied aliases are filled by tying)."""
        return [k for k in self.shapes if k not in self.tied]


def model_layout(model: OpenFlamingoForConditionalGeneration) -> ModelLayout:
    """The layout of a (possibly meta) model."""
    state = model.state_dict(keep_vars=True)
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in state.items():
        if id(tensor) in seen:
            tied.add(name)
        else:
            seen[id(tensor)] = name
    lm = model.language_model
    embedding_params = {
        id(p)
        for module in (lm.get_input_embeddings(), lm.get_output_embeddings())
        if module is not None
        for p in module.parameters()
    }
    embedding_keys = {
        "language_model." + n for n, p in lm.named_parameters(remove_duplicate=False) if id(p) in embedding_params
    }
    vision_prefix = (
        "vision_model.vision_model."
        if any(k.startswith("vision_model.vision_model.") for k in state)
        else ("vision_model.")
    )
    return ModelLayout(
        shapes={k: tuple(v.shape) for k, v in state.items()},
        tied=tied,
        embedding_keys=embedding_keys,
        vision_prefix=vision_prefix,
        gated_layers=list(model.config.cross_attn_layer_indices),
        num_lm_layers=model.config.text_config.num_hidden_layers,
        cross_attn_every_n_layers=model.config.cross_attn_every_n_layers,
    )


def make_config(
    lm_config: PretrainedConfig,
    vision_config: CLIPVisionConfig,
    cross_attn_every_n_layers: int,
    tokenizer_length: int,
    media_token_id: int,
    eoc_token_id: int,
    pad_token_id: int | None,
) -> OpenFlamingoConfig:
    """Our config around the LM's and the vision tower's; the LM's vocabulary is the tokenizer's (the original's
    `resize_token_embeddings(len(tokenizer))`). The original generated with a KV cache when the LM's config asked for
    one (GPT-NeoX, LLaMA; not MPT or MosaicGPT), which changes what a generated `<image>` token does to the tokens
    after it: `generated_image_conditioning` follows it."""
    lm_config.vocab_size = tokenizer_length
    original_used_a_cache = getattr(lm_config, "use_cache", True) is not False
    return OpenFlamingoConfig(
        vision_config=vision_config,
        text_config=lm_config,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        generated_image_conditioning="original_kv_cache" if original_used_a_cache else "sequence",
        media_token_id=media_token_id,
        eoc_token_id=eoc_token_id,
        pad_token_id=pad_token_id,
    )


def preset_config(preset: str | Preset) -> OpenFlamingoConfig:
    """The full-size `OpenFlamingoConfig` of a released model, from its embedded LM config (nothing is downloaded):
    CLIP ViT-L/14, the preset's LM (vocabulary resized to the tokenizer's length) and its cross-attention interval."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    lm_config, _ = lm_config_from_dict(dict(preset.lm_config), f"{preset.name} (embedded LM config)")
    return make_config(
        lm_config, CLIPVisionConfig(**VIT_L_14_CONFIG), preset.cross_attn_every_n_layers, **dict(preset.tokens)
    )


# ====================================================================================================================
# Planning: where every tensor of the model comes from
# ====================================================================================================================


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor of the model is made: read `key` from `source`, take `part` (index, count) of it along dim 0
    if it is fused, and with `fit_rows` cut its rows to `shape[0]` (or append the mean row up to it)."""

    source: TensorSource
    key: str
    shape: tuple[int, ...]
    part: tuple[int, int] | None = None
    fit_rows: bool = False


@dataclass
class ConversionPlan:
    """Every tensor of the model with its source, plus the aliases to verify and the rows that exist nowhere."""

    tensors: dict[str, TensorPlan]
    aliases: list[tuple[TensorSource, str, str]] = field(default_factory=list)
    invented_rows: list[str] = field(default_factory=list)
    unused: dict[str, list[str]] = field(default_factory=dict)
    # the parts ("language model", "vision tower") whose weights the checkpoint holds beyond the token embeddings (a
    # full state dict): they win over the LM's and the vision tower's own files
    checkpoint_parts: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many tensors each input provides."""
        counts: dict[str, int] = {}
        for item in self.tensors.values():
            counts[item.source.name] = counts.get(item.source.name, 0) + 1
        return counts


_FAMILY_TITLES = {"mosaic_gpt": "MosaicGPT", "mpt": "MPT", "gpt_neox": "GPT-NeoX", "llama": "LLaMA"}


def _families_with_root(root: str) -> list[str]:
    return [f for f, layers in DECODER_LAYERS.items() if layers.split(".")[0] == root]


def _check_checkpoint_family(checkpoint: TensorSource, family: str, lm_origin: str) -> None:
    """A checkpoint of another LM family names its LM tensors differently: say so, naming the key."""
    own_root = DECODER_LAYERS[family].split(".")[0]
    roots = {layers.split(".")[0] for layers in DECODER_LAYERS.values()}
    for key in checkpoint.keys():
        if not key.startswith("lang_encoder."):
            continue
        root = key.split(".")[1]
        if root in roots and root != own_root:
            families = " or ".join(_FAMILY_TITLES[f] for f in _families_with_root(root))
            raise ConversionError(
                f"{checkpoint.name}: key {key!r} belongs to a {families} language model, but the LM given "
                f"({lm_origin}) is {_FAMILY_TITLES[family]}. The checkpoint is for another model: check --preset "
                "or --lm."
            )


def _gated_index(target: str) -> int | None:
    match = re.match(r"^gated_cross_attn_layers\.(\d+)\.", target)
    return int(match.group(1)) if match else None


# The decoder layer index in the original's names of a gated block: `lang_encoder.<layers>.<i>.gated_cross_attn_layer.`
# and v1's second copies, `lang_encoder.gated_cross_attn_layers.<i>.`
_ORIGINAL_GATED_KEY = re.compile(
    r"^lang_encoder\.(?:.+\.(\d+)\.gated_cross_attn_layer|gated_cross_attn_layers\.(\d+))\."
)


def _no_gated_blocks(source: TensorSource) -> ConversionError:
    return ConversionError(
        f"{source.name}: the checkpoint holds no gated cross-attention block (no key names "
        "'gated_cross_attn_layer'): is it an OpenFlamingo checkpoint (the original's checkpoint.pt)?"
    )


def _interval_of(indices: Sequence[int]) -> int | None:
    """The N that places gated blocks before exactly the decoder layers `indices` (sorted) as far as they go
    ([`gated_layer_indices`]: the first before layer N - 1); None if no N does."""
    if not indices:
        return None
    n = indices[0] + 1
    return n if list(indices) == gated_layer_indices(n, indices[-1] + 1) else None


def infer_cross_attn_every_n_layers(checkpoint: TensorSource) -> int:
    """N from where `checkpoint`'s gated cross-attention blocks are ([`_interval_of`]). Blocks that no N places are
    an error; whether the LM has the layers they need is checked with the LM."""
    indices = sorted(
        {int(m.group(1) or m.group(2)) for key in checkpoint.keys() if (m := _ORIGINAL_GATED_KEY.match(key))}
    )
    if not indices:
        raise _no_gated_blocks(checkpoint)
    n = _interval_of(indices)
    if n is None:
        first = indices[0] + 1
        placed = gated_layer_indices(first, indices[-1] + 1)
        raise ConversionError(
            f"{checkpoint.name}: its gated cross-attention blocks are before decoder layers {indices}: no "
            f"cross_attn_every_n_layers puts them there (N={first} would give {placed}), so no OpenFlamingo model "
            "holds them. Is the checkpoint whole?"
        )
    return n


def _check_gated_layers(found: Mapping[int, str], layout: ModelLayout, source: TensorSource) -> None:
    expected = layout.gated_layers
    if sorted(found) == expected:
        return
    if not found:
        raise _no_gated_blocks(source)
    found_indices = sorted(found)
    bad = next((i for i in found_indices if i not in expected), None)
    key = found[bad] if bad is not None else next(iter(found.values()), None)
    inferred = _interval_of(found_indices)
    hint = ""
    if found_indices and found_indices[-1] >= layout.num_lm_layers:
        hint = (
            f" The language model has {layout.num_lm_layers} decoder layers, fewer than the checkpoint's: is it the "
            "LM the checkpoint was trained with?"
        )
    elif inferred and inferred != layout.cross_attn_every_n_layers:
        hint = f" The checkpoint was trained with N={inferred}: pass --cross-attn-every-n-layers {inferred}."
    elif inferred and found_indices == expected[: len(found_indices)]:
        fitting = f"{found_indices[-1] + 1}" + (f" to {found_indices[-1] + inferred}" if inferred > 1 else "")
        hint = (
            f" The language model has {layout.num_lm_layers} decoder layers, more than the checkpoint's blocks fit "
            f"(an LM of {fitting}): is it the LM the checkpoint was trained with?"
        )
    raise ConversionError(
        f"{source.name}: key {key!r}: the checkpoint has gated cross-attention blocks before decoder layers "
        f"{found_indices}, but cross_attn_every_n_layers={layout.cross_attn_every_n_layers} places them before "
        f"{expected}.{hint}"
    )


def _row_mismatch_hint(key: str, have: tuple[int, ...], need: tuple[int, ...], layout: ModelLayout) -> str:
    if key in layout.embedding_keys and len(have) == 2 and have[1:] == need[1:]:
        return (
            f" The model's vocabulary ({need[0]}) is the tokenizer's length after adding <|endofchunk|>, <image> "
            "and, when it has no pad token of its own, <PAD> (as the original does): is the tokenizer the one the "
            "checkpoint was trained with (one that already has a pad token gives one row fewer)?"
        )
    return " Is the checkpoint from this model size (LM and vision tower)?"


def plan_conversion(
    layout: ModelLayout,
    family: str,
    checkpoint: TensorSource,
    lm: TensorSource,
    vision: VisionInput | TensorSource,
    vision_rules: Rules | None = None,
    lm_origin: str | None = None,
) -> ConversionPlan:
    """Assign a source to every tensor of the model and check every key and shape; errors name the file and key.

    Priority: the checkpoint (perceiver, gated blocks, embedding rows), then the LM, then the vision tower.
    """
    if isinstance(vision, VisionInput):
        vision_source, vision_rules = vision.source, vision.rules
    else:
        vision_source = vision
        if vision_rules is None:
            raise ConversionError("plan_conversion: vision_rules is needed with a bare TensorSource.")
    tensors: dict[str, TensorPlan] = {}
    aliases: list[tuple[TensorSource, str, str]] = []
    unused: dict[str, list[str]] = {}
    model_keys = layout.shapes

    # -- checkpoint.pt --
    if not any(key.startswith(("lang_encoder.", "perceiver.")) for key in checkpoint.keys()):
        some = ", ".join(repr(key) for key in list(checkpoint.keys())[:3])
        raise ConversionError(
            f"{checkpoint.name}: not an OpenFlamingo checkpoint: no key starts with 'lang_encoder.' or 'perceiver.' "
            f"(its keys: {some}, ...). A language model's own weights go to --lm."
        )
    _check_checkpoint_family(checkpoint, family, lm_origin or lm.name)
    gated_found: dict[int, str] = {}
    checkpoint_vision: list[str] = []
    for key in checkpoint.keys():
        name = key
        primary = checkpoint_alias_primary(key, family)
        if primary is not None:
            if primary in checkpoint:
                aliases.append((checkpoint, key, primary))
                continue
            name = primary
        if name.startswith(_CHECKPOINT_VISION_PREFIX):  # a full state dict's vision tower (open_clip names)
            checkpoint_vision.append(key)
            continue
        target = checkpoint_key_to_native(name, family, model_keys)
        if target is None:
            unused.setdefault(checkpoint.name, []).append(key)
            continue
        index = _gated_index(target)
        if index is not None:
            gated_found.setdefault(index, key)
            if index not in layout.gated_layers:
                continue  # reported by _check_gated_layers with the layer lists
        if target not in model_keys:
            raise ConversionError(
                f"{checkpoint.name}: key {key!r} has no place in the model (it would be {target!r}). Is the "
                "checkpoint from this LM family and size?"
            )
        have, need = checkpoint.shapes[key], model_keys[target]
        if have != need:
            raise ConversionError(
                f"{checkpoint.name}: key {key!r} has shape {have} but the model needs {need} for {target!r}."
                + _row_mismatch_hint(target, have, need, layout)
            )
        tensors[target] = TensorPlan(checkpoint, key, need)
    if gated_found or layout.gated_layers:
        _check_gated_layers(gated_found, layout, checkpoint)
    embeddings = "lang_encoder." + INPUT_EMBEDDINGS[family]
    if checkpoint_key_to_native(embeddings, family, model_keys) not in tensors:
        # the LM's own matrix would give <|endofchunk|>, <image> and <PAD> untrained rows, with no error
        raise ConversionError(
            f"{checkpoint.name}: lacks {embeddings!r}, the input embeddings with the trained rows of the added tokens "
            "(<|endofchunk|>, <image>); every released checkpoint.pt holds them. Is it the whole checkpoint?"
        )

    checkpoint_parts = []  # (`tensors` holds the checkpoint's alone so far)
    if any(t.startswith("language_model.") and t not in layout.embedding_keys for t in tensors):
        checkpoint_parts.append("language model")
    if checkpoint_vision:
        checkpoint_parts.append("vision tower")

    # -- the language model --
    lm_keys = {k[len("language_model.") :] for k in model_keys if k.startswith("language_model.")}
    invented: list[str] = []
    for key in lm.keys():
        native = lm_key_to_native(key, family, lm_keys)
        if native is None:
            unused.setdefault(lm.name, []).append(key)
            continue
        target = "language_model." + native
        if target in tensors:
            continue  # the checkpoint's rows win
        if target not in model_keys:
            raise ConversionError(
                f"{lm.name}: key {key!r} has no place in the model (it would be {target!r}). Is the LM a "
                f"{_FAMILY_TITLES[family]} model, as its config says?"
            )
        have, need = lm.shapes[key], model_keys[target]
        if have == need:
            tensors[target] = TensorPlan(lm, key, need)
        elif target in layout.embedding_keys and len(have) == 2 and have[1:] == need[1:]:
            tensors[target] = TensorPlan(lm, key, need, fit_rows=True)
            if have[0] < need[0]:
                invented.append(target)
        else:
            raise ConversionError(f"{lm.name}: key {key!r} has shape {have} but the model needs {need} for {target!r}.")

    # -- the vision tower: its own weights, then (they win) those of a full state dict given as the checkpoint --
    def place_vision(source: TensorSource, key: str, local_key: str, rules: Rules) -> None:
        mapped = map_key(local_key, rules)
        if mapped is None:
            return
        have = source.shapes[key]
        for index, name in enumerate(mapped if isinstance(mapped, tuple) else (mapped,)):
            target = layout.vision_prefix + name
            if target not in model_keys:
                raise ConversionError(
                    f"{source.name}: key {key!r} has no place in the vision tower (it would be {target!r})."
                )
            need = model_keys[target]
            count = len(mapped) if isinstance(mapped, tuple) else 1
            expected = (need[0] * count, *need[1:]) if count > 1 else need
            if have != expected:
                raise ConversionError(
                    f"{source.name}: key {key!r} has shape {have} but the vision tower needs {expected} "
                    "(is it the vision tower the checkpoint was trained with, e.g. CLIP ViT-L/14?)."
                )
            tensors[target] = TensorPlan(source, key, need, part=(index, count) if count > 1 else None)

    vision_keys = vision_source.keys()
    if any(key.startswith(("lang_encoder.", "perceiver.")) for key in vision_keys):
        raise ConversionError(
            f"{vision_source.name}: an OpenFlamingo checkpoint (keys starting with 'lang_encoder.' or 'perceiver.'), "
            "not a vision tower's weights: it goes to --checkpoint; --open-clip-weights takes the open_clip CLIP "
            "weights (or --vision a transformers CLIP model)."
        )
    only_visual = any(k.startswith("visual.") for k in vision_keys)  # a full open_clip CLIP state dict
    for key in vision_keys:
        if not only_visual or key.startswith("visual."):
            place_vision(vision_source, key, key[len("visual.") :] if only_visual else key, vision_rules)
    for key in checkpoint_vision:
        name = checkpoint_alias_primary(key, family) or key
        place_vision(checkpoint, key, name[len(_CHECKPOINT_VISION_PREFIX) :], OPEN_CLIP_KEY_RULES)

    # -- anything missing --
    missing = [k for k in layout.required if k not in tensors]
    if missing:
        by_part = {
            "checkpoint": [k for k in missing if k.startswith(("perceiver.", "gated_cross_attn_layers."))],
            "language model": [k for k in missing if k.startswith("language_model.")],
            "vision tower": [k for k in missing if k.startswith("vision_model.")],
        }
        origin = {"checkpoint": checkpoint.name, "language model": lm.name, "vision tower": vision_source.name}
        part, keys = next((p, ks) for p, ks in by_part.items() if ks) if any(by_part.values()) else ("?", missing)

        def source_name(key: str) -> str:
            """`key` (ours) as the part's own file names it."""
            if part == "checkpoint":
                name = native_key_to_checkpoint(key, family)
            elif part == "language model":
                name = lm_key_to_original(key[len("language_model.") :], family)
            elif part == "vision tower":
                name = unmap_key(key[len(layout.vision_prefix) :], vision_rules)
                name = name[0] if isinstance(name, tuple) else name
                name = None if name is None else ("visual." if only_visual else "") + name
            else:
                name = None
            return name if isinstance(name, str) else key

        named = [source_name(key) for key in keys[:4]]
        ours = "" if named == keys[:4] else f" (the converted model's {keys[:4]})"
        raise ConversionError(
            f"{origin.get(part, '?')}: the {part} lacks {len(keys)} tensors the model needs, e.g. {named}{ours}."
        )
    return ConversionPlan(
        tensors=tensors, aliases=aliases, invented_rows=invented, unused=unused, checkpoint_parts=checkpoint_parts
    )


def _fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    mean = torch.mean(tensor, dim=0, keepdim=True, dtype=torch.float32).to(tensor.dtype)
    return torch.cat((tensor, mean.expand(rows - tensor.shape[0], -1)), dim=0)


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() and tensor.is_contiguous()


def verify_aliases(plan: ConversionPlan) -> None:
    """Every alias (v1 duplicate gated block, `old_decoder_blocks`) must equal its primary, bit for bit."""
    for source, alias, primary in plan.aliases:
        a, b = source.load(alias), source.load(primary)
        if a.shape != b.shape or not torch.equal(a, b):
            raise ConversionError(
                f"{source.name}: key {alias!r} is a second copy of {primary!r} but differs from it; the checkpoint "
                "is inconsistent (which copy did training update?)."
            )


def materialize(
    plan: ConversionPlan, dtype: torch.dtype | None = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Read every planned tensor, one at a time, in the target dtype (floating-point tensors only)."""
    verify_aliases(plan)
    out: dict[str, torch.Tensor] = {}
    for target, item in tqdm(plan.tensors.items(), desc="Converting tensors", unit="tensor", disable=not progress):
        tensor = item.source.load(item.key)
        if not tensor.is_floating_point():  # every weight of the model is
            raise ConversionError(
                f"{item.source.name}: key {item.key!r} is a {tensor.dtype} tensor; {target} is a floating-point weight."
            )
        if item.part is not None:
            index, count = item.part
            tensor = tensor.chunk(count, dim=0)[index]
        if item.fit_rows:
            tensor = _fit_rows(tensor, item.shape[0])
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if not _owns_storage(tensor):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tuple(tensor.shape) != item.shape:  # the files changed under us, or a header lied
            raise ConversionError(
                f"{item.source.name}: key {item.key!r} read as {tuple(tensor.shape)}, expected {item.shape}."
            )
        out[target] = tensor
    return out


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Assign the tensors to the (meta) model without copying, tie the embeddings, and check nothing is left empty."""
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ConversionError(f"No input provided {len(empty)} parameters of the model, e.g. {empty[:4]}.")


# ====================================================================================================================
# The whole conversion
# ====================================================================================================================


@dataclass
class ConvertedModel:
    """A converted model in memory, with its processor and what the conversion did."""

    model: OpenFlamingoForConditionalGeneration
    processor: OpenFlamingoProcessor
    inputs: ConversionInputs
    plan: ConversionPlan
    dtype: torch.dtype


def build_converted_model(
    inputs: ConversionInputs, dtype: torch.dtype | str | None = None, progress: bool = True
) -> ConvertedModel:
    """Plan, check, and load the model from resolved inputs (see `resolve_inputs`)."""
    dtype = _checked_dtype(dtype)
    tok = inputs.tokenizer
    config = make_config(
        inputs.lm_config,
        inputs.vision.config,
        inputs.cross_attn_every_n_layers,
        tokenizer_length=len(tok),
        media_token_id=tok.convert_tokens_to_ids("<image>"),
        eoc_token_id=tok.convert_tokens_to_ids("<|endofchunk|>"),
        pad_token_id=tok.pad_token_id,
    )
    model = build_empty_model(config)
    layout = model_layout(model)
    plan = plan_conversion(
        layout, inputs.lm_family, inputs.checkpoint, inputs.lm, inputs.vision, lm_origin=inputs.lm_origin
    )
    for key in plan.invented_rows:
        warnings.warn(
            f"{key}: the rows of the {config.text_config.vocab_size - inputs.lm.shapes[plan.tensors[key].key][0]} "
            "added tokens exist in no input (not in the checkpoint, not in the LM); each was set to the mean of the "
            "LM's rows (documented in the model card).",
            stacklevel=2,
        )
    target_dtype = dtype or inputs.checkpoint.floating_dtype() or torch.float32
    load_into(model, materialize(plan, target_dtype, progress))
    # The sub-configs keep the dtype of their sources (the LM's config.json says float32); transformers 4.x builds
    # each sub-model in its sub-config's dtype where one is set, so theirs are unset: every part is in the model's.
    config.dtype = target_dtype
    for sub_config in (config.text_config, config.vision_config):
        sub_config.dtype = None
    model.eval()
    model.generation_config = default_generation_config(config, tok)
    processor = OpenFlamingoProcessor(
        image_processor=OpenFlamingoImageProcessor(size=inputs.vision.config.image_size), tokenizer=tok
    )
    return ConvertedModel(model, processor, inputs, plan, target_dtype)


def default_generation_config(config: OpenFlamingoConfig, tokenizer: Any = None) -> GenerationConfig:
    """Generation defaults of the original: stop at `<|endofchunk|>`, pad with `<PAD>`."""
    return GenerationConfig(
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=config.eoc_token_id,
        pad_token_id=config.pad_token_id,
    )


def convert_openflamingo_checkpoint(
    checkpoint: str | os.PathLike | None = None,
    lm: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    open_clip_config: str | os.PathLike | None = None,
    open_clip_weights: str | os.PathLike | None = None,
    cross_attn_every_n_layers: int | None = None,
    output_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    *,
    preset: str | Preset | None = None,
    vision: str | os.PathLike | None = None,
    quick_gelu: bool | None = None,
    max_shard_size: str | int = "5GB",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    repo_id: str | None = None,
) -> Path:
    """Convert the original parts into a `save_pretrained` folder (model, processor, generation config, model card).

    Each part is a local path or a hub id; a `preset` (one of the six released models) fills in the parts it knows.
    The folder is written to a temporary sibling and moved into place at the end (an existing empty folder is filled in
    place: [`save_atomically`]): a failed conversion leaves nothing.
    `repo_id` (where the folder will be published) is only used in the model card's usage snippet. Returns the output
    folder.
    """
    if output_dir is None:
        raise ConversionError("output_dir is required.")
    dtype = _checked_dtype(dtype)
    output_dir = Path(output_dir).expanduser().resolve()  # a symlink: its target is the folder written
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file; the output is a folder: pass another path.")
    replaces = output_dir.exists() and not _is_empty_folder(output_dir)
    if replaces:
        if not overwrite:
            raise FileExistsError(f"{output_dir} exists and is not empty (pass overwrite=True / --overwrite).")
        _check_replaceable(output_dir, [checkpoint, lm, tokenizer, open_clip_config, open_clip_weights, vision])
    _check_not_the_working_directory(output_dir)  # before anything is read (also checked when the folder is moved)
    _check_writable_location(output_dir)
    with _progress_shown(progress):  # (the input files are read, and checked, here)
        inputs = resolve_inputs(
            preset=preset,
            checkpoint=checkpoint,
            lm=lm,
            tokenizer=tokenizer,
            vision=vision,
            open_clip_config=open_clip_config,
            open_clip_weights=open_clip_weights,
            cross_attn_every_n_layers=cross_attn_every_n_layers,
            quick_gelu=quick_gelu,
            cache_dir=cache_dir,
        )
    converted = build_converted_model(inputs, dtype, progress)
    card, license_text = render_model_card(converted, repo_id=repo_id), render_license(converted)

    def write(tmp: Path) -> None:
        converted.model.save_pretrained(tmp, max_shard_size=max_shard_size)
        converted.processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        (tmp / LICENSE_FILE).write_text(license_text)

    # only the earlier conversion checked above is replaced: a folder that appears meanwhile is kept
    return save_atomically(output_dir, write, overwrite=overwrite and replaces)


def raise_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise `SystemExit` (in the main thread), so that a conversion stopped by them removes its
    temporary folder as it does on Ctrl-C, instead of dying with it half-written next to the output."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda signum, frame: sys.exit(128 + signum))


def quiet_libraries() -> None:
    """No progress bars from transformers (shard writing) and huggingface_hub (downloads, uploads) either."""
    import huggingface_hub
    from transformers.utils import logging as transformers_logging

    huggingface_hub.utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def _nearest_existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _remove(path: Path, missing_ok: bool = False) -> None:
    """Delete a file, a link or a folder tree."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=missing_ok)


def _is_fill_leftover(path: Path) -> bool:
    """What an in-place fill stopped by SIGKILL leaves: its hidden `.tmp-XXXXXXXX` folder ([`_fill_in_place`])."""
    return re.fullmatch(r"\.tmp-[0-9a-f]{8}", path.name) is not None and path.is_dir() and not path.is_symlink()


def _is_empty_folder(path: Path) -> bool:
    """An existing folder (not a link to one) that holds nothing but a new volume's `lost+found` and the leftovers of a
    stopped in-place fill: [`save_atomically`] fills it where it is."""
    return (
        path.is_dir()
        and not path.is_symlink()
        and all(entry.name == "lost+found" or _is_fill_leftover(entry) for entry in path.iterdir())
    )


def _checked_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The output dtype of a conversion: a floating-point torch dtype or its name ("bfloat16", "torch.float16"), or
    None for the stored one; anything else is refused before any input is read."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(named, torch.dtype) and named.is_floating_point:
            return named
    raise ConversionError(
        f"dtype={dtype!r}: the converted weights take a floating-point dtype (torch.float32, torch.bfloat16, "
        "torch.float16, or its name), or None for the checkpoint's own."
    )


def _check_writable_location(output: Path) -> None:
    """Whether `output` can be made where it is asked for: checked before anything is read or converted (the parent
    folders are made only at the end). Its nearest existing ancestor must be a folder this process may write in; an
    existing empty folder is filled in place (it may be a mount point, in a parent that is not writable), so it must
    be writable itself."""
    if _is_empty_folder(output):
        if not os.access(output, os.W_OK | os.X_OK):
            raise ConversionError(f"No permission to write in {output}.")
        return
    ancestor = _nearest_existing(output.absolute().parent)
    if not ancestor.is_dir():
        raise ConversionError(f"{ancestor} is a file, so {output} cannot be made under it. Choose another output path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConversionError(f"No permission to write in {ancestor}, where {output} would be made.")


def _check_replaceable(output_dir: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    """`--overwrite` replaces an earlier conversion, nothing else: not a folder of other files, not an input."""
    config = output_dir / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if output_dir.is_dir() else None
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "openflamingo":
        raise ConversionError(
            f"{output_dir} is not an earlier conversion (no config.json with model_type 'openflamingo'): "
            "--overwrite does not delete it. Choose another output folder, or empty it yourself."
        )
    for path in inputs:
        if path is not None and hub.is_local(path) and Path(path).expanduser().resolve().is_relative_to(output_dir):
            raise ConversionError(f"{path} is an input of this conversion and lies in {output_dir}, which it replaces.")
    others = sorted(entry.name for entry in output_dir.iterdir() if not _written_by_a_conversion(entry))
    if others:
        raise ConversionError(
            f"{output_dir} holds what a conversion does not write ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): --overwrite replaces an earlier conversion and nothing else. "
            "Move those out, or convert into another folder and copy the files over (e.g. into a git clone of a hub "
            "repository)."
        )


# What a conversion writes, by name: the weights, the config, generation, processor and tokenizer files (under the names
# transformers saves them), the model card and its LICENSE.md, and the modeling code (`_code_files()`;
# `__pycache__` when it was imported from the folder). Any other file (notes.txt, eval_results.json, a train.py) is the
# user's: `--overwrite` refuses to delete it.
_CONVERSION_FILE = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|(generation_|processor_|preprocessor_|tokenizer_)?config\.json|tokenizer\.json|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|(tokenizer|spiece|sentencepiece\.bpe)\.model"
    r"|chat_template\.(jinja|json)|[^/]*\.tiktoken|README\.md|" + re.escape(LICENSE_FILE)
)


@functools.cache
def _code_files() -> frozenset[str]:
    """The modeling code a conversion writes: transformers copies the modules of the classes registered for the auto
    classes and what they import relatively (not every module of this package: a `data_collator.py` or
    `optimization.py` in the folder is the user's)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    classes = (
        OpenFlamingoConfig,
        OpenFlamingoForConditionalGeneration,
        OpenFlamingoImageProcessor,
        OpenFlamingoProcessor,
    )
    modules = {sys.modules[cls.__module__].__file__ for cls in classes}
    return frozenset(Path(path).name for module in modules for path in (module, *get_relative_import_files(module)))


def _written_by_a_conversion(entry: Path) -> bool:
    if entry.name.startswith("."):
        return False
    if entry.is_dir() and not entry.is_symlink():
        return entry.name == "__pycache__"
    return entry.name in _code_files() or _CONVERSION_FILE.fullmatch(entry.name) is not None


def _unused_sibling(path: Path, tag: str) -> Path:
    """A new name next to `path`: `.NAME.TAG-XXXXXXXX`."""
    while True:
        candidate = path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")
        if not candidate.exists():
            return candidate


def _mode_by_umask(path: Path, mode: int) -> None:
    """`mode` as the process's umask leaves it (temporary files and folders are made owner-only)."""
    umask = os.umask(0o022)
    os.umask(umask)
    path.chmod(mode & ~umask)


def _check_not_the_working_directory(output_dir: Path) -> None:
    """An output folder that is (or holds) the working directory would be replaced by a new folder: refused (an empty
    one is filled in place instead)."""
    if (
        output_dir.exists()
        and not _is_empty_folder(output_dir)
        and Path.cwd().resolve().is_relative_to(output_dir.resolve())
    ):
        raise ConversionError(
            f"{output_dir} is the working directory (or holds it): it would be replaced by a new folder, leaving "
            "this process and your shell in a deleted one. Pass a path that does not hold the working directory."
        )


def _write_failed(target: Path, error: Exception) -> ConversionError:
    """The error for a write into `target` that failed midway (a full disk, a file-size limit, a lost mount), with its
    reason and the space left: the libraries that write raise their own types (safetensors' `SafetensorError`,
    torch's `RuntimeError`) with the system's reason somewhere in the text, or none."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
    no_room = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
        sign in str(error) for sign in ("No space left", "Disk quota exceeded", "File too large", "unexpected pos")
    )  # ("unexpected pos": torch's writer, which keeps the system's reason to itself)
    if not no_room:
        return ConversionError(f"Writing {target} failed ({type(error).__name__}: {reason}). {_NOTHING_LEFT}.")
    try:
        free = f"; {shutil.disk_usage(_nearest_existing(target)).free / 1e9:.2f} GB free there now"
    except OSError:
        free = ""
    return ConversionError(
        f"Writing {target} failed ({type(error).__name__}: {reason}){free}. {_NOTHING_LEFT}; make room "
        "(or raise the file-size limit, `ulimit -f`) and run again."
    )


_NOTHING_LEFT = "Nothing was left in its place"


def _name_leftovers(error: BaseException, leftovers: Iterable[Path]) -> None:
    """After the clean-up of a failed write, whose caller then re-raises `error`: if some of `leftovers` stayed (its
    file system turned read-only or went away), name them: a failure raises a ConversionError instead (its message
    said that nothing was left), an interruption (Ctrl-C, SIGTERM) gets a note."""
    left = [str(path) for path in leftovers if path.exists() or path.is_symlink()]
    if not left:
        return
    said = f"Its partial files could not be removed: delete {', '.join(left)} yourself"
    if not isinstance(error, Exception):
        if hasattr(error, "add_note"):
            error.add_note(said + ".")
        else:  # Python 3.10 has no notes (an AttributeError here replaced the interruption); its args are its own
            print(f"{type(error).__name__}: {said}.", file=sys.stderr)  # (SystemExit's are the exit status)
        return
    text = str(error) if isinstance(error, ConversionError) else f"{type(error).__name__}: {_first_line(error)}"
    raise ConversionError(text.replace(_NOTHING_LEFT, said) if _NOTHING_LEFT in text else f"{text} {said}.") from error


def _write_into(tmp: Path, output_dir: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)`, its failures named after `output_dir`, and the files given the modes the user's own would have."""
    try:
        write(tmp)
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the output named
        raise _write_failed(output_dir, error) from error
    # as if the user had written them: transformers (5.x) writes the weights through an owner-only temporary file
    for path in tmp.rglob("*"):
        if not path.is_symlink():
            _mode_by_umask(path, 0o777 if path.is_dir() or path.stat().st_mode & 0o100 else 0o666)


def _fill_in_place(output_dir: Path, write: Callable[[Path], Any]) -> Path:
    """[`save_atomically`] into an existing empty folder: written into a hidden folder inside it, then moved up."""
    for leftover in filter(_is_fill_leftover, output_dir.iterdir()):  # of a fill stopped by SIGKILL
        shutil.rmtree(leftover)
    tmp = output_dir / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    moved = []
    try:
        _write_into(tmp, output_dir, write)
        others = sorted(path.name for path in output_dir.iterdir() if path != tmp and path.name != "lost+found")
        if others:
            raise ConversionError(f"{output_dir} was empty, but now holds {', '.join(others)}: nothing was written.")
        for entry in sorted(tmp.iterdir(), key=lambda path: path.name == "config.json"):  # config.json last
            os.replace(entry, output_dir / entry.name)
            moved.append(output_dir / entry.name)
        tmp.rmdir()
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        for path in moved:  # empty again, as it was
            with contextlib.suppress(OSError):  # (named below if it stays)
                _remove(path, missing_ok=True)
        _name_leftovers(error, [tmp, *moved])
        raise
    return output_dir


def _make_parents(path: Path) -> list[Path]:
    """Make the missing folders above `path`; returns those it made, the deepest first (for `_remove_made`)."""
    made = [parent for parent in path.parents if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_made(folders: list[Path]) -> None:
    """Remove the folders `_make_parents` made, if they are still empty (a failed write leaves nothing behind)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def save_atomically(output_dir: str | os.PathLike, write: Callable[[Path], Any], overwrite: bool = True) -> Path:
    """Run `write(tmp_dir)` into a temporary sibling of `output_dir`, then move it into place.

    An existing `output_dir` is moved aside first and deleted only once the new folder is in place, so an interruption
    leaves the old folder or the new one (and at worst a hidden `.NAME.old-*` / `.NAME.tmp-*` sibling), never neither.
    An existing empty `output_dir` (e.g. a mounted volume, which cannot be moved) is kept: the temporary folder is
    made inside it and its files are moved up at the end, `config.json` last, so that until the end the folder holds
    no loadable model; a failure leaves it empty again.
    """
    output_dir = Path(output_dir).absolute()
    if _is_empty_folder(output_dir):
        return _fill_in_place(output_dir, write)
    _check_not_the_working_directory(output_dir)
    made = _make_parents(output_dir)
    tmp = _unused_sibling(output_dir, "tmp")
    old = None
    try:
        tmp.mkdir()  # with the umask's permissions, as any folder the user makes
        _write_into(tmp, output_dir, write)
        if not overwrite and (output_dir.exists() or output_dir.is_symlink()):
            raise FileExistsError(
                f"{output_dir} appeared while converting; not replaced (--overwrite replaces only an earlier "
                "conversion that was there at the start)."
            )
        if output_dir.exists() or output_dir.is_symlink():
            old = _unused_sibling(output_dir, "old")
            os.replace(output_dir, old)
        try:
            os.replace(tmp, output_dir)
        except BaseException:
            if old is not None:
                os.replace(old, output_dir)
                old = None
            raise
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        _name_leftovers(error, [tmp])
        raise
    if old is not None:
        try:
            _remove(old)
        except (KeyboardInterrupt, SystemExit):  # stopped while deleting the old folder: the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            raise
    return output_dir


# ====================================================================================================================
# Dry run: the full-size model on the meta device, every key and shape checked, nothing downloaded
# ====================================================================================================================


def released_checkpoint_manifest(layout: ModelLayout, family: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of `checkpoint.pt` in the released format that the model needs."""
    manifest = {}
    for key in layout.required:
        original = native_key_to_checkpoint(key, family)
        if original is None:
            continue
        if in_released_checkpoint(original, family):
            manifest[original] = layout.shapes[key]
    return manifest


def lm_manifest(layout: ModelLayout, family: str, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The keys and shapes the LM's own hub checkpoint has (embedding matrices with the LM's own vocabulary)."""
    manifest = {}
    for key in layout.required:
        if not key.startswith("language_model."):
            continue
        original = lm_key_to_original(key[len("language_model.") :], family)
        if original is None:
            continue
        shape = layout.shapes[key]
        manifest[original] = (vocab_size, *shape[1:]) if key in layout.embedding_keys else shape
    return manifest


def open_clip_manifest(layout: ModelLayout) -> dict[str, tuple[int, ...]]:
    """The visual keys and shapes of open_clip weights for the model's vision tower (fused q/k/v concatenated)."""
    manifest: dict[str, tuple[int, ...]] = {}
    for key in layout.required:
        if not key.startswith(layout.vision_prefix):
            continue
        original = unmap_key(key[len(layout.vision_prefix) :], OPEN_CLIP_KEY_RULES)
        if isinstance(original, tuple):
            name, _, count = original
            shape = layout.shapes[key]
            manifest["visual." + name] = (shape[0] * count, *shape[1:])
        elif original is not None:
            manifest["visual." + original] = layout.shapes[key]
    return manifest


@dataclass
class DryRunReport:
    """What a dry run checked."""

    config: OpenFlamingoConfig
    layout: ModelLayout
    plan: ConversionPlan
    checkpoint_manifest: dict[str, tuple[int, ...]]
    checked_file: str | None
    num_parameters: int
    preset: Preset | None
    checked_keys: frozenset[str] = frozenset()  # the manifest's keys that the checked file holds

    @property
    def checked_present(self) -> int:
        return len(self.checked_keys)

    def summary(self) -> str:
        """A human-readable report."""
        name = self.preset.name if self.preset else "custom"
        lines = [
            f"Dry run ({name}): the full-size model was built on the meta device and every key and shape checked.",
            f"  parameters: {self.num_parameters / 1e9:.2f}B ({self.num_parameters:,})",
            f"  language model: {self.config.text_config.model_type}, {self.config.text_config.num_hidden_layers} "
            f"layers, vocabulary {self.config.text_config.vocab_size}",
            f"  gated cross-attention before layers {self.config.cross_attn_layer_indices} "
            f"(every {self.config.cross_attn_every_n_layers})",
            f"  checkpoint.pt must hold {len(self.checkpoint_manifest)} tensors"
            + (
                f"; {self.checked_file} holds {self.checked_present}" if self.checked_file else " (the released format)"
            ),
        ]
        if self.checked_file and self.checked_present < len(self.checkpoint_manifest):
            absent = [k for k in self.checkpoint_manifest if k not in self.checked_keys]
            lines.append(
                f"  absent from it, taken from the other inputs: {absent[:4]}" + (" ..." if absent[4:] else "")
            )
        for source, count in self.plan.counts().items():
            lines.append(f"  {count:5d} tensors from {source}")
        for key in self.plan.invented_rows:
            lines.append(f"  note: {key}: the added tokens' rows exist in no input; they will be the mean row")
        return "\n".join(lines)


def _config_checkpoint_manifest(config: OpenFlamingoConfig, family: str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the released `checkpoint.pt` of a model of `config` (built empty)."""
    return released_checkpoint_manifest(model_layout(build_empty_model(config)), family)


def _preset_checkpoint_manifest(preset: Preset) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of `preset`'s released `checkpoint.pt`, from its own (embedded) parts."""
    lm_config, family = lm_config_from_dict(dict(preset.lm_config), f"{preset.name} (embedded LM config)")
    config = make_config(
        lm_config, CLIPVisionConfig(**VIT_L_14_CONFIG), preset.cross_attn_every_n_layers, **preset.tokens
    )
    return _config_checkpoint_manifest(config, family)


def dry_run(
    preset: str | Preset | None = None,
    checkpoint: str | os.PathLike | TensorSource | None = None,
    lm: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    vision_config: CLIPVisionConfig | str | os.PathLike | None = None,
    cross_attn_every_n_layers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DryRunReport:
    """Build the full-size model on the meta device and check every key and shape a conversion will need.

    Configs come from the preset (embedded; nothing is downloaded) unless overridden: `lm` (a folder, or a hub id of
    which only `config.json` is fetched) and `tokenizer` (tokenizer files only). `checkpoint`, if a local file (or a
    `TensorSource`, e.g. a manifest of shapes), is checked itself (memory-mapped: no tensor is read); otherwise the
    documented released format is checked. `vision_config` is a `CLIPVisionConfig` or an open_clip config file
    (default: the released models' CLIP ViT-L/14).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset is None and lm is None:
        raise ConversionError("A dry run needs --preset, or --lm (a folder or hub id with the LM's config.json).")
    if lm is not None and (preset is None or str(lm) != preset.lm):
        config_path = hub.resolve_file(lm, "config.json", "language model config", cache_dir)
        raw = _read_json(config_path, "language model config")
        lm_config, family = lm_config_from_dict(raw, config_path)
    else:
        raw = dict(preset.lm_config)
        lm_config, family = lm_config_from_dict(raw, f"{preset.name} (embedded LM config)")
    if tokenizer is not None or preset is None:
        tok = load_tokenizer(tokenizer or lm, cache_dir)
        tokens = {
            "tokenizer_length": len(tok),
            "media_token_id": tok.convert_tokens_to_ids("<image>"),
            "eoc_token_id": tok.convert_tokens_to_ids("<|endofchunk|>"),
            "pad_token_id": tok.pad_token_id,
        }
    else:
        tokens = dict(preset.tokens)
    n = cross_attn_every_n_layers or (preset.cross_attn_every_n_layers if preset else None)
    given_checkpoint = None
    if isinstance(checkpoint, TensorSource):
        given_checkpoint = checkpoint
    elif checkpoint is not None and hub.is_local(checkpoint):
        # only the index is read (the data stays memory-mapped and unread): no CRC-32 pass
        given_checkpoint = torch_file_source(
            hub.resolve_file(checkpoint, CHECKPOINT_FILENAME, "checkpoint"), verify=False
        )
    if n is None:
        if given_checkpoint is None:
            raise ConversionError("Without --preset, pass --cross-attn-every-n-layers, or a local --checkpoint.")
        n = infer_cross_attn_every_n_layers(given_checkpoint)
    default_vision = vision_config is None
    if vision_config is None:
        vision_config = CLIPVisionConfig(**VIT_L_14_CONFIG)
    elif not isinstance(vision_config, CLIPVisionConfig):
        path = hub.resolve_file(vision_config, "open_clip_config.json", "open_clip config", cache_dir)
        vision_config = open_clip_vision_config(_read_json(path, "open_clip config"))
    config = make_config(lm_config, vision_config, n, **tokens)
    model = build_empty_model(config)
    layout = model_layout(model)
    manifest = released_checkpoint_manifest(layout, family)
    checked = None
    if given_checkpoint is not None:
        checkpoint_source, checked = given_checkpoint, given_checkpoint.name
    elif preset is not None:
        # the preset's released checkpoint, whose format the preset's own parts give: the overridden parts (LM,
        # tokenizer, N, vision width) must fit it, as they must fit the file in a real conversion
        overridden = (
            (lm is not None and str(lm) != preset.lm)
            or tokenizer is not None
            or n != preset.cross_attn_every_n_layers
            or not default_vision
        )
        released = _preset_checkpoint_manifest(preset) if overridden else manifest
        checkpoint_source = TensorSource.from_manifest(f"{preset.checkpoint} (released format)", released)
    else:
        checkpoint_source = TensorSource.from_manifest("checkpoint (the format of these parts)", manifest)
    lm_source = TensorSource.from_manifest(
        f"{lm or preset.lm or preset.lm_title} (config)", lm_manifest(layout, family, int(raw["vocab_size"]))
    )
    vision_source = TensorSource.from_manifest("vision tower (open_clip layout)", open_clip_manifest(layout))
    plan = plan_conversion(layout, family, checkpoint_source, lm_source, vision_source, OPEN_CLIP_KEY_RULES)
    num_parameters = sum(p.numel() for p in model.parameters())  # (each tied parameter once)
    held = {checkpoint_alias_primary(k, family) or k for k in checkpoint_source.keys()} if checked else set()
    present = frozenset(k for k in manifest if k in held)
    return DryRunReport(config, layout, plan, manifest, checked, num_parameters, preset, present)


# ====================================================================================================================
# Back to the original: checkpoint.pt from a model of ours
# ====================================================================================================================


def lm_family_of(config: OpenFlamingoConfig | Mapping[str, Any]) -> str:
    """The original LM family of a model of ours (MosaicGPT is the MPT config with QK-LayerNorm)."""
    text = config.get("text_config") if isinstance(config, Mapping) else config.text_config.to_dict()
    if not isinstance(text, Mapping):
        raise ConversionError(
            "The model config has no text_config (the language model's config): is it an OpenFlamingo config?"
        )
    model_type = text.get("model_type")
    if model_type == "mpt":
        if text.get("original_model_type") in ("mpt", "mosaic_gpt"):
            return text["original_model_type"]  # (recorded by the conversion where QK-LayerNorm would mislead)
        attn = text.get("attn_config") or {}
        attn = attn if isinstance(attn, Mapping) else attn.to_dict()
        return "mosaic_gpt" if attn.get("qk_ln") else "mpt"
    if model_type not in LM_FAMILIES:
        raise ConversionError(f"text_config.model_type={model_type!r}: no original layout is known for it.")
    return model_type


# What only an unmerged PEFT model's weights are named: LoRA's `lora_*`, the `base_layer` that every PEFT tuner layer
# (LoRA, IA3, LoHa, LoKr, ...) wraps, `modules_to_save`' copies, a trainable-tokens adapter, a `PeftModel`'s prefix.
_PEFT_KEY = re.compile(
    r"(^|\.)(lora_\w+|base_layer|modules_to_save|original_module|token_adapter)\.|^base_model\.model\."
)


def _is_peft_key(key: str) -> bool:
    return _PEFT_KEY.search(key) is not None


def export_openflamingo_state_dict(
    state_dict: Mapping[str, torch.Tensor] | TensorSource,
    config: OpenFlamingoConfig | Mapping[str, Any],
    include_lm: bool = False,
    include_vision: bool = False,
    v1_duplicates: bool = False,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Our state dict in the original's `checkpoint.pt` format, with the original's exact key names.

    By default, what the released checkpoints hold (the original's `filter_state_dict_to_trainable`): the perceiver,
    the gated blocks and the LM parameters whose name contains "embed". `include_lm` adds every LM weight and
    `include_vision` the vision tower (`vision_encoder.*`, open_clip names), in the layout of the original's full
    state dict; `v1_duplicates` adds the second copies of the gated blocks that the v1 (LLaMA) release holds.
    """
    dtype = _checked_dtype(dtype)
    source = state_dict if isinstance(state_dict, TensorSource) else TensorSource.from_state_dict("model", state_dict)
    family = lm_family_of(config)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}

    def put(name: str, key: str, tensor: torch.Tensor) -> None:
        if name in out:
            raise ConversionError(f"{source.name}: keys {origin[name]!r} and {key!r} both map to {name!r}.")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name], origin[name] = tensor.contiguous() if _owns_storage(tensor) else tensor.clone(), key

    for key in tqdm(source.keys(), desc="Exporting tensors", unit="tensor", disable=not progress):
        if key.startswith("new_token_embeddings."):
            raise ConversionError(
                f"{source.name}: key {key!r} holds the rows trained after freeze_for_training(); fold them into the "
                "embedding matrix first (model.merge_new_token_embeddings()), or pass the model itself."
            )
        if _is_peft_key(key):
            raise ConversionError(
                f"{source.name}: key {key!r} belongs to an unmerged PEFT adapter; merge the adapter first "
                "(model = model.merge_and_unload()) and save the merged model."
            )
        vision_prefix = next((p for p in ("vision_model.vision_model.", "vision_model.") if key.startswith(p)), None)
        if vision_prefix is not None:
            if not include_vision:
                continue
            original = unmap_key(key[len(vision_prefix) :], OPEN_CLIP_KEY_RULES)
            if original is None:
                continue
            if isinstance(original, tuple):
                name, index, count = original
                parts = fused.setdefault(name, [None] * count)
                parts[index] = source.load(key)
                if all(p is not None for p in parts):
                    put(_CHECKPOINT_VISION_PREFIX + name, key, torch.cat(parts, dim=0))
                    del fused[name]
            else:
                put(_CHECKPOINT_VISION_PREFIX + original, key, source.load(key))
            continue
        name = native_key_to_checkpoint(key, family)
        if name is None:
            continue
        if not include_lm and not in_released_checkpoint(name, family):
            continue
        put(name, key, source.load(key))
    if fused:
        raise ConversionError(f"{source.name}: incomplete fused vision tensors {sorted(fused)}.")
    _check_released_format(out, config, family, source.name)
    if v1_duplicates:
        for name in [n for n in out if ".gated_cross_attn_layer." in n]:
            alias = unmap_key(name, _alias_rules(family))
            if isinstance(alias, str) and alias != name:
                out[alias] = out[name]
    return out


def _check_released_format(
    exported: Mapping[str, torch.Tensor], config: OpenFlamingoConfig | Mapping[str, Any], family: str, name: str
) -> None:
    """The export holds every tensor of the released format that the config's model has, in its shape, and nothing of
    ours that the original's model lacks: the original loads it with `load_state_dict(..., strict=False)`, which
    would keep a missing tensor (the Perceiver, a gated block, the trained embedding rows) at its random or untrained
    value without a word."""
    if isinstance(config, Mapping):
        try:
            config = OpenFlamingoConfig.from_dict(dict(config))
        except Exception as error:  # noqa: BLE001 - the folder's config cannot be built
            raise ConversionError(f"{name}: its config cannot be read: {_first_line(error)}") from error
    manifest = _config_checkpoint_manifest(config, family)
    missing = [key for key in manifest if key not in exported]
    if missing:
        raise ConversionError(
            f"{name}: lacks {len(missing)} tensors of the released checkpoint format that the model's config needs, "
            f"e.g. {missing[:4]}; the original would keep them untrained (strict=False). Are the weights whole, and "
            "the config (e.g. cross_attn_every_n_layers) the one they were saved with?"
        )
    for key, shape in manifest.items():
        if tuple(exported[key].shape) != shape:
            raise ConversionError(
                f"{name}: {key!r} has shape {tuple(exported[key].shape)} but the model's config needs {shape}."
            )
    ours = ("lang_encoder.", _CHECKPOINT_VISION_PREFIX)  # (the LM's and the vision tower's, which --include-* add)
    foreign = [k for k in exported if not k.startswith(ours) and k not in manifest]
    if foreign:
        raise ConversionError(f"{name}: keys {foreign[:4]} have no place in the original's model.")


def convert_hf_to_openflamingo(
    model: str | os.PathLike | nn.Module,
    output_file: str | os.PathLike,
    include_lm: bool = False,
    include_vision: bool = False,
    v1_duplicates: bool = False,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write `checkpoint.pt` in the released format from a model of ours (a folder, a hub id, or a loaded model).

    The file is a plain `torch.save`d dict of tensors that the original's `model.load_state_dict(..., strict=False)`
    reads. It is written to a temporary file and renamed into place.
    """
    dtype = _checked_dtype(dtype)
    output_file = Path(output_file).expanduser()
    if output_file.is_dir():
        raise ConversionError(
            f"{output_file} is a folder; the output is the checkpoint file to write (e.g. checkpoint.pt)."
        )
    if (output_file.exists() or output_file.is_symlink()) and not overwrite:
        raise FileExistsError(f"{output_file} exists (pass overwrite=True / --overwrite).")
    _check_writable_location(output_file)
    if (
        output_file.exists()
        and not isinstance(model, nn.Module)
        and hub.is_local(model)
        and output_file.resolve().is_relative_to(Path(model).expanduser().resolve())
    ):
        raise ConversionError(
            f"{output_file} is a file of {model}, the model this conversion reads: --overwrite does not replace it."
        )
    if isinstance(model, nn.Module):
        peft_configs = getattr(model, "peft_config", None)  # a PeftModel, or a model with adapters loaded
        prompts = [name for name, c in (peft_configs or {}).items() if getattr(c, "is_prompt_learning", False)]
        if prompts:
            raise ConversionError(
                f"{type(model).__name__} has prompt-learning adapters ({', '.join(prompts)}: prompt / prefix / "
                "p-tuning), whose virtual tokens have no place in the original's checkpoint and cannot be merged; "
                "export model.get_base_model() to leave them out."
            )
        config: Any = model.config
        # the rows trained after `freeze_for_training()` folded into the embedding matrix, as `save_pretrained` does
        fold = getattr(model, "_fold_new_token_embeddings", None)
        source = TensorSource.from_state_dict(type(model).__name__, fold(None) if fold else model.state_dict())
    else:
        if hub.is_local(model) and (Path(model).expanduser() / "adapter_config.json").is_file():
            raise ConversionError(
                f"{model} is a PEFT adapter folder (adapter_config.json); merge the adapter first "
                "(base.freeze_for_training() if it was trained with it, then "
                "model = PeftModel.from_pretrained(base, adapter).merge_and_unload()) and save the merged model."
            )
        folder = hub.resolve_folder(model, "model", lambda fs: ["config.json", *hf_weight_files(fs)], cache_dir)
        config = _read_json(folder / "config.json", "model config")
        if config.get("model_type") != "openflamingo":
            raise ConversionError(
                f"{folder / 'config.json'}: model_type={config.get('model_type')!r}, not openflamingo."
            )
        with _progress_shown(progress):  # (torch files are read, and checked, here)
            source = hf_folder_source(folder)
    state = export_openflamingo_state_dict(
        source, config, include_lm, include_vision, v1_duplicates, dtype, progress=progress
    )
    made = _make_parents(output_file)
    try:
        handle, tmp = tempfile.mkstemp(prefix=f".{output_file.name}.tmp-", dir=output_file.parent)
    except BaseException:
        _remove_made(made)
        raise
    os.close(handle)
    try:
        try:
            torch.save(state, tmp)
        except Exception as error:  # noqa: BLE001 - re-raised with the output named
            raise _write_failed(output_file, error) from error
        _mode_by_umask(Path(tmp), 0o666)  # mkstemp makes it owner-only
        _move_into_place(Path(tmp), output_file, overwrite)
    except BaseException as error:
        with contextlib.suppress(OSError):  # (named below if it stays)
            Path(tmp).unlink(missing_ok=True)
        _remove_made(made)
        _name_leftovers(error, [Path(tmp)])
        raise
    return output_file


def _move_into_place(tmp: Path, output_file: Path, overwrite: bool) -> None:
    """Rename `tmp` to `output_file`; without `overwrite`, never over a file that appeared there since the start (a
    hard link fails if the name exists; where the file system has none, a check just before the rename)."""
    if not overwrite:
        try:
            os.link(tmp, output_file)
        except FileExistsError:
            appeared = True
        except OSError:  # no hard links here
            appeared = output_file.exists() or output_file.is_symlink()
        else:
            tmp.unlink()
            return
        if appeared:
            raise FileExistsError(
                f"{output_file} appeared while converting; not replaced (overwrite=True / --overwrite replaces it)."
            )
    os.replace(tmp, output_file)


__all__ = [
    "CHECKPOINT_ALIASES",
    "DECODER_LAYERS",
    "FLAMINGO_KEY_RULES",
    "INPUT_EMBEDDINGS",
    "LM_KEY_RULES",
    "OPEN_CLIP_KEY_RULES",
    "RELEASED_LM_KEYS_CONTAIN",
    "TRANSFORMERS_CLIP_KEY_RULES",
    "ConversionError",
    "ConversionInputs",
    "ConversionPlan",
    "ConvertedModel",
    "DryRunReport",
    "TensorSource",
    "build_converted_model",
    "build_empty_model",
    "checkpoint_key_to_native",
    "convert_hf_to_openflamingo",
    "convert_openflamingo_checkpoint",
    "dry_run",
    "preset_config",
    "export_openflamingo_state_dict",
    "load_torch_file",
    "map_key",
    "native_key_to_checkpoint",
    "plan_conversion",
    "quiet_libraries",
    "raise_on_termination",
    "resolve_inputs",
    "save_atomically",
    "unmap_key",
    "unwrap_checkpoint",
]
