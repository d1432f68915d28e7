"""Turning the original OpenFlamingo parts (LM folder, open_clip vision tower, `checkpoint.pt`) into our model.

Every renaming rule lives in the tables at the top of this file: one table per source, ordered regex rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, GenerationConfig, MptConfig, PretrainedConfig

from .configuration_openflamingo import OpenFlamingoConfig
from .image_processing_openflamingo import OpenFlamingoImageProcessor
from .modeling_openflamingo import OpenFlamingoForConditionalGeneration
from .processing_openflamingo import OpenFlamingoProcessor, add_openflamingo_tokens

Rules = list[tuple[str, str | None]]  # (regex, replacement); a None replacement drops the key

# ---- LM checkpoints (HF layout of the LM the original was built on) -> transformers' native names ----
LM_KEY_RULES: dict[str, Rules] = {
    # MosaicGPT (examples v0.0.4, OpenFlamingo-3B) -> transformers MPT, as llm-foundry's convert_examples_ckpt.py
    "mosaic_gpt": [
        (r"^transformer\.blocks\.(\d+)\.ln_1\.", r"transformer.blocks.\1.norm_1."),
        (r"^transformer\.blocks\.(\d+)\.ln_2\.", r"transformer.blocks.\1.norm_2."),
        (r"^transformer\.blocks\.(\d+)\.mlp\.mlp_up\.", r"transformer.blocks.\1.ffn.up_proj."),
        (r"^transformer\.blocks\.(\d+)\.mlp\.mlp_down\.", r"transformer.blocks.\1.ffn.down_proj."),
        (r"^transformer\.ln_f\.", "transformer.norm_f."),
    ],
    "mpt": [],
    # transformers renamed GPT-NeoX's `embed_out` to `lm_head` in 5.14; the target name is checked against the
    # model being built (see `_rename_to_model`), so both layouts load.
    "gpt_neox": [
        (r"\.attention\.(bias|masked_bias)$", None),
        (r"\.rotary_emb\.inv_freq$", None),
    ],
    "llama": [(r"\.rotary_emb\.inv_freq$", None)],
}
LM_FAMILIES = tuple(LM_KEY_RULES)

# ---- open_clip visual tower -> transformers' CLIP vision transformer (`CLIPVisionModel` minus its wrapper prefix) ----
OPEN_CLIP_KEY_RULES: Rules = [
    (r"^conv1\.weight$", "embeddings.patch_embedding.weight"),
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^ln_post\.", "post_layernorm."),
    (r"^proj$", None),  # the CLIP projection is not part of CLIPVisionModel (and OpenFlamingo does not use it)
    # in_proj_{weight,bias} are split into q/k/v by `_split_in_proj`
]

# ---- the released checkpoint.pt (perceiver + gated cross-attention + embeddings) -> our names ----
FLAMINGO_KEY_RULES: Rules = [
    (r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1.attn."),
    (r"^perceiver\.layers\.(\d+)\.1\.0\.", r"perceiver.layers.\1.ff.norm."),
    (r"^perceiver\.layers\.(\d+)\.1\.1\.", r"perceiver.layers.\1.ff.fc1."),
    (r"^perceiver\.layers\.(\d+)\.1\.3\.", r"perceiver.layers.\1.ff.fc2."),
    (r"^perceiver\.", "perceiver."),
    (r"^lang_encoder\.gated_cross_attn_layers\.", None),  # v1 duplicates of the blocks below
    (r"^lang_encoder\.old_decoder_blocks\.", None),
    (r"^lang_encoder\..+?\.(\d+)\.gated_cross_attn_layer\.ff\.0\.", r"gated_cross_attn_layers.\1.ff.norm."),
    (r"^lang_encoder\..+?\.(\d+)\.gated_cross_attn_layer\.ff\.1\.", r"gated_cross_attn_layers.\1.ff.fc1."),
    (r"^lang_encoder\..+?\.(\d+)\.gated_cross_attn_layer\.ff\.3\.", r"gated_cross_attn_layers.\1.ff.fc2."),
    (r"^lang_encoder\..+?\.(\d+)\.gated_cross_attn_layer\.", r"gated_cross_attn_layers.\1."),
    (r"^lang_encoder\.(.+?)\.(\d+)\.decoder_layer\.", r"lang_encoder.\1.\2."),  # unfiltered (full) state dicts
    (r"^vision_encoder\.", None),  # the vision tower comes from its own weights
]
CHECKPOINT_WRAPPER_PREFIXES = ("module.", "_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class ConversionError(ValueError):
    """A part that does not fit: names the file and the key."""


def apply_rules(key: str, rules: Rules) -> str | None:
    """Rename `key` by the first matching rule (None: drop it); keys no rule matches are kept as they are."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key, count=1)
    return key


# --------------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------------


def load_torch_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`torch.load(..., weights_only=True)` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise ConversionError(
                f"{path}: refused to unpickle it with weights_only=True (it needs code to load, which is unsafe): "
                f"{message}"
            ) from error
        raise ConversionError(
            f"{path}: cannot be read as a torch checkpoint (truncated or corrupt?): {message}"
        ) from error
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a dict of tensors, got {type(obj).__name__}.")
    return dict(obj)


def unwrap_checkpoint(state_dict: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept training checkpoints (`{"model_state_dict": ...}`) and DDP/FSDP/compile key prefixes."""
    if "model_state_dict" in state_dict and isinstance(state_dict["model_state_dict"], Mapping):
        state_dict = state_dict["model_state_dict"]
    out = {}
    for key, value in state_dict.items():
        for prefix in CHECKPOINT_WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
        out[key] = value
    return out


def load_lm_state_dict(lm_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LM weights of a HF model folder: safetensors (single or sharded) or pytorch_model*.bin."""
    from safetensors.torch import load_file

    lm_dir = Path(lm_dir)
    single_st, index_st = lm_dir / "model.safetensors", lm_dir / "model.safetensors.index.json"
    single_bin, index_bin = lm_dir / "pytorch_model.bin", lm_dir / "pytorch_model.bin.index.json"
    if single_st.is_file():
        return _load_safetensors(single_st, load_file)
    if index_st.is_file() or index_bin.is_file():
        index = index_st if index_st.is_file() else index_bin
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shards:
            shard_path = lm_dir / shard
            part = (
                _load_safetensors(shard_path, load_file)
                if shard.endswith(".safetensors")
                else load_torch_file(shard_path)
            )
            state_dict.update(part)
        return state_dict
    if single_bin.is_file():
        return load_torch_file(single_bin)
    raise FileNotFoundError(f"{lm_dir}: no model.safetensors, pytorch_model.bin or shard index found.")


def _load_safetensors(path: Path, load_file: Any) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        return load_file(str(path))
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ConversionError(f"{path}: cannot be read as safetensors (truncated or corrupt?): {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------------


def lm_config_from_folder(lm_dir: str | os.PathLike) -> tuple[PretrainedConfig, str]:
    """The LM's transformers config and its family (`mosaic_gpt`, `mpt`, `gpt_neox`, `llama`)."""
    config_path = Path(lm_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (the LM folder needs its config.json).")
    raw = json.loads(config_path.read_text())
    family = raw.get("model_type")
    if family not in LM_FAMILIES:
        raise ConversionError(
            f"{config_path}: unknown LM family model_type={family!r}; supported: {', '.join(LM_FAMILIES)}."
        )
    if family == "mosaic_gpt":
        return mosaic_gpt_to_mpt_config(raw, config_path), family
    return AutoConfig.from_pretrained(str(lm_dir)), family


def mosaic_gpt_to_mpt_config(raw: Mapping[str, Any], source: Any = "config.json") -> MptConfig:
    """MosaicGPT's config as transformers' `MptConfig` (QK-LayerNorm kept in `attn_config.qk_ln`)."""
    unsupported = {
        "alibi": (raw.get("alibi", True), True),
        "no_bias": (raw.get("no_bias", True), True),
        "prefix_lm": (raw.get("prefix_lm", False), False),
        "attn_uses_sequence_id": (raw.get("attn_uses_sequence_id", False), False),
        "logit_scale": (raw.get("logit_scale"), None),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ConversionError(f"{source}: MosaicGPT with {name}={value!r} is not supported (needs {needed!r}).")
    attn_pdrop = raw.get("attn_pdrop", 0)
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
            "attn_pdrop": int(attn_pdrop) if float(attn_pdrop).is_integer() else attn_pdrop,
        },
        tie_word_embeddings=True,
        use_cache=True,
    )


def open_clip_vision_config(open_clip_config: Mapping[str, Any]) -> CLIPVisionConfig:
    """`CLIPVisionConfig` of an open_clip model config (`{"vision_cfg": ..., "quick_gelu": ...}`)."""
    vision = open_clip_config.get("vision_cfg", open_clip_config)
    width = vision["width"]
    head_width = vision.get("head_width", 64)
    image_size = vision["image_size"]
    patch_size = vision["patch_size"]
    for name in ("image_size", "patch_size"):
        if isinstance(vision[name], (list, tuple)):
            raise ConversionError(f"open_clip vision_cfg.{name}={vision[name]!r}: only square sizes are supported.")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=width // head_width,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu" if open_clip_config.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,
        projection_dim=open_clip_config.get("embed_dim", 512),
    )


# --------------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------------


def open_clip_to_clip_vision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip visual weights (with or without the `visual.` prefix) -> CLIP vision transformer names
    (`embeddings.*`, `encoder.layers.*`, ...; `CLIPVisionModel` adds `vision_model.` to them on transformers 4.x)."""
    has_prefix = any(k.startswith("visual.") for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if has_prefix:
            if not key.startswith("visual."):
                continue  # the text tower of a full CLIP state dict
            key = key[len("visual.") :]
        match = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if match:
            layer, kind = match.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.clone()
            continue
        new_key = apply_rules(key, OPEN_CLIP_KEY_RULES)
        if new_key is not None:
            out[new_key] = value
    return out


def _rename_to_model(key: str, model_keys: set[str]) -> str:
    """GPT-NeoX head: `embed_out` (transformers < 5.14) vs `lm_head` (>= 5.14), whichever the model has."""
    for old, new in (("embed_out.", "lm_head."), ("lm_head.", "embed_out.")):
        if key.startswith(old) and key not in model_keys and new + key[len(old) :] in model_keys:
            return new + key[len(old) :]
    return key


def lm_state_dict_to_native(
    state_dict: Mapping[str, torch.Tensor], family: str, model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """LM weights renamed to transformers' native names, under `language_model.`."""
    out = {}
    for key, value in state_dict.items():
        new_key = apply_rules(key, LM_KEY_RULES[family])
        if new_key is not None:
            out["language_model." + _rename_to_model(new_key, {k[len("language_model.") :] for k in model_keys})] = (
                value
            )
    return out


def flamingo_checkpoint_to_native(
    checkpoint: Mapping[str, torch.Tensor], family: str, model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """`checkpoint.pt` keys -> our names (`perceiver.*`, `gated_cross_attn_layers.*`, `language_model.*`)."""
    lm_keys = {k[len("language_model.") :] for k in model_keys if k.startswith("language_model.")}
    out = {}
    for key, value in checkpoint.items():
        new_key = apply_rules(key, FLAMINGO_KEY_RULES)
        if new_key is None:
            continue
        if new_key.startswith("lang_encoder."):
            lm_key = apply_rules(new_key[len("lang_encoder.") :], LM_KEY_RULES[family])
            if lm_key is None:
                continue
            new_key = "language_model." + _rename_to_model(lm_key, lm_keys)
        out[new_key] = value
    return out


def fit_embedding_rows(
    lm_state: dict[str, torch.Tensor], model_shapes: Mapping[str, torch.Size], overridden: Iterable[str]
) -> list[str]:
    """Resize the LM's token rows to the model's vocabulary, as the original's `resize_token_embeddings` did.

    A shrink keeps the first rows (deterministic, as the original). Rows the checkpoint provides are taken from it
    (`overridden`). Rows that exist nowhere (the LLaMA `lm_head` rows of the 3 added tokens) are set to the mean of
    the existing rows; the names of such tensors are returned so that the caller can warn.
    """
    invented = []
    for key, tensor in list(lm_state.items()):
        target = model_shapes.get(key)
        if target is None or tensor.ndim != 2 or tensor.shape == target or key in overridden:
            continue
        if tensor.shape[1] != target[1]:
            continue  # reported as a shape mismatch later
        if tensor.shape[0] >= target[0]:
            lm_state[key] = tensor[: target[0]]
        else:
            extra = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype).expand(target[0] - tensor.shape[0], -1)
            lm_state[key] = torch.cat((tensor, extra), dim=0)
            invented.append(key)
    return invented


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    sources: Mapping[str, str],
) -> None:
    """Every model tensor present with the right shape, nothing extra; errors name the key and its source file."""
    expected = model.state_dict()
    tied = _tied_aliases(model)
    missing = sorted(k for k in expected if k not in state_dict and k not in tied)
    unexpected = sorted(k for k in state_dict if k not in expected)
    if unexpected:
        key = unexpected[0]
        raise ConversionError(
            f"{sources.get(key, '?')}: key {key!r} has no place in the model ({len(unexpected)} such keys: "
            f"{unexpected[:5]}). Is the LM family or --cross-attn-every-n-layers right?"
        )
    if missing:
        raise ConversionError(
            f"The model needs {len(missing)} tensors that no input provides, e.g. {missing[:5]}. "
            "Is --cross-attn-every-n-layers right, and is the checkpoint from this LM family?"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConversionError(
                f"{sources.get(key, '?')}: key {key!r} has shape {tuple(tensor.shape)} but the config needs "
                f"{tuple(expected[key].shape)}."
            )


def _tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that share their tensor with an earlier name (tied embeddings)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(name)
        else:
            seen[id(tensor)] = name
    return aliases


# --------------------------------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------------------------------


def convert_openflamingo_checkpoint(
    checkpoint: str | os.PathLike,
    lm: str | os.PathLike,
    tokenizer: str | os.PathLike,
    open_clip_config: str | os.PathLike,
    open_clip_weights: str | os.PathLike,
    cross_attn_every_n_layers: int,
    output_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the original parts into a `save_pretrained` folder (model, processor, generation config).

    The folder is written to a temporary sibling and moved into place at the end: a failed conversion leaves nothing.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty (pass overwrite=True / --overwrite).")

    text_config, family = lm_config_from_folder(lm)
    tok = add_openflamingo_tokens(AutoTokenizer.from_pretrained(str(tokenizer)))
    open_clip_config_path = Path(open_clip_config)
    if not open_clip_config_path.is_file():
        raise FileNotFoundError(f"{open_clip_config_path}: no such file.")
    vision_config = open_clip_vision_config(json.loads(open_clip_config_path.read_text()))

    text_config.vocab_size = len(tok)
    config = OpenFlamingoConfig(
        vision_config=vision_config,
        text_config=text_config,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        media_token_id=tok.convert_tokens_to_ids("<image>"),
        eoc_token_id=tok.convert_tokens_to_ids("<|endofchunk|>"),
        pad_token_id=tok.pad_token_id,
    )
    model = _empty_model(config)
    model_state = model.state_dict()
    model_keys = set(model_state)
    shapes = {k: v.shape for k, v in model_state.items()}

    ckpt = unwrap_checkpoint(load_torch_file(checkpoint), checkpoint)
    flamingo_state = flamingo_checkpoint_to_native(ckpt, family, model_keys)
    lm_state = lm_state_dict_to_native(load_lm_state_dict(lm), family, model_keys)
    invented = fit_embedding_rows(lm_state, shapes, overridden=flamingo_state)
    for key in invented:
        if key not in flamingo_state:
            warnings.warn(
                f"{key}: the rows of the added tokens exist in no input; they were set to the mean of the other rows.",
                stacklevel=2,
            )
    vision_prefix = (
        "vision_model.vision_model."
        if any(k.startswith("vision_model.vision_model.") for k in shapes)
        else ("vision_model.")
    )
    vision_state = {
        vision_prefix + k: v for k, v in open_clip_to_clip_vision(load_torch_file(open_clip_weights)).items()
    }
    state_dict = {**lm_state, **vision_state, **flamingo_state}
    sources = {
        **{k: str(lm) for k in lm_state},
        **{k: str(open_clip_weights) for k in vision_state},
        **{k: str(checkpoint) for k in flamingo_state},
    }
    _check_gated_layers(flamingo_state, config, checkpoint)
    check_state_dict(state_dict, model, sources)

    target_dtype = dtype or ckpt[next(iter(ckpt))].dtype
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    model.to(target_dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eoc_token_id, pad_token_id=config.pad_token_id, bos_token_id=tok.bos_token_id
    )
    processor = OpenFlamingoProcessor(
        image_processor=OpenFlamingoImageProcessor(size=vision_config.image_size), tokenizer=tok
    )
    return save_atomically(output_dir, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)))


def _check_gated_layers(flamingo_state: Mapping[str, torch.Tensor], config: OpenFlamingoConfig, source: Any) -> None:
    found = sorted({int(k.split(".")[1]) for k in flamingo_state if k.startswith("gated_cross_attn_layers.")})
    if found != config.cross_attn_layer_indices:
        raise ConversionError(
            f"{source}: has gated cross-attention blocks before decoder layers {found}, but "
            f"cross_attn_every_n_layers={config.cross_attn_every_n_layers} puts them before "
            f"{config.cross_attn_layer_indices}. Is --cross-attn-every-n-layers right?"
        )


def _empty_model(config: OpenFlamingoConfig) -> OpenFlamingoForConditionalGeneration:
    """The model with no random initialisation (every tensor is overwritten by the conversion)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = OpenFlamingoForConditionalGeneration(config)
    model.tie_weights()
    return model


def save_atomically(output_dir: str | os.PathLike, write: Any) -> Path:
    """Run `write(tmp_dir)` into a temporary sibling of `output_dir`, then move it into place."""
    output_dir = Path(output_dir).absolute()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        write(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


__all__ = [
    "FLAMINGO_KEY_RULES",
    "LM_KEY_RULES",
    "OPEN_CLIP_KEY_RULES",
    "ConversionError",
    "convert_openflamingo_checkpoint",
    "load_torch_file",
    "unwrap_checkpoint",
]
