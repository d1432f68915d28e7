"""Configuration of OpenFlamingo: CLIP vision tower + Perceiver Resampler + gated cross-attention into a causal LM."""

from __future__ import annotations

import contextvars
import numbers
from typing import Any

import transformers
from packaging.specifiers import SpecifierSet
from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# The transformers releases this package works with (pyproject.toml's requirement, the same): 4.57.x, and 5.x from
# 5.18 (5.0 loaded the vision tower's weights under the wrong names, and 5.4-5.17's image processors need torchvision).
# Of the next major nothing is known: pip is kept off it, the import refuses only releases known not to work.
_WORKS_WITH = ">=4.57," + ",".join(f"!=5.{minor}.*" for minor in range(18))
TRANSFORMERS_REQUIREMENT = _WORKS_WITH + ",<6"


def check_transformers_version(installed: str = transformers.__version__) -> None:
    """Raises `ImportError` naming the supported releases when `installed` is known not to work (older than 4.57,
    or 5.0-5.17)."""
    if not SpecifierSet(_WORKS_WITH).contains(installed, prereleases=True):
        raise ImportError(
            f"openflamingo-hf needs transformers 4.57.x or 5.18 and newer (5.x); this is transformers {installed}. "
            "Install a supported release, e.g. `pip install -U 'transformers>=5.18,<6'`."
        )


# (here: importing the package runs it, as its `__init__` imports this module first, and so does loading a saved
# folder's config, model or processor through the Auto classes; its image processor alone does not import this)
check_transformers_version()

# CLIP ViT-L/14 at 224 px (OpenAI weights), the vision tower of every released OpenFlamingo model.
VIT_L_14_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
}


# How a generated `<image>` token conditions the tokens after it: see `OpenFlamingoConfig`'s docstring.
GENERATED_IMAGE_CONDITIONINGS = ("sequence", "original_kv_cache")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> Any:
    """A numpy (or other `numbers.Integral`) integer as an int; anything else as it is (the caller's check judges
    it)."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _check_text_config_type(model_type: Any, config_class: type | None = None, saved_by: Any = None) -> None:
    """Refuse a text config that a saved folder could not load again as the same config: `config.json` keeps only its
    `model_type`, which `AutoConfig` maps to transformers' own class. `config_class`: the class of a config object
    (None for a dict); `saved_by`: the `transformers_version` of the config that held it, where it was read from a
    file."""
    if not model_type:  # (a bare PretrainedConfig: no LM class is known for it)
        raise ValueError("`text_config` needs a `model_type` (for example 'mpt', 'gpt_neox' or 'llama').")
    if model_type == "mosaic_gpt":
        raise ValueError(
            "`text_config` is a MosaicGPT config (model_type 'mosaic_gpt', MPT-1B's remote code), which "
            "transformers has no class for: make it an MptConfig with "
            "`modeling_openflamingo.checkpoint_conversion.mosaic_gpt_to_mpt_config(config_dict)` (of a config object: "
            "its `to_dict()`; QK-LayerNorm kept), as the converter does."
        )
    if model_type not in CONFIG_MAPPING:
        # (transformers' own error listed every model type it knows, this one's `openflamingo` among them, without
        # saying which config named the unknown one)
        raise ValueError(
            f"`text_config` is a language model of model_type {model_type!r}, which this transformers "
            f"({transformers.__version__}) has no config class for"
            + (f" (the config was saved by transformers {saved_by})" if saved_by else "")
            + ": install a transformers release that has this model, or give a text config of a model type it knows."
        )
    if config_class is not None and not issubclass(config_class, CONFIG_MAPPING[model_type]):
        raise ValueError(
            f"`text_config` is a {config_class.__module__}.{config_class.__name__} (remote code?), not transformers' "
            f"{CONFIG_MAPPING[model_type].__name__} for model_type {model_type!r}: a saved model would load with the "
            "latter (and this one makes `AutoModelForCausalLM` run the LM repository's own code). Give transformers' "
            "config, e.g. `modeling_openflamingo.checkpoint_conversion.lm_config_from_dict(text_config.to_dict())[0]` "
            "(MPT, MosaicGPT, GPT-NeoX, LLaMA) or `AutoConfig.for_model(model_type, **config_dict)`."
        )


def gated_layer_indices(cross_attn_every_n_layers: int, num_layers: int) -> list[int]:
    """The decoder layers (of `num_layers`) that a gated cross-attention block precedes: every layer `i` with
    `(i + 1) % cross_attn_every_n_layers == 0`, as the original places them."""
    return [i for i in range(num_layers) if (i + 1) % cross_attn_every_n_layers == 0]


# The attribute with which a built model marks its config when the LM's "eager" there is the one the model wrote for
# MPT's own class while the LM runs this package's SDPA attention (`OpenFlamingoForConditionalGeneration.__init__`);
# never saved.
LM_SDPA_WRITTEN_AS_EAGER = "_openflamingo_lm_sdpa_written_as_eager"

# While a model saves itself (`OpenFlamingoForConditionalGeneration.save_pretrained`): its config and the dtypes of its
# parts, `{"vision_config": "bfloat16", "text_config": "float32", "": "float32"}` for the vision tower, the LM and the
# rest. That config's sub-configs then record the dtype of a part that differs from the rest (a model loaded with a
# per-part dtype dict on transformers 4.x); other configs serialised meanwhile are not affected.
SAVED_PART_DTYPES: contextvars.ContextVar[tuple[PretrainedConfig, dict[str, str]] | None] = contextvars.ContextVar(
    "openflamingo_saved_part_dtypes", default=None
)


class OpenFlamingoConfig(PretrainedConfig):
    r"""
    Configuration of [`OpenFlamingoForConditionalGeneration`].

    Args:
        vision_config (`CLIPVisionConfig` or `dict`, *optional*):
            The vision tower. Defaults to CLIP ViT-L/14 at 224 px with QuickGELU (the released models).
        text_config (`PretrainedConfig` or `dict`, *optional*):
            The language model's own config (`mpt`, `gpt_neox`, `llama`, or any decoder-only causal LM that
            `AutoModelForCausalLM.from_config` builds), of transformers' class for its `model_type` (a saved folder
            loads it as that class): not an LM repository's remote-code config. MosaicGPT (OpenFlamingo-3B) is an
            `MptConfig` whose `attn_config.qk_ln` is `True`. Defaults to an `MptConfig`.
        cross_attn_every_n_layers (`int`, defaults to 1):
            A gated cross-attention block is placed before decoder layer `i` (0-based) when `(i + 1) % N == 0`.
        cross_attn_heads (`int`, defaults to 8), cross_attn_dim_head (`int`, defaults to 64),
        cross_attn_ff_mult (`int`, defaults to 4):
            Shape of the gated cross-attention blocks.
        only_attend_immediate_media (`bool`, defaults to `True`):
            A text token attends only to the latents of the latest image at or before it. `False` lets it attend to
            the latents of every image at or before it.
        generated_image_conditioning (`str`, defaults to `"sequence"`):
            Which image the tokens that `generate` feeds back attend to once a row generates an `<image>` token.
            `"sequence"`: as one forward over the whole sequence counts images (the original's forward, and its
            generation without a KV cache, which MPT's and MosaicGPT's configs ask for): that token starts the row's
            next image. `"original_kv_cache"`: as the original's generation with a KV cache (GPT-NeoX, LLaMA): at a
            step where any row of the batch (any beam) is fed `<image>`, every row is conditioned on that step's token
            alone, by row position (beams do not carry it along): the rows fed `<image>` attend to their first image
            from then on, the others to none, until the next such step. The conversion sets it from the LM config's
            `use_cache`, so that converted models generate the original's tokens.
        perceiver_depth (`int`, defaults to 6), perceiver_heads (`int`, defaults to 8),
        perceiver_dim_head (`int`, defaults to 64), perceiver_num_latents (`int`, defaults to 64),
        perceiver_ff_mult (`int`, defaults to 4):
            Shape of the Perceiver Resampler.
        use_cache (`bool`, defaults to `True`): whether the LM returns its key/value cache (also set on `text_config`).
        media_token_id (`int`, *optional*): id of `<image>`.
        eoc_token_id (`int`, *optional*): id of `<|endofchunk|>`.
        pad_token_id (`int`, *optional*): id of `<PAD>`.
        eos_token_id (`int` or `list[int]`, *optional*): where `generate` stops by default; defaults to `eoc_token_id`
            (the original's default), not the LM's own eos.
    """

    model_type = "openflamingo"
    # what `Trainer`'s evaluation leaves out of its predictions (the caches are for generation)
    keys_to_ignore_at_inference = ["past_key_values", "cache", "image_cache", "image_hidden_states"]
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict[str, Any] | None = None,
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        cross_attn_every_n_layers: int = 1,
        cross_attn_heads: int = 8,
        cross_attn_dim_head: int = 64,
        cross_attn_ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
        generated_image_conditioning: str = "sequence",
        perceiver_depth: int = 6,
        perceiver_heads: int = 8,
        perceiver_dim_head: int = 64,
        perceiver_num_latents: int = 64,
        perceiver_ff_mult: int = 4,
        media_token_id: int | None = None,
        eoc_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        if vision_config is None:
            vision_config = CLIPVisionConfig(**VIT_L_14_CONFIG)
        elif isinstance(getattr(vision_config, "vision_config", None), CLIPVisionConfig):
            vision_config = vision_config.vision_config  # a whole `CLIPConfig`: its vision tower's
        elif isinstance(vision_config, dict):
            if vision_config.get("model_type") == "clip" and isinstance(vision_config.get("vision_config"), dict):
                vision_config = vision_config["vision_config"]  # a whole CLIP config: its vision tower's
            if vision_config.get("model_type", "clip_vision_model") != "clip_vision_model":
                raise ValueError(
                    "`vision_config` must be a CLIP vision config (model_type 'clip_vision_model'); got model_type "
                    f"{vision_config['model_type']!r}."
                )
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        media_token_id, eoc_token_id, pad_token_id = (
            _as_int(value) for value in (media_token_id, eoc_token_id, pad_token_id)
        )
        if text_config is None:
            text_config = AutoConfig.for_model("mpt")
        elif isinstance(text_config, dict):
            text_config = dict(text_config)
            model_type = text_config.pop("model_type", None)
            _check_text_config_type(model_type, saved_by=kwargs.get("transformers_version"))
            text_config = AutoConfig.for_model(model_type, **text_config)
        for name, value, kind in (
            ("vision_config", vision_config, CLIPVisionConfig),
            ("text_config", text_config, PretrainedConfig),
        ):
            if not isinstance(value, kind):
                raise ValueError(f"`{name}` must be a {kind.__name__} or a dict; got {type(value).__name__}.")
        _check_text_config_type(getattr(text_config, "model_type", None), type(text_config))
        # The composite's `use_cache` governs generation (transformers' MptConfig defaults it to False).
        text_config.use_cache = use_cache
        self.use_cache = use_cache
        self.vision_config = vision_config
        self.text_config = text_config
        self.cross_attn_every_n_layers = _as_int(cross_attn_every_n_layers)
        self.cross_attn_heads = _as_int(cross_attn_heads)
        self.cross_attn_dim_head = _as_int(cross_attn_dim_head)
        self.cross_attn_ff_mult = _as_int(cross_attn_ff_mult)
        self.only_attend_immediate_media = only_attend_immediate_media
        self.generated_image_conditioning = generated_image_conditioning
        self.perceiver_depth = _as_int(perceiver_depth)
        self.perceiver_heads = _as_int(perceiver_heads)
        self.perceiver_dim_head = _as_int(perceiver_dim_head)
        self.perceiver_num_latents = _as_int(perceiver_num_latents)
        self.perceiver_ff_mult = _as_int(perceiver_ff_mult)
        self.media_token_id = media_token_id
        self.eoc_token_id = eoc_token_id
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        eos_token_id = kwargs.pop("eos_token_id", None)
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = [_as_int(e) for e in eos_token_id]
        else:
            eos_token_id = _as_int(eos_token_id)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        # transformers 5.x no longer keeps token ids on the base config: keep ours explicitly.
        self.pad_token_id = pad_token_id
        # Generation stops at <|endofchunk|>, as the original's `generate`, unless told otherwise. transformers makes a
        # generation config from this one when a folder has no generation_config.json.
        self.eos_token_id = eos_token_id if eos_token_id is not None else eoc_token_id
        self.check()

    def check(self) -> None:
        """Raise a `ValueError` naming the first field that cannot make a model: run when the config is made and when
        a model is built from it (values given to `from_pretrained` or set afterwards reach the config after its
        `__init__`)."""
        layers = getattr(self.text_config, "num_hidden_layers", None)
        n = self.cross_attn_every_n_layers
        if not _is_int(n) or n < 1 or (isinstance(layers, int) and n > layers):
            raise ValueError(
                f"`cross_attn_every_n_layers` must be an int in 1..{layers} (the LM's decoder layers): a gated "
                f"cross-attention block before every N-th layer; got {n!r}."
            )
        for name in (
            "cross_attn_heads",
            "cross_attn_dim_head",
            "cross_attn_ff_mult",
            "perceiver_depth",
            "perceiver_heads",
            "perceiver_dim_head",
            "perceiver_num_latents",
            "perceiver_ff_mult",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
        if not isinstance(self.only_attend_immediate_media, bool):
            raise ValueError(
                f"`only_attend_immediate_media` must be True or False; got {self.only_attend_immediate_media!r}."
            )
        if self.generated_image_conditioning not in GENERATED_IMAGE_CONDITIONINGS:
            raise ValueError(
                f"`generated_image_conditioning` must be one of {', '.join(map(repr, GENERATED_IMAGE_CONDITIONINGS))}; "
                f"got {self.generated_image_conditioning!r}."
            )
        vocab_size = getattr(self.text_config, "vocab_size", None)
        for name, value in self.special_token_ids():
            if not _is_int(value) or value < 0 or (_is_int(vocab_size) and value >= vocab_size):
                raise ValueError(
                    f"`{name}` must be a token id in 0..{vocab_size - 1 if _is_int(vocab_size) else 'vocab'} "
                    f"(`text_config.vocab_size` = {vocab_size}: the LM's embedding rows); got {value!r}. Resize the "
                    "LM's vocabulary to the tokenizer's length when the tokens were added to it."
                )
        if self.media_token_id is not None:
            for name in ("eoc_token_id", "pad_token_id"):
                if getattr(self, name) == self.media_token_id:
                    raise ValueError(f"`media_token_id` and `{name}` are both {self.media_token_id}: one token each.")

    def special_token_ids(self) -> list[tuple[str, Any]]:
        """`(field, id)` for each id set among `media_token_id`, `eoc_token_id`, `pad_token_id` and `eos_token_id`
        (one entry per id of a list): the ids that need a row in the LM's embedding matrix."""
        eos = self.eos_token_id
        tokens = [(name, getattr(self, name)) for name in ("media_token_id", "eoc_token_id", "pad_token_id")]
        tokens += [("eos_token_id", e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        return [(name, value) for name, value in tokens if value is not None]

    @property
    def cross_attn_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that a gated cross-attention block precedes."""
        return gated_layer_indices(self.cross_attn_every_n_layers, self.text_config.num_hidden_layers)

    def to_dict(self) -> dict[str, Any]:
        """As the base class, with sub-config dtypes only where a saved model's part differs from the rest, and the
        legacy rotary keys that transformers 4.x reads, so one folder loads on both majors.

        transformers 5.x writes rotary settings only as `rope_parameters`; 4.x ignores that and falls back to its
        defaults (GPT-NeoX: `rotary_pct=0.25`), which would silently change the model.
        """
        output = super().to_dict()
        output.pop(LM_SDPA_WRITTEN_AS_EAGER, None)
        # transformers 4.x builds each sub-model in its sub-config's dtype where one is set (`dtype="auto"`,
        # `from_config`), else in the top-level one. A sub-config's own dtype is therefore written only by a model
        # saving itself, for a part whose dtype differs from the rest; otherwise it is left unset (one from the LM's
        # own config.json would be stale, one equal to the top-level redundant).
        saved = SAVED_PART_DTYPES.get()
        part_dtypes = saved[1] if saved is not None and saved[0] is self else {}
        dtype_key = "dtype" if "dtype" in output else "torch_dtype"
        if "" in part_dtypes and output.get(dtype_key) is not None:
            output[dtype_key] = part_dtypes[""]  # the Perceiver's and the blocks' (transformers writes the first one's)
        top_dtype = output.get(dtype_key)
        for name in ("text_config", "vision_config"):
            sub = output.get(name)
            if not isinstance(sub, dict):
                continue
            for key in ("dtype", "torch_dtype"):
                if key in sub:
                    sub[key] = None
            if part_dtypes.get(name, top_dtype) != top_dtype:
                sub[dtype_key] = part_dtypes[name]
        text = output.get("text_config")
        rope = text.get("rope_parameters") if isinstance(text, dict) else None
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default" and text.get("rope_scaling") is None:
                # (linear, dynamic, yarn, llama3, ...: 4.x's `rope_scaling` holds the same keys, less these two)
                text["rope_scaling"] = {
                    k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")
                }
            if rope.get("rope_type") == "longrope" and "original_max_position_embeddings" in rope:
                # (4.x's longrope reads it from the config, not from `rope_scaling`)
                text.setdefault("original_max_position_embeddings", rope["original_max_position_embeddings"])
            if "rope_theta" in rope:
                text.setdefault("rope_theta", rope["rope_theta"])
            if "partial_rotary_factor" in rope:
                text.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            if text.get("model_type") == "gpt_neox":
                text.setdefault("rotary_pct", rope.get("partial_rotary_factor", 1.0))
                text.setdefault("rotary_emb_base", rope.get("rope_theta", 10000))
        return output

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        """The language model's config (used by generation and cache utilities)."""
        return self.text_config


__all__ = ["OpenFlamingoConfig"]
