"""OpenFlamingo as a transformers model.

A frozen CLIP vision tower (`CLIPVisionModel`, patch features taken *without* `post_layernorm`) feeds a Perceiver
Resampler; gated cross-attention blocks, kept outside the language model, run before every N-th decoder layer of an
unmodified transformers causal LM (`AutoModelForCausalLM.from_config`). The LM's parameters keep their native names
under `language_model.`. transformers' MPT gets three things of its own (same parameters): MosaicGPT's QK-LayerNorm,
static-cache decoding, and attention through SDPA (`add_mpt_qk_layernorm`, `add_mpt_static_cache_support`,
`add_mpt_sdpa_attention`).

How the blocks reach the LM: each decoder layer that a block precedes gets a thin subclass of its own class (same
name, same parameters) whose `__call__` applies the block to the layer's hidden states and then calls the layer
unchanged. It reads the images of the running forward from a context variable that exists only for the duration of
`OpenFlamingoForConditionalGeneration.forward`, so nothing is stored on modules between calls and the layers' own
argument lists are never inspected. The block runs outside the layer's own gradient checkpoint and is checkpointed
on its own, with the image tensors as explicit inputs.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import logging as std_logging
import operator
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from packaging import version
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import __version__ as _TRANSFORMERS_VERSION
from transformers.cache_utils import Cache
from transformers.generation.logits_process import LogitsProcessorList, UnbatchedClassifierFreeGuidanceLogitsProcessor
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.mpt.modeling_mpt import MptAttention
from transformers.utils import (
    ModelOutput,
    is_accelerate_available,
    is_peft_available,
    logging,
)

if __name__ == "modeling_openflamingo":  # pragma: no cover - see the test of converted folders used as working dir
    # This is the copy of the model code that a saved folder carries (for `trust_remote_code`), found by name because
    # the folder is the working directory (a REPL, a notebook, `python -c`) where `import modeling_openflamingo` means
    # the installed package. Hand over to the package, which that import then returns; the rest of this copy runs
    # against the package's modules and is dropped.
    import importlib
    import os

    _folder = os.path.dirname(os.path.abspath(__file__))
    _path = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _folder]
    del sys.modules[__name__]
    try:
        _package = importlib.import_module(__name__)
    except ImportError as error:
        raise ImportError(
            f"{__file__} is a saved OpenFlamingo folder's copy of the model code, not the package "
            "`modeling_openflamingo`, which is not installed: install openflamingo-hf, or load the folder without "
            "it, with AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)."
        ) from error
    finally:
        sys.path[:] = _path
    sys.modules[__name__] = _package
    __package__ = __name__

from .configuration_openflamingo import (
    LM_SDPA_WRITTEN_AS_EAGER,
    SAVED_PART_DTYPES,
    OpenFlamingoConfig,
    _as_int,
    _is_int,
)
from .decoding_kernels import is_capturing_cuda_graph, is_traced, scaled_dot_product_attention

try:  # transformers >= 5: initialisers that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x
    from torch.nn import init

logger = logging.get_logger(__name__)
# dynamo's limit of compiled versions per function (the name of its option)
_RECOMPILE_LIMIT = "recompile_limit"

# One on-disk layout for both transformers majors: 4.x's `CLIPVisionModel` nests its weights under `vision_model.`,
# 5.x's does not. 5.x renames the 4.x names on load and back on save, so every saved folder loads on both.
try:
    from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping

    register_checkpoint_conversion_mapping(
        "openflamingo",
        [WeightRenaming(source_patterns=r"^vision_model\.vision_model\.", target_patterns="vision_model.")],
        overwrite=True,
    )
except ImportError:  # transformers 4.x: its own layout is the on-disk one
    pass

_TRANSFORMERS_MAJOR = int(_TRANSFORMERS_VERSION.split(".")[0])
# transformers < 5.24 checkpoints a layer's forward also where no gradient is taken (under `no_grad`)
_CHECKPOINTS_WITHOUT_GRADIENTS = version.parse(_TRANSFORMERS_VERSION) < version.parse("5.24.0.dev0")


def _checkpoint_renamings(model: nn.Module) -> list:
    """The key renamings that transformers 5.x's `from_pretrained` applies to a checkpoint of `model` (and
    `save_pretrained` reverts), its sub-models' included (each scoped to its prefix), e.g. GPT-NeoX's `embed_out.` ->
    `lm_head.`; none on 4.x, which loads and saves the modules' own names."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    return [transform for transform in get_model_conversion_mapping(model) if isinstance(transform, WeightRenaming)]


def _apply_renamings(key: str, renamings: list) -> str:
    """`key` after every one of `renamings` ([`_checkpoint_renamings`]), as `from_pretrained` renames it."""
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    return key


# `cache_implementation`s of fixed-length (compileable) caches
_COMPILEABLE_CACHES = frozenset({"static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked"})

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class OpenFlamingoImageCache(ModelOutput):
    """
    What a continued forward (a decoding step, a scored continuation) needs of the images.

    Args:
        key_values (`tuple(tuple(torch.FloatTensor))`):
            For each gated cross-attention block, in layer order, its keys and values over the image latents, each of
            shape `(batch_size, heads, num_images * num_latents, dim_head)`.
        last_image_index (`torch.LongTensor` of shape `(batch_size,)`):
            The 1-based number of the last image of each row so far (0: the row has none); tokens that follow see it.
    """

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
    last_image_index: torch.LongTensor | None = None

    def repeat_interleave(self, repeats: int) -> OpenFlamingoImageCache:
        """A cache with each row repeated `repeats` times in place (rows `b * repeats ... b * repeats + repeats - 1`
        are row `b`), as `generate` expands its inputs for beams and several sequences per prompt."""
        return OpenFlamingoImageCache(
            key_values=tuple(
                (key.repeat_interleave(repeats, dim=0), value.repeat_interleave(repeats, dim=0))
                for key, value in self.key_values
            ),
            last_image_index=self.last_image_index.repeat_interleave(repeats, dim=0),
        )


@dataclass
class OpenFlamingoCausalLMOutputWithPast(ModelOutput):
    """
    Output of [`OpenFlamingoForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            The LM's shifted cross-entropy, mean over the label tokens that are not -100 (with `Trainer`'s
            `num_items_in_batch`: their sum divided by it).
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Scores of the language modelling head (of the last `logits_to_keep` positions only, when given).
        past_key_values (`Cache`, *optional*, returned when `use_cache=True`):
            The language model's key/value cache (also exposed as `cache` on transformers >= 5.24).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The LM's hidden states, each of shape `(batch_size, sequence_length, hidden_size)`: the input embeddings
            (before any gated block), then the output of each decoder layer (as the LM returns the last one, e.g.
            after its final norm); `num_hidden_layers + 1` of them.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The LM's self-attention weights, one per decoder layer, each of shape `(batch_size, num_heads,
            sequence_length, keys)` (`keys`: the cached and the new positions); with an attention that returns no
            weights (SDPA, the default) the LM's own placeholder (`None` per layer for MPT, an empty tuple for the
            others on transformers 5).
        image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, vision_hidden_size)`):
            The Perceiver Resampler's output for the images of the batch, when images were given.
        image_cache ([`OpenFlamingoImageCache`], *optional*, returned with a cache when images are involved):
            Pass it back, with `past_key_values`, to continue these rows without re-encoding the images.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    # `past_key_values`, or `cache` on transformers >= 5.24 (whose ModelOutput maps the old name to the new one)
    __annotations__[_CACHE_FIELD] = "Any | None"
    vars()[_CACHE_FIELD] = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    image_cache: OpenFlamingoImageCache | None = None


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


class OpenFlamingoFeedForward(nn.Module):
    """LayerNorm -> Linear(dim, mult * dim) -> exact GELU -> Linear(mult * dim, dim), no biases in the Linears."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., dim)` -> `(..., dim)`."""
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))


def _autocast_enabled(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for `tensor`'s device type (False on devices autocast does not know, as `meta`).

    While `torch.compile` traces, only `meta` is checked for by name: dynamo before torch 2.13 cannot trace
    `is_autocast_available`, which broke every compiled gated block's graph in two (a warning in the training step
    on an H200 with torch 2.11) and would fail a `fullgraph=True` compilation."""
    device_type = tensor.device.type
    if device_type == "meta":
        return False
    if not is_traced() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def _narrowed(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, clamped to its range where that is narrower (fp32 activations beyond fp16's 65504 become
    its largest finite value, not inf, which a LayerNorm would turn into NaN). A no-op in `tensor`'s own dtype."""
    if tensor.dtype == dtype:
        return tensor
    info = torch.finfo(dtype)
    if info.max < torch.finfo(tensor.dtype).max:
        tensor = tensor.clamp(info.min, info.max)
    return tensor.to(dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(..., seq, heads * dim_head)` -> `(..., heads, seq, dim_head)`."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`(..., heads, seq, dim_head)` -> `(..., seq, heads * dim_head)`."""
    return x.transpose(-3, -2).flatten(-2)


class OpenFlamingoPerceiverAttention(nn.Module):
    """Latents attend to `[media; latents]`; LayerNorms on media and latents, one Linear for keys and values."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media `(..., num_media_tokens, dim)`, latents `(..., num_latents, dim)` -> `(..., num_latents, dim)`."""
        batch_shape = latents.shape[:-2]
        # one batch dimension: SDPA's fused kernels take 4-D inputs only (on CUDA, `(batch, images, heads, seq, dh)`
        # would run the math kernel, which computes bf16 attention with fp32 products)
        media = self.norm_media(media).reshape(-1, *media.shape[-2:])
        latents = self.norm_latents(latents).reshape(-1, *latents.shape[-2:])
        q = _split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat((media, latents), dim=-2)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q, _split_heads(k, self.heads), _split_heads(v, self.heads))
        out = self.to_out(_merge_heads(out))
        return out.reshape(*batch_shape, *out.shape[-2:])


class OpenFlamingoPerceiverLayer(GradientCheckpointingLayer):
    """One Perceiver Resampler layer: `latents = attn(media, latents) + latents; latents = ff(latents) + latents`."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = OpenFlamingoPerceiverAttention(dim, heads, dim_head)
        self.ff = OpenFlamingoFeedForward(dim, ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media `(..., num_media_tokens, dim)`, latents `(..., num_latents, dim)` -> `(..., num_latents, dim)`."""
        latents = self.attn(media, latents) + latents
        return self.ff(latents) + latents


class OpenFlamingoPerceiverResampler(nn.Module):
    """Maps the patch features of each image to a fixed number of latents.

    Input `(batch_size, num_images, num_patches, dim)`, output `(batch_size, num_images, num_latents, dim)`.
    """

    def __init__(self, config: OpenFlamingoConfig) -> None:
        super().__init__()
        dim = config.vision_config.hidden_size
        self.latents = nn.Parameter(torch.randn(config.perceiver_num_latents, dim))
        self.layers = nn.ModuleList(
            OpenFlamingoPerceiverLayer(dim, config.perceiver_heads, config.perceiver_dim_head, config.perceiver_ff_mult)
            for _ in range(config.perceiver_depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(batch_size, num_images, num_patches, dim)` patch features (the vision tower's last hidden state, without
        `post_layernorm`) -> `(batch_size, num_images, num_latents, dim)` latents."""
        batch_shape = image_features.shape[:-2]
        # the images of all rows as one batch dimension: every Linear sees 3-D inputs (bitsandbytes' 8-bit matmul
        # takes no more dimensions)
        image_features = image_features.reshape(-1, *image_features.shape[-2:])
        latents = self.latents.to(image_features.dtype).expand(image_features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(image_features, latents)
        # the norm last, on the final shape: the output is no view (FSDP2 warns about views among a root's outputs)
        return self.norm(latents.reshape(*batch_shape, *latents.shape[-2:]))


def cross_attention_mask(
    image_indices: torch.Tensor, num_latent_tokens: int, latents_per_image: int, only_attend_immediate_media: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Which image latents each text token attends to, as the original's `MaskedCrossAttention` decides it; the same
    for every gated block, so made once per forward.

    A token's image is its `image_indices` entry (1-based; 0 before the first `<image>`). With
    `only_attend_immediate_media` it attends to that image's latents; before the first image to none (its output is
    zero); beyond the images given (after an `<image>` that the model generated) the original's softmax is masked
    everywhere, hence uniform: the average of every latent. Without it, a token attends to the latents of every image
    up to its own (all of them beyond the last one); before the first image, masked everywhere again: the average.

    Args:
        image_indices: `(batch, seq)` long.
        num_latent_tokens: `num_images * latents_per_image`, the keys' length.

    Returns:
        `attn_mask` `(batch, 1, seq, num_latent_tokens)` bool, True: attend (every latent for the tokens below, so
        that the softmax stays finite); `keeps_query` `(batch, seq, 1)` bool, False where the softmax is uniform (a
        zero query: equal scores); `keeps_output` `(batch, seq, 1)` bool, False where the output is zero (`None`
        without `only_attend_immediate_media`: every output is kept).
    """
    # 1-based image number of every latent: (num_images * num_latents,)
    latent_image = torch.arange(num_latent_tokens, device=image_indices.device) // latents_per_image + 1
    indices = image_indices.unsqueeze(-1)
    if only_attend_immediate_media:
        allowed = indices == latent_image
        uniform = indices > num_latent_tokens // latents_per_image
        keeps_output = indices > 0
        attend_all = uniform | ~keeps_output
    else:
        allowed = indices >= latent_image
        uniform = attend_all = indices <= 0  # (a negative value, not valid, as 0: no NaN)
        keeps_output = None
    return (allowed | attend_all).unsqueeze(1), ~uniform, keeps_output


def image_indices_from_input_ids(input_ids: torch.Tensor, media_token_id: int, num_images: int) -> torch.Tensor:
    """For each token, the 1-based number of the latest `<image>` at or before it (0 before the first one).

    Args:
        input_ids: `(batch, seq)`.
        num_images: images given per row; a row with more `<image>` tokens is an error.

    Returns:
        `(batch, seq)` long: the model's `image_indices`. Made on the CPU (e.g. by the data collator), they spare the
        forward its own check, a GPU->host sync.
    """
    image_indices = (input_ids == media_token_id).cumsum(dim=-1)
    counts = image_indices[:, -1]
    if bool((counts > num_images).any()):
        row = int(torch.argmax((counts > num_images).int()))
        raise ValueError(
            f"Row {row} of input_ids has {int(counts[row])} <image> tokens but only {num_images} images were given "
            "per row. (A sequence from `generate` may hold a generated <image> with no image of its own: to run it "
            "through the model again, pass `image_indices` (batch, seq), each token's image, 1-based, 0 for none.)"
        )
    return image_indices


@contextmanager
def _gradient_checkpointing_paused(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off for the block, on a model in train mode: checkpointed layers then drop the KV cache
    (`use_cache=False`: transformers 4.x's layers, and MPT's model on 5.x too), which `generate` and
    `score_continuations` decode from (a model left in train mode by `Trainer` would generate from a prompt it no
    longer sees). Dropout, if the config has any, stays on. In eval mode nothing changes."""
    paused = []
    if model.training:
        paused = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in paused:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in paused:
            module.gradient_checkpointing = True


def _lm_cache(kwargs: dict[str, Any]) -> Any:
    """The LM's key/value cache among `generate`'s / `forward`'s keyword arguments (`cache` on transformers >= 5.24,
    `past_key_values` before), or None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


# `_check_no_empty_row`'s `what` for the mask that `generate` infers where none is given
INFERRED_MASK = "generate (no attention_mask given: the one inferred from pad_token_id)"


def _check_no_empty_row(attention_mask: Any, what: str) -> None:
    """A batch's empty prompt (a row of padding only, as the processor gives for `""`) is refused as one alone is:
    with nothing to attend to, the row's tokens would be made from padding."""
    if torch.is_tensor(attention_mask) and attention_mask.ndim == 2 and attention_mask.shape[-1] > 0:
        empty = (attention_mask == 0).all(dim=-1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(
                f"{what} needs a prompt of at least one token in every row; attention_mask row(s) {rows} hold "
                "padding only (an empty text: the released tokenizers add no BOS token). Start each prompt with some "
                "text or an <image>."
            )


def _check_tensors(**named: Any) -> None:
    """A clear error for inputs given as lists or numpy arrays (`return_tensors="np"` / `None` outputs), which
    otherwise fail deep inside the LM or `generate` with an AttributeError. (A flex attention `BlockMask`, which
    `generate` may make, is not a tensor either, and passes.)"""
    for name, value in named.items():
        if isinstance(value, (list, tuple)) or type(value).__module__ == "numpy":
            raise ValueError(
                f"{name} must be a torch.Tensor; got {type(value).__name__} (call the processor with "
                "return_tensors='pt', its default)."
            )


def _is_integer(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds integers (not floating point, complex or bool): token ids, labels, image numbers."""
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _check_left_on_cpu(name: str, tensor: torch.Tensor, device: torch.device, dispatched: bool) -> None:
    """An input left on the CPU for weights on an accelerator is named as such (the patch convolution's error speaks of
    tensor types). Not for a model dispatched by a device map (its hooks move inputs), nor for weights on the CPU or
    the meta device (offloaded weights wait there for hooks that move them)."""
    if tensor.device.type == "cpu" and device.type not in ("cpu", "meta") and not dispatched:
        raise ValueError(
            f"{name} is on the CPU but the model's weights are on {device}: move the inputs to the model's device "
            "(`processor(...).to(model.device)`)."
        )


# The attribute of an LM cache that holds the images of the forward that filled it (see [`_image_cache_on`]): the
# image cache, with the cache's rows and length it was stored for
_IMAGE_CACHE_ATTRIBUTE = "openflamingo_image_cache"


def _cache_images_apply() -> bool:
    """Whether the images that an LM cache holds ([`_image_cache_on`], [`_store_image_cache`]) are read and written
    here in eager code. Traced, see [`_cache_images_apply_traced`]."""
    return not is_traced() and not is_capturing_cuda_graph()


def _cache_images_apply_traced(cache: Any, image_indices: Any) -> bool:
    """Whether a forward traced by `torch.compile` reads and writes the images that the LM cache `cache` holds (None:
    whichever cache), as eager code does: `torch.compile(model)` in a loop that passes only `past_key_values` after
    the first step (as for llava or mllama) decoded the later tokens as text only. Only for a cache whose length is a
    Python number (a dynamic cache's; not a static cache's, a tensor, which the branches on it would break the graph
    on), and not where the caller places the images itself (`image_indices`: the fast path's steps, which pass
    `image_cache`), nor under `torch.export` or while a CUDA graph is captured (Python state set there is not set at
    a replay). The checks of the cache's rows and length are the eager code's only: traced, a check of a length
    that grows at every step would compile the forward anew at every step."""
    return (
        torch.compiler.is_dynamo_compiling()
        and not torch.compiler.is_exporting()
        and not is_capturing_cuda_graph()
        and image_indices is None
        and (cache is None or _is_dynamic_cache(cache))
    )


def _is_dynamic_cache(cache: Any) -> bool:
    """A cache that grows (transformers' `DynamicCache`): its length is a Python number. Not a static one, whose
    length is a tensor once filled (and 0 before its first update: `is_compileable` tells it apart then)."""
    return (
        hasattr(cache, "get_seq_length")
        and not getattr(cache, "is_compileable", False)
        and not torch.is_tensor(cache.get_seq_length())
    )


def _image_cache_on(cache: Any, rows: int | None, length: int | None) -> OpenFlamingoImageCache | None:
    """The image cache that a forward with images stored on the LM cache `cache` it filled (None without one): as
    mllama's cache holds its cross-attention states, a continued forward given only `past_key_values` goes on seeing
    the prompt's images instead of decoding as text only. The state is the cache object's, not its layers': a cache
    changed since (cropped, rows dropped: another length or number of `rows`) is an error, not stale images; rows
    reordered in place are not seen (pass `image_cache` then). `rows` and `length` None (traced): not checked."""
    stored = getattr(cache, _IMAGE_CACHE_ATTRIBUTE, None)
    if stored is None:
        return None
    image_cache, stored_rows, stored_length = stored
    if rows is None or length is None or stored_rows is None or stored_length is None:
        return image_cache
    if (rows, length) != (stored_rows, stored_length):
        raise ValueError(
            f"past_key_values holds the images of the forward that filled it, for {stored_rows} rows and "
            f"{stored_length} positions, but now has {length} positions and the input {rows} rows: the cache was "
            "changed since (cropped, rows selected?). Pass that forward's `image_cache`, changed the same way, with "
            "it (or `image_indices`: zeros for no image)."
        )
    return image_cache


def _store_image_cache(
    cache: Any, image_cache: OpenFlamingoImageCache | None, rows: int | None, length: int | None
) -> None:
    """Store `image_cache` (None: forget the images) on the LM cache `cache`, of `rows` rows and `length` positions
    after the forward (None, traced: unchecked), for [`_image_cache_on`]."""
    if not hasattr(cache, "get_seq_length"):
        return
    if image_cache is not None or getattr(cache, _IMAGE_CACHE_ATTRIBUTE, None) is not None:
        setattr(cache, _IMAGE_CACHE_ATTRIBUTE, None if image_cache is None else (image_cache, rows, length))


_CONTINUING_WITH_IMAGES = (
    "Continuing from past_key_values with images: pass `image_cache` (from the previous output) or `image_indices`, "
    "so that the new tokens know which image they follow."
)

# What `generate` adds to the model kwargs for [`prepare_inputs_for_generation`] (not inputs of the forward)
_GENERATE_STATE_KEYS = frozenset({"generated_image_state", "embeds_prompt_ids", "prefill_chunked_embeds"})


def _wrapper_prepare_inputs(model: nn.Module) -> Any | None:
    """The `prepare_inputs_for_generation` that a wrapper has put on `model` for a `generate` call, not the model's own
    (PEFT's prompt learning does, to add a prefix or virtual tokens, and puts the model's own back afterwards); None
    without one."""
    wrapper = vars(model).get("prepare_inputs_for_generation")
    own = getattr(wrapper, "__func__", None) is type(model).prepare_inputs_for_generation
    return None if wrapper is None or own else wrapper


def _peft_prompt_learning(model: nn.Module) -> bool:
    """Whether PEFT's prompt learning (prompt tuning, p-tuning, prefix tuning) has put its
    `prepare_inputs_for_generation` on `model` for a `generate` call (to add the virtual tokens or the prefix)."""
    config = getattr(getattr(_wrapper_prepare_inputs(model), "__self__", None), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@functools.cache
def _peft_reads_past_key_values() -> bool:
    """Whether the installed PEFT's prompt learning reads and replaces the LM cache as `past_key_values` whatever
    transformers names it (peft <= 0.21; 0.22 reads transformers' own name, `cache` on transformers >= 5.24)."""
    try:
        from peft.import_utils import get_transformers_cache_name
    except ImportError:  # peft <= 0.21; or a later one that moved the helper, which still reads transformers' name
        import peft

        return version.parse(peft.__version__).release < (0, 22)
    return get_transformers_cache_name() == "past_key_values"


def _covers_after_a_soft_prompt(image_indices: Any, batch_and_seq: tuple[int, ...]) -> bool:
    """Whether `image_indices` are those of the last positions of a `(batch, seq)` text only: a 2-D tensor of its rows
    and fewer positions, as with a soft prompt before the embedded tokens (PEFT's prompt tuning)."""
    return (
        torch.is_tensor(image_indices)
        and image_indices.ndim == 2
        and image_indices.shape[0] == batch_and_seq[0]
        and image_indices.shape[1] < batch_and_seq[1]
    )


def _is_quantized(parameter: torch.Tensor) -> bool:
    """Whether a parameter holds quantized weights: bitsandbytes' (`Int8Params`; `Params4bit`, with a `quant_state`,
    whatever dtype stores it), or a tensor subclass standing for them (torchao's `AffineQuantizedTensor`, quanto's
    `QTensor`). torch's own subclasses (`DTensor`, `FakeTensor`) and torchao's float8 training weights are not."""
    if getattr(parameter, "quant_state", None) is not None:  # bitsandbytes' Params4bit, whatever its quant_storage
        return True
    data = parameter.data
    if not data.is_floating_point():
        return True
    cls = type(data)
    # torch's own subclasses (DTensor shards, FakeTensor / FunctionalTensor while tracing or estimating memory) and
    # torchao's float8 *training* weights (fp32 weights cast to float8 for FSDP's all-gather) are not quantized
    return cls not in (torch.Tensor, nn.Parameter) and not cls.__module__.startswith(("torch.", "torchao.float8."))


@functools.cache
def _is_peft_layer(cls: type) -> bool:
    """Whether `cls` is a PEFT adapter layer (a class that exists only once `peft` is imported)."""
    base = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    return base is not None and issubclass(cls, base)


def _text_only_forward(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> Any:
    """`model`'s forward of `input_ids` with no image: every token, an `<image>` one too, sees none."""
    return model(input_ids, image_indices=torch.zeros_like(input_ids), **kwargs)


def _holds_no_images(images: Any) -> bool:
    """`pixel_values` or `image_hidden_states` of zero images (`(batch, 0, ...)`, as a collator may stack a text-only
    batch's empty image lists): taken as no images given."""
    return torch.is_tensor(images) and images.ndim >= 2 and images.shape[1] == 0


def _check_one_image_source(pixel_values: Any, image_hidden_states: Any, image_cache: Any) -> None:
    """The images come as one of `pixel_values`, `image_hidden_states` and `image_cache`: with two, which one counts
    would be a guess."""
    given = [
        name
        for name, value in (
            ("pixel_values", pixel_values),
            ("image_hidden_states", image_hidden_states),
            ("image_cache", image_cache),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise ValueError(
            f"Pass the images once: {', '.join(given[:-1])} and {given[-1]} were "
            f"{'both' if len(given) == 2 else 'all'} given (pixel_values: images to encode; image_hidden_states: "
            "images encoded by `get_image_features`; image_cache: an earlier output's keys and values over them)."
        )


def _image_indices_after(last: torch.Tensor, tokens: torch.Tensor, media_token_id: int | None) -> torch.Tensor:
    """The image of each of `tokens` `(batch, n)`, generated after a token whose image is `last` `(batch, 1)`: the
    same; after a generated `<image>`, the next one, as one forward over the whole sequence counts them (the
    original's; beyond the images given, the average of every latent: [`cross_attention_mask`])."""
    if media_token_id is None:
        return last.expand_as(tokens)
    return last + (tokens == media_token_id).cumsum(dim=-1)


def _image_indices_followed_by(
    image_indices: torch.Tensor, tokens: torch.Tensor, media_token_id: int | None
) -> torch.Tensor:
    """`image_indices` `(batch, k)` extended by the `tokens` `(batch, n)` that follow those k: they get their images as
    generated tokens do ([`_image_indices_after`])."""
    after = _image_indices_after(image_indices[:, -1:], tokens, media_token_id)
    return torch.cat((image_indices, after), dim=-1)


def _fed_image_indices(
    last: torch.Tensor, tokens: torch.Tensor, media_token_id: int | None, conditioning: str
) -> torch.Tensor:
    """The image of each of `tokens` `(batch, n)` that generation feeds back after a token whose image is `last`
    `(batch, 1)`, as `config.generated_image_conditioning` says: `"sequence"` as [`_image_indices_after`];
    `"original_kv_cache"` as the original's cached layer state: at a step where any row is fed `<image>`, each row's
    image becomes 1 if its own token is `<image>`, else 0 (none), and stays so until the next such step (the rows by
    position: beam search must not carry `last` along with the beams)."""
    if conditioning == "sequence" or media_token_id is None:
        return _image_indices_after(last, tokens, media_token_id)
    indices = []
    for token in tokens.unbind(dim=-1):
        is_media = (token == media_token_id).unsqueeze(-1)
        last = torch.where(is_media.any(), is_media.to(last.dtype), last)  # no host sync: a compiled step keeps it
        indices.append(last)
    return torch.cat(indices, dim=-1) if indices else last[:, :0]


def gets_weight_decay(parameter_name: str) -> bool:
    """Whether the original's training script decays this parameter (a name of ours, possibly under a wrapper's prefix).

    Its rule (open_flamingo 2.0.1, `train.py`'s `get_grouped_params`, without FSDP or with `--fsdp_use_orig_params`):
    `"gated_cross_attn" in name`: every parameter of the gated cross-attention blocks (gates, biases and LayerNorms
    too), none of the Perceiver's or the embeddings'. (open_flamingo 1.0 spared the gates, biases and norms; 2.0.1's
    FSDP path without `--fsdp_use_orig_params` decays every trainable parameter.)
    """
    return "gated_cross_attn_layers." in parameter_name


class OpenFlamingoCrossAttention(nn.Module):
    """Text tokens attend to the latents of the image that [`cross_attention_mask`] names for them."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def key_values(self, image_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(batch, num_images, num_latents, dim_visual)` -> keys and values `(batch, heads, images * latents, dh)`."""
        weight = self.to_kv.weight
        if weight.is_floating_point() and not _autocast_enabled(image_hidden_states):
            # a Perceiver in another dtype than the blocks (a per-module dtype dict)
            image_hidden_states = _narrowed(image_hidden_states, weight.dtype)
        k, v = self.to_kv(image_hidden_states.flatten(1, 2)).chunk(2, dim=-1)
        # contiguous: computed once per call and read at every step (and FSDP warns about returning views)
        return _split_heads(k, self.heads).contiguous(), _split_heads(v, self.heads).contiguous()

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor,
        keeps_query: torch.Tensor,
        keeps_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(batch, seq, dim)` text hidden states.
            key, value: `(batch, heads, num_images * num_latents, dim_head)`, from [`key_values`].
            attn_mask, keeps_query, keeps_output: from [`cross_attention_mask`].

        Returns:
            `(batch, seq, dim)`.
        """
        # a zero query (`to_q` has no bias) where the softmax is uniform; the product fuses into the LayerNorm when
        # compiled
        normed = self.norm(hidden_states)
        q = self.to_q(normed * keeps_query.to(normed.dtype))
        # in a compiled decoding step on CUDA: `decoding_kernels`' single-query kernel
        out = _merge_heads(scaled_dot_product_attention(_split_heads(q, self.heads), key, value, attn_mask=attn_mask))
        if keeps_output is not None:
            out = out * keeps_output.to(out.dtype)
        return self.to_out(out)


class OpenFlamingoGatedCrossAttentionBlock(GradientCheckpointingLayer):
    """`x = tanh(attn_gate) * xattn(x, images) + x;  x = tanh(ff_gate) * ff(x) + x`; gates start at 0."""

    def __init__(self, config: OpenFlamingoConfig) -> None:
        super().__init__()
        dim = config.text_config.hidden_size
        self.attn = OpenFlamingoCrossAttention(
            dim,
            config.vision_config.hidden_size,
            config.cross_attn_heads,
            config.cross_attn_dim_head,
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = OpenFlamingoFeedForward(dim, config.cross_attn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        keeps_query: torch.Tensor | None = None,
        keeps_output: torch.Tensor | None = None,
        return_key_values: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: `(batch, seq, dim)` text hidden states; with `return_key_values=True`, the image latents
                `(batch, num_images, num_latents, dim_visual)` instead.
            key, value: `(batch, heads, num_images * num_latents, dim_head)`, from a `return_key_values=True` call;
                None for a text-only forward (the cross-attention is skipped, the feed-forward still runs, as in the
                original).
            attn_mask, keeps_query, keeps_output: from [`cross_attention_mask`].
            return_key_values: compute this block's keys and values over the latents instead (through the block's
                own call, so that FSDP, which shards each block as a unit, gathers the block's parameters).

        Returns:
            `(batch, seq, dim)`, or the `(key, value)` pair with `return_key_values=True`.
        """
        if return_key_values:
            return self.attn.key_values(hidden_states)
        # An LM in another dtype than the blocks (transformers 4.x's `dtype={"text_config": torch.bfloat16, "": ...}`,
        # or the reverse): the attention and feed-forward run in the blocks' dtype (under autocast, in the LM's if
        # that is the narrower: autocast picks the matmuls' dtype), the residual stream in the wider of the two, so
        # that a closed gate hands the LM its hidden states back unchanged. With one dtype every cast is a no-op.
        lm_dtype, block_dtype = hidden_states.dtype, self.ff_gate.dtype
        block_is_wider = block_dtype != lm_dtype and torch.promote_types(lm_dtype, block_dtype) == block_dtype
        compute_dtype = lm_dtype if block_is_wider and _autocast_enabled(hidden_states) else block_dtype
        residual_dtype = torch.promote_types(lm_dtype, compute_dtype)
        residual = hidden_states.to(residual_dtype)
        if key is not None:
            attn = self.attn(_narrowed(residual, compute_dtype), key, value, attn_mask, keeps_query, keeps_output)
            residual = residual + (attn * self.attn_gate.tanh().to(attn.dtype)).to(residual_dtype)
        ff = self.ff(_narrowed(residual, compute_dtype))
        residual = residual + (ff * self.ff_gate.tanh().to(ff.dtype)).to(residual_dtype)
        return residual.to(lm_dtype)


# --------------------------------------------------------------------------------------------------------------------
# How the gated blocks reach the language model (one mechanism for every decoder-only LM)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _ActiveCrossAttention:
    """The images of the forward that is running, as the gated decoder layers need them."""

    blocks: nn.ModuleDict
    key_values: dict[str, tuple[torch.Tensor, torch.Tensor]] | None
    # from `cross_attention_mask`, shared by every block
    attn_mask: torch.Tensor | None
    keeps_query: torch.Tensor | None
    keeps_output: torch.Tensor | None
    # the input of decoder layer 0 before its block (with `cross_attn_every_n_layers=1`): the LMs whose hidden states
    # transformers records by hooks on their layers take the first one from layer 0's input, after the block
    first_layer_input: torch.Tensor | None = None


_ACTIVE_CROSS_ATTENTION: contextvars.ContextVar[_ActiveCrossAttention | None] = contextvars.ContextVar(
    "openflamingo_active_cross_attention", default=None
)


# torch.compile (dynamo) cannot trace `ContextVar.get`/`set` (each would break the graph, once per gated layer). While
# it traces a forward, that forward's state is pushed on this list instead, and popped when the forward ends, so here
# too nothing outlives the call (dynamo traces one frame at a time, under its compile lock). Eager calls use the
# context variable, which keeps concurrent threads apart: `is_traced`, not the process-wide `is_compiling`, tells them
# apart, so an eager forward never reads the list that another thread's trace is filling.
_TRACED_CROSS_ATTENTION: list[_ActiveCrossAttention] = []


@contextmanager
def _cross_attention_active(state: _ActiveCrossAttention) -> Iterator[None]:
    if is_traced():
        _TRACED_CROSS_ATTENTION.append(state)
        try:
            yield
        finally:
            _TRACED_CROSS_ATTENTION.pop()
        return
    token = _ACTIVE_CROSS_ATTENTION.set(state)
    try:
        yield
    finally:
        _ACTIVE_CROSS_ATTENTION.reset(token)


class _GatedDecoderLayerMixin:
    """Mixed into the class of each decoder layer that a gated cross-attention block precedes.

    `__call__` (not `forward`) is overridden so that the block runs before, and outside, the layer's own gradient
    checkpoint; the layer's arguments are passed on untouched except for its hidden states (the first positional
    argument, or the `hidden_states` keyword).
    """

    flamingo_layer_idx: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        traced = is_traced() and _TRACED_CROSS_ATTENTION  # (a compiled layer of an eager forward: the context variable)
        active = _TRACED_CROSS_ATTENTION[-1] if traced else _ACTIVE_CROSS_ATTENTION.get()
        if active is not None:
            name = str(self.flamingo_layer_idx)
            key, value = active.key_values[name] if active.key_values is not None else (None, None)
            block = active.blocks[name]
            images = (key, value, active.attn_mask, active.keeps_query, active.keeps_output)
            if self.flamingo_layer_idx == 0:
                active.first_layer_input = args[0] if args else kwargs["hidden_states"]
            if args:
                args = (block(args[0], *images), *args[1:])
            else:
                kwargs["hidden_states"] = block(kwargs["hidden_states"], *images)
        return super().__call__(*args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> tuple:
        # The gated subclass is made at run time and shares its parent's name, so pickle could not find it by name:
        # rebuild it from the parent class (importable) instead. `copy.deepcopy` goes through here as well.
        reduced = super().__reduce_ex__(protocol)
        return (_new_gated_layer, (_original_layer_class(type(self)),), *reduced[2:])


_GATED_LAYER_CLASSES: dict[type, type] = {}


def _new_gated_layer(layer_class: type) -> Any:
    """An empty instance of the gated subclass of `layer_class` (for unpickling)."""
    gated = _gated_layer_class(layer_class)
    return gated.__new__(gated)


def _gated_layer_class(layer_class: type) -> type:
    """The subclass of `layer_class` with the gated cross-attention call; same name, so FSDP wrap policies match."""
    if issubclass(layer_class, _GatedDecoderLayerMixin):
        return layer_class
    if layer_class not in _GATED_LAYER_CLASSES:
        _GATED_LAYER_CLASSES[layer_class] = type(
            layer_class.__name__,
            (_GatedDecoderLayerMixin, layer_class),
            {"__module__": layer_class.__module__, "__qualname__": layer_class.__qualname__},
        )
    return _GATED_LAYER_CLASSES[layer_class]


def _original_layer_class(layer_class: type) -> type:
    """The LM's own class of a decoder layer (the gated subclass counts as its parent)."""
    return layer_class.__bases__[1] if issubclass(layer_class, _GatedDecoderLayerMixin) else layer_class


def find_decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The `nn.ModuleList` of `model`'s `num_layers` repeated layers: an LM's decoder layers (e.g.
    `transformer.blocks`, `model.layers`), or the vision tower's encoder layers ([`repeated_blocks`]).

    The outermost list of that length whose items all share one class is taken, so this works for any decoder-only
    LM without a table of attribute names.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == num_layers
        and len({_original_layer_class(type(layer)) for layer in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"Could not find the layers of {type(model).__name__}: no nn.ModuleList of {num_layers} layers of one "
            "class (its config's num_hidden_layers)."
        )
    return min(candidates, key=lambda item: item[0].count("."))[1]


# --------------------------------------------------------------------------------------------------------------------
# MosaicGPT's QK-LayerNorm on top of transformers' MPT
# --------------------------------------------------------------------------------------------------------------------


def _apply_qk_layernorm(attention: nn.Module, _module: nn.Module, _args: Any, fused_qkv: torch.Tensor) -> torch.Tensor:
    """Forward hook on `Wqkv`: LayerNorm the query and key thirds of its output, as MosaicGPT does."""
    q, k, v = fused_qkv.chunk(3, dim=-1)
    return torch.cat((attention.q_ln(q).to(q.dtype), attention.k_ln(k).to(k.dtype), v), dim=-1)


def _follow_wqkv(attention: nn.Module, _args: Any) -> None:
    """Forward pre-hook on the attention: keep the QK-LayerNorm hook on whatever module `Wqkv` is now.

    PEFT replaces `Wqkv` by a LoRA layer whose output is base + LoRA; the LayerNorm must see that sum, so the hook
    moves to the LoRA layer (and back after `merge_and_unload`).
    """
    wqkv = attention.Wqkv
    state = attention.__dict__
    if state.get("_qk_ln_target") is not wqkv:
        if state.get("_qk_ln_handle") is not None:
            state["_qk_ln_handle"].remove()
        # a partial, not a closure: `copy.deepcopy` copies its arguments, so a copied model uses its own q_ln/k_ln
        state["_qk_ln_handle"] = wqkv.register_forward_hook(functools.partial(_apply_qk_layernorm, attention))
        state["_qk_ln_target"] = wqkv


def _is_mpt(text_config: PretrainedConfig) -> bool:
    """Whether the LM is transformers' MPT (MPT-7B, and MosaicGPT converted to it): the family that needs this
    module's attention, QK-LayerNorm and static-cache additions."""
    return getattr(text_config, "model_type", None) == "mpt"


def _mpt_max_positions(text_config: PretrainedConfig) -> int | None:
    """How many positions an MPT / MosaicGPT LM attends over at most (`max_seq_len`: `MptModel` builds its ALiBi
    bias for that many keys); None for other LMs."""
    return getattr(text_config, "max_seq_len", None) if _is_mpt(text_config) else None


def _untied_at_the_top_only(config: PretrainedConfig) -> bool:
    """The model's config unties the output matrix (`tie_word_embeddings=False`) over an LM config that ties it."""
    return config.tie_word_embeddings is False and getattr(config.text_config, "tie_word_embeddings", False) is True


def _check_mpt_positions(limit: int | None, positions: int, what: str) -> None:
    """An error for more positions than an MPT / MosaicGPT LM's `limit` ([`_mpt_max_positions`]), where a longer input
    failed deep in the attention with a shape error (the original refused it too). `what` names the positions."""
    if limit is not None and positions > limit:
        raise ValueError(
            f"{what} is {positions} positions, more than the MPT / MosaicGPT language model's max_seq_len of {limit} "
            "(its ALiBi bias covers that many). Shorten the input, or raise `model.config.text_config.max_seq_len` "
            "(ALiBi extrapolates to longer sequences, as MPT's model card shows)."
        )


def _layer_norm_factory(wqkv: nn.Module) -> dict[str, Any]:
    """Device and dtype for a LayerNorm beside `wqkv`: its weight's, which may not be the default dtype (transformers
    4.x's `dtype={"text_config": ...}`). A quantized `wqkv` (an integer `weight`, or none, as GPTQ's `qweight`) gives
    its first floating tensor's dtype (GPTQ's `scales`), else only its device."""
    weight = getattr(wqkv, "weight", None)
    tensors = [weight] if isinstance(weight, torch.Tensor) else []
    tensors += [*wqkv.parameters(), *wqkv.buffers()]
    floating = next((tensor for tensor in tensors if tensor.is_floating_point()), None)
    if floating is not None:
        return {"dtype": floating.dtype, "device": floating.device}
    return {"device": tensors[0].device} if tensors else {}


def add_mpt_qk_layernorm(language_model: nn.Module, text_config: PretrainedConfig) -> None:
    """Give transformers' MPT the QK-LayerNorm of MosaicGPT when `text_config.attn_config.qk_ln` is set.

    `q_ln` / `k_ln` are bias-free LayerNorms over the full `d_model` (all heads together), applied to q and k right
    after the fused `Wqkv` projection; their weights live at `...attn.q_ln.weight` / `...attn.k_ln.weight`, as in
    MosaicGPT checkpoints. transformers' own MPT ignores `qk_ln`; this makes it count.
    """
    attn_config = getattr(text_config, "attn_config", None)
    if not _is_mpt(text_config) or not getattr(attn_config, "qk_ln", False):
        return
    if getattr(attn_config, "clip_qkv", None):
        raise ValueError("MPT with both `qk_ln` and `clip_qkv` is not supported.")
    eps = getattr(text_config, "layer_norm_epsilon", 1e-5)
    attentions = [m for m in language_model.modules() if isinstance(getattr(m, "Wqkv", None), nn.Module)]
    if not attentions:
        raise ValueError(f"`qk_ln` is set but {type(language_model).__name__} has no `Wqkv` attention to apply it to.")
    for attention in attentions:
        factory = _layer_norm_factory(attention.Wqkv)
        attention.q_ln = nn.LayerNorm(text_config.hidden_size, eps=eps, bias=False, **factory)
        attention.k_ln = nn.LayerNorm(text_config.hidden_size, eps=eps, bias=False, **factory)
        attention.register_forward_pre_hook(_follow_wqkv)
        _follow_wqkv(attention, ())  # hooked now, so that a compiled first call does not register a hook
        if type(attention) in _MPT_ATTENTION_CLASSES:
            attention.__class__ = _mpt_attention_class(attention, sdpa=type(attention) in _SDPA_MPT_ATTENTIONS)


class _MptStaticCacheView:
    """What transformers' `MptAttention` sees of a static (compileable) cache: the cache, but `get_seq_length() == 0`.

    `MptAttention` uses the length only as `max(0, position_bias.size(1) - (seq_length + cache.get_seq_length()))`,
    where its ALiBi bias has `size(1) == 1`: the result is 0 for any length. A static cache returns that length as a
    tensor, so the Python `max` costs a GPU->CPU sync per layer and breaks a `torch.compile` graph (the reason MPT has
    no static-cache support). Handing it 0 gives the same slice without either.
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def update(self, *args: Any, **kwargs: Any) -> Any:
        return self.cache.update(*args, **kwargs)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0


def _mpt_static_cache_view(_attention: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook on `MptAttention`: pass a static cache as [`_MptStaticCacheView`]."""
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and getattr(cache, "is_compileable", False):
            return args, {**kwargs, name: _MptStaticCacheView(cache)}
    return None


def add_mpt_static_cache_support(language_model: nn.Module, text_config: PretrainedConfig) -> None:
    """Let transformers' MPT decode with a static cache (`cache_implementation="static"`) and `torch.compile`.

    Only `MptAttention` itself needs this: [`OpenFlamingoMptSdpaAttention`] reads the length only for an ALiBi bias
    other than `MptModel`'s (`size(1) > 1`), where 0 would be wrong.
    """
    if not _is_mpt(text_config):
        return
    for module in language_model.modules():
        if isinstance(module, MptAttention):  # again after a switch of class (`set_attn_implementation`)
            hooks = [key for key, hook in module._forward_pre_hooks.items() if hook is _mpt_static_cache_view]
            eager = type(module) not in _SDPA_MPT_ATTENTIONS
            if eager and not hooks:
                module.register_forward_pre_hook(_mpt_static_cache_view, with_kwargs=True)
            elif not eager:
                for key in hooks:
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)


class OpenFlamingoMptSdpaAttention(MptAttention):
    """transformers' `MptAttention` (same parameters, same arguments) through `F.scaled_dot_product_attention`.

    `MptAttention` computes attention as matmul, bias, mask, fp32 softmax, matmul: the `(batch, heads, q, k)` scores
    are materialised and, in training, kept for the backward. Here the ALiBi bias and the mask are folded into one
    additive `attn_mask` and a fused kernel (memory-efficient / cuDNN) does the rest. The bias is in the compute
    dtype, as in MosaicGPT's and MPT's own code (transformers' MPT adds it in fp32). No attention weights are
    returned: load with `attn_implementation="eager"` for those (then `MptAttention` itself runs).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_bias: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """
        Args:
            hidden_states: `(batch, seq, hidden_size)`.
            position_bias: `(heads, 1, max_seq_len)` ALiBi bias, as `MptModel` builds it.
            attention_mask: `(batch, 1, seq, keys)` bool, True where a key is masked.
            cache_position: transformers 4.x only (its caches take it); `cache` / `past_key_values` in `kwargs`.

        Returns:
            `(batch, seq, hidden_size)` and None (no attention weights).
        """
        cache = _lm_cache(kwargs)
        batch_size, seq_length = hidden_states.shape[:2]
        mixed_qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = (_split_heads(x, self.n_heads) for x in mixed_qkv.chunk(3, dim=2))
        if cache is not None:
            cache_kwargs = {"cache_position": cache_position} if cache_position is not None else None
            key, value = cache.update(key, value, self.layer_idx, cache_kwargs)
        bias = None
        if position_bias is not None:
            if position_bias.dim() != 3:
                raise ValueError(f"Expecting position_bias shape to be 3 dimensions, got {position_bias.dim()}")
            # `MptAttention`'s slice; with the bias of `MptModel` (`size(1) == 1`) the query offset is 0 at any length,
            # so the cache's length (a host sync with a static cache) is read only for another bias
            query_offset = 0
            if position_bias.size(1) > 1:
                query_length = seq_length + (cache.get_seq_length() if cache is not None else 0)
                query_offset = max(0, position_bias.size(1) - query_length)
            # (a static cache's keys count at their full length)
            _check_mpt_positions(position_bias.size(2), key.shape[-2], "The attention's key length (cache included)")
            key_offset = max(0, position_bias.size(2) - key.shape[-2])
            bias = position_bias[:, query_offset:, key_offset:].to(query.dtype)
        if attention_mask is not None:
            if bias is None:
                bias = torch.zeros((), dtype=query.dtype, device=query.device)
            bias = bias.masked_fill(attention_mask, torch.finfo(query.dtype).min)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )
        if attention_mask is not None:
            # A query that sees no key (left padding) gets `MptAttention`'s uniform average over all keys and, as there
            # (its scores are replaced, not shifted), no gradient through its scores to the query and the keys.
            blind = attention_mask.all(dim=-1, keepdim=True)  # (batch, 1, seq, 1)
            out = torch.where(blind, value.mean(dim=-2, keepdim=True).to(out.dtype), out)
        return self.out_proj(_merge_heads(out)), None


class OpenFlamingoMosaicGPTAttention(MptAttention):
    """transformers' `MptAttention` in an MPT with MosaicGPT's QK-LayerNorm (`q_ln` / `k_ln`, applied by the hooks of
    [`add_mpt_qk_layernorm`]); nothing else differs.

    A class of its own because `torch.compile` does not check a module's hooks before it reuses code compiled for
    another module of the same class: compiled after an MPT without QK-LayerNorm (of9b's) in the same process,
    MosaicGPT (of3b's) would run that code, without its LayerNorms. The class is checked.
    """


class OpenFlamingoMosaicGPTSdpaAttention(OpenFlamingoMptSdpaAttention):
    """[`OpenFlamingoMptSdpaAttention`] in an MPT with MosaicGPT's QK-LayerNorm: see
    [`OpenFlamingoMosaicGPTAttention`] for why a class of its own."""


_MPT_ATTENTION_CLASSES = (
    MptAttention,
    OpenFlamingoMptSdpaAttention,
    OpenFlamingoMosaicGPTAttention,
    OpenFlamingoMosaicGPTSdpaAttention,
)
_SDPA_MPT_ATTENTIONS = (OpenFlamingoMptSdpaAttention, OpenFlamingoMosaicGPTSdpaAttention)


def _mpt_attention_class(attention: nn.Module, sdpa: bool) -> type:
    """The class an MPT attention module runs as: SDPA or `MptAttention`, with or without MosaicGPT's QK-LN."""
    if "q_ln" in attention._modules:
        return OpenFlamingoMosaicGPTSdpaAttention if sdpa else OpenFlamingoMosaicGPTAttention
    return OpenFlamingoMptSdpaAttention if sdpa else MptAttention


# What `PreTrainedModel.set_attn_implementation` logs about an MPT LM, whose switch `add_mpt_sdpa_attention` makes.
_MPT_ATTENTION_SWITCH_WARNINGS = (
    "MptForCausalLM does not support setting its attention implementation dynamically",
    "attention implementation for the sub-config `text_config.attn_config`",
)


@contextmanager
def _drop_transformers_warnings(
    fragments: Sequence[str], logger_name: str = "transformers.modeling_utils"
) -> Iterator[None]:
    """Drop the records of a transformers logger (`logger_name`) that contain one of `fragments`, for the block."""

    class _Drop(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            message = record.getMessage()
            return not any(fragment in message for fragment in fragments)

    target = std_logging.getLogger(logger_name)
    drop = _Drop()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def add_mpt_sdpa_attention(language_model: nn.Module, text_config: PretrainedConfig, sdpa: bool = True) -> None:
    """Run transformers' MPT attention as [`OpenFlamingoMptSdpaAttention`] (same module, parameters and state dict),
    or, with `sdpa=False`, as `MptAttention` again. Call [`add_mpt_static_cache_support`] after a switch.

    Hooks already on the attention (MosaicGPT's QK-LayerNorm) keep working: only the class changes (to the
    `OpenFlamingoMosaicGPT*` variant with QK-LayerNorm).
    """
    if not _is_mpt(text_config):
        return
    for module in language_model.modules():
        if type(module) in _MPT_ATTENTION_CLASSES:
            module.__class__ = _mpt_attention_class(module, sdpa)


# Whether the `load_state_dict` under way is this model's own with `strict=True` (torch tells the pre-load hook
# `strict=True` in every case): then tied names that a saved folder holds once are filled in.
_FILL_TIED_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("openflamingo_fill_tied_names", default=False)


# What a `from_pretrained` / `from_config` call asks for the LM's attention by name
# (`attn_implementation={"text_config": ...}`, or a name for the whole model), read by the model's `__init__`: the
# config alone cannot tell it from the "eager" that `__init__` writes for MPT's own class into the config a built
# model holds (and `from_config(model.config)` reuses).
_REQUESTED_LM_ATTENTION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "openflamingo_requested_lm_attention", default=None
)


# Whether a `from_pretrained` is building the model: a config untied at the top only (`tie_word_embeddings=False` over
# a tied LM) is untied after the weights load, from the loaded embeddings, not when the LM is built.
_LOADING_PRETRAINED: contextvars.ContextVar[bool] = contextvars.ContextVar("openflamingo_loading", default=False)


def _lm_attention_of(attn_implementation: Any) -> str | None:
    """The LM's attention in an `attn_implementation` argument, as transformers reads it for a sub-model: a name is
    the whole model's, and so the LM's; a dict names it under `"text_config"` (itself a name, or a dict whose `""`
    entry is the LM's own). None: not asked for (a dict's `""` entry is the top-level model's only)."""
    if isinstance(attn_implementation, dict):
        attn_implementation = attn_implementation.get("text_config")
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("")
    return attn_implementation if isinstance(attn_implementation, str) else None


@contextmanager
def _lm_attention_requested(attn_implementation: Any) -> Iterator[None]:
    """Within: the LM's attention asked for in `attn_implementation` ([`_lm_attention_of`]), for the model's
    `__init__` (see `_REQUESTED_LM_ATTENTION`)."""
    token = _REQUESTED_LM_ATTENTION.set(_lm_attention_of(attn_implementation))
    try:
        yield
    finally:
        _REQUESTED_LM_ATTENTION.reset(token)


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


class OpenFlamingoPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention back-ends and gradient checkpointing for the OpenFlamingo models."""

    config_class = OpenFlamingoConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, OpenFlamingoPerceiverResampler):
            init.normal_(module.latents, mean=0.0, std=1.0)
        elif isinstance(module, OpenFlamingoGatedCrossAttentionBlock):
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # the rows `resize_token_embeddings(..., mean_resizing=False)` adds: the LM's own initialisation, as the
            # LM's own resize gives them (torch's default N(0, 1) would be ~50x the scale of a trained matrix)
            language_model = getattr(self, "language_model", None)
            if isinstance(language_model, PreTrainedModel):
                language_model._init_weights(module)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    init.zeros_(module.weight[module.padding_idx])


@functools.lru_cache(maxsize=256)
def _parameters_of(function: Any) -> tuple[frozenset[str], bool]:
    """The parameter names `function` declares, and whether it also takes `**kwargs`."""
    parameters = inspect.signature(function).parameters
    return frozenset(parameters), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _accepted_kwargs(module: nn.Module) -> frozenset[str] | None:
    """Names that `module.forward` accepts, or None if it takes `**kwargs`."""
    forward = module.forward
    # A bound method of the class: its function's signature, looked up once (`inspect.signature` costs more than a
    # decoding step's Python). A `forward` set on the instance (e.g. by accelerate's hooks) is inspected every time.
    function = getattr(forward, "__func__", None)
    if inspect.isfunction(function):
        names, var_keyword = _parameters_of(function)
    else:
        names, var_keyword = _parameters_of.__wrapped__(forward)
    return None if var_keyword else names


def _forward_parameters(module_class: type) -> frozenset[str]:
    """The parameters `module_class.forward` names explicitly (what a `**kwargs` would silently drop is not here)."""
    return _parameters_of(module_class.forward)[0]


def _position_ids_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """`(batch, seq)` position ids from a padding mask as transformers 5's `generate` makes them: 0 on each row's first
    real token (left padding), 0 at padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).masked_fill(attention_mask == 0, 0)


def _new_token_rows_not_loadable() -> ValueError:
    return ValueError(
        "These weights hold `new_token_embeddings` (the <image> / <|endofchunk|> rows trained after "
        "`freeze_for_training()`), which this model does not have: call `model.freeze_for_training()` before "
        "loading them (e.g. before `PeftModel.from_pretrained(model, adapter)` or `model.load_adapter(adapter)`), or "
        "they would be dropped. An adapter folder is loaded onto its base model, not with `from_pretrained` alone."
    )


def _adapter_new_token_rows(adapter: Any, state_dict: Mapping[str, Any] | None) -> tuple[str, int] | None:
    """The key and number of the `new_token_embeddings` rows that a PEFT adapter (a local folder, or its state dict)
    holds; None when it holds none, or when that cannot be told without loading it (a hub id)."""
    if state_dict is not None:
        shapes = {key: tuple(getattr(value, "shape", ())) for key, value in state_dict.items()}
    else:
        path = os.path.join(adapter, "adapter_model.safetensors") if adapter is not None else None
        if path is None or not os.path.isfile(path):
            return None
        from safetensors import safe_open

        with safe_open(path, "pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    for key, shape in shapes.items():
        if _is_new_token_rows(key, shape):
            return key, shape[0]
    return None


def _is_new_token_rows(key: str, shape: tuple[int, ...]) -> bool:
    """Whether `key` holds rows trained after `freeze_for_training` (`new_token_embeddings.weight`, also as PEFT's
    `modules_to_save` wraps it: `new_token_embeddings.modules_to_save.<name>.weight`)."""
    return ".new_token_embeddings." in f".{key}" and key.endswith(".weight") and len(shape) == 2


def _new_token_rows_mismatch(key: str, rows: int, token_ids: list[int]) -> ValueError:
    return ValueError(
        f"{key} holds {rows} trained embedding rows, but this model trains {len(token_ids)} (token ids {token_ids}): "
        "set it up with the `new_token_ids` the rows were trained with, freeze_for_training(new_token_ids=[...]), "
        "before loading them."
    )


# `torch.compile`d versions of the loss, one per set of compile arguments (a model keeps the arguments, which pickle).
_COMPILED_LOSSES: dict[str, Any] = {}


def _compiled_loss(compile_kwargs: dict[str, Any]) -> Any:
    key = repr(sorted(compile_kwargs.items()))
    if key not in _COMPILED_LOSSES:
        _COMPILED_LOSSES[key] = torch.compile(OpenFlamingoForConditionalGeneration.causal_lm_loss, **compile_kwargs)
    return _COMPILED_LOSSES[key]


_GENERATE_SIGNATURE = inspect.signature(GenerationMixin.generate)


def _generation_setting(kwargs: dict[str, Any], config: GenerationConfig, name: str, default: Any = None) -> Any:
    """A `generate` setting as `generate` resolves it: the argument, else the generation config's, else `default`
    (None counts as unset at each step; transformers 5's `GenerationConfig` leaves unset fields None)."""
    return next((v for v in (kwargs.get(name), getattr(config, name, None)) if v is not None), default)


def _generate_keywords(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate`'s arguments as keywords: positional ones by `GenerationMixin.generate`'s signature (`inputs`,
    `generation_config`, `logits_processor`, ...), and `inputs` as `input_ids`, so that every check of the call reads
    them wherever they were given. Raises `TypeError` as Python does for too many or repeated arguments."""
    if args:
        positional = _GENERATE_SIGNATURE.bind_partial(None, *args).arguments  # (None for `self`)
        del positional["self"]
        repeated = [name for name in positional if name in kwargs]
        if repeated:
            raise TypeError(f"generate() got multiple values for argument {repeated[0]!r}")
        kwargs = {**positional, **kwargs}
    if "inputs" in kwargs and "input_ids" not in kwargs:  # (`GenerationMixin` takes either, as the same)
        kwargs = {**kwargs, "input_ids": kwargs["inputs"]}
        del kwargs["inputs"]
    return kwargs


class OpenFlamingoForConditionalGeneration(OpenFlamingoPreTrainedModel, GenerationMixin):
    """
    OpenFlamingo: interleaved images and text in, text out.

    Submodules: `vision_model` (`CLIPVisionModel`), `perceiver` (Perceiver Resampler), `language_model` (the causal LM,
    native parameter names) and `gated_cross_attn_layers` (`ModuleDict` keyed by the index of the decoder layer that
    each block precedes).
    """

    def __init__(self, config: OpenFlamingoConfig) -> None:
        config.check()  # again: `from_pretrained(path, **overrides)` sets fields after the config's __init__
        # What was asked for the LM: by name in the building call (`attn_implementation="eager"` or
        # `{"text_config": ...}`), else the LM's config's value (a name for the whole config is set there too), else
        # nothing (the default, SDPA), as for any other LM: a dict's `""` entry is the top-level model's only. A
        # config reused from a built MPT model (`from_config(model.config)`) holds the "eager" written below for MPT's
        # own class (marked so): that LM ran SDPA, whatever the model's own value.
        text = getattr(config.text_config, "_attn_implementation_internal", None)
        if text == "eager" and getattr(config, LM_SDPA_WRITTEN_AS_EAGER, False):
            text = "sdpa"  # what that LM runs (this package's SDPA attention), whatever the model's own value
        lm_requested = _REQUESTED_LM_ATTENTION.get() or text  # None: the default
        super().__init__(config)
        # `_from_config`, as the LM's `from_config`: each built in its sub-config's dtype (transformers 4.x's
        # `from_pretrained(dtype={"vision_config": ..., "text_config": ..., "": ...})`)
        vision_model = CLIPVisionModel._from_config(config.vision_config)
        perceiver = OpenFlamingoPerceiverResampler(config)
        if _is_mpt(config.text_config) and config.text_config._attn_implementation == "sdpa":
            # asked for by name (`attn_implementation="sdpa"`): transformers' MPT has eager attention only, and the
            # SDPA one is this package's (`add_mpt_sdpa_attention`, after the LM is built)
            config.text_config._attn_implementation = "eager"
        if _untied_at_the_top_only(config) and not _LOADING_PRETRAINED.get():
            config.text_config.tie_word_embeddings = False  # the LM is built untied (from_pretrained: after loading)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # registered after the LM, built before it (the same random initialisation as ever): PEFT's prompt tuning and
        # p-tuning embed the tokens with the word embeddings of the first `PreTrainedModel` child
        self.vision_model, self.perceiver = vision_model, perceiver
        add_mpt_qk_layernorm(self.language_model, config.text_config)
        lm_sdpa = lm_requested != "eager"  # "eager" keeps MPT's own (attention weights)
        if lm_sdpa:
            add_mpt_sdpa_attention(self.language_model, config.text_config)
        if _is_mpt(config.text_config):  # (its config says "eager" either way: transformers' MPT has no other)
            setattr(config, LM_SDPA_WRITTEN_AS_EAGER, lm_sdpa)
        add_mpt_static_cache_support(self.language_model, config.text_config)  # what `MptAttention` itself needs
        self._loss_compile_kwargs: dict[str, Any] | None = None  # set by `compile_repeated_blocks`
        # looked up once here, not in `forward` (which torch.compile traces)
        self._lm_takes_logits_to_keep = "logits_to_keep" in _forward_parameters(type(self.language_model))
        # an LM that builds its masks with transformers' `masking_utils` passes a 4-D mask to its attention as it is
        # (GPT-NeoX, LLaMA, ...); older code (e.g. 4.x's XGLM) inverts a 1 = attend mask itself
        lm_module = sys.modules.get(type(self.language_model).__module__)
        self._lm_passes_4d_mask_on = hasattr(lm_module, "create_causal_mask") and not _is_mpt(config.text_config)
        self.gated_cross_attn_layers = nn.ModuleDict(
            {str(i): OpenFlamingoGatedCrossAttentionBlock(config) for i in config.cross_attn_layer_indices}
        )
        decoder_layers = find_decoder_layers(self.language_model, config.text_config.num_hidden_layers)
        for i in config.cross_attn_layer_indices:
            layer = decoder_layers[i]
            layer.__class__ = _gated_layer_class(type(layer))
            layer.flamingo_layer_idx = i
        # Runs before any hook that `freeze_for_training` adds: those read the names this one puts in place.
        self.register_load_state_dict_pre_hook(self._state_dict_pre_load_hook)
        if self._auto_class is not None:
            # transformers 4.x's AutoModelForVision2Seq, and AutoModel, load saved folders with trust_remote_code too.
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            config.auto_map = {
                **(getattr(config, "auto_map", None) or {}),
                "AutoModelForVision2Seq": name,
                "AutoModel": name,
            }
        self._no_split_modules = [
            type(decoder_layers[0]).__name__,
            "OpenFlamingoGatedCrossAttentionBlock",
            "OpenFlamingoPerceiverLayer",
            "CLIPEncoderLayer",
        ]
        self.post_init()
        # transformers 5's `post_init` adds the children's names (CLIPVisionModel's include CLIPTextEmbeddings, absent
        # here); FSDP auto-wrap (accelerate) rejects a name that matches no module, so keep the names that are present.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = type(self._no_split_modules)(n for n in self._no_split_modules if n in present)
        if self.generation_config is not None and config.eos_token_id is not None:
            # Like the original's `generate`: stop at <|endofchunk|> by default (`config.eos_token_id`), not at the
            # LM's own eos. A folder without generation_config.json gets it from config.json the same way.
            self.generation_config.eos_token_id = config.eos_token_id

    # ---- embeddings (delegated to the language model) ----

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _attention_weights_unavailable(self) -> bool:
        """Whether the LM's attention is this package's SDPA attention for MPT, which returns no weights."""
        if not _is_mpt(self.config.text_config):
            return False
        return any(type(m) in _SDPA_MPT_ATTENTIONS for m in self.language_model.modules())

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Yes: the vision tower and the LM switch through transformers (MPT through `set_attn_implementation` below),
        and the Perceiver's and the cross-attention's attention is SDPA either way (transformers' source heuristic,
        which looks for `ALL_ATTENTION_FUNCTIONS` in this module, would say no and leave `config._attn_implementation`
        as it was)."""
        return True

    def set_attn_implementation(self, attn_implementation: str | dict[str, str], *args: Any, **kwargs: Any) -> None:
        """[`~PreTrainedModel.set_attn_implementation`]. transformers' MPT has eager attention only: with an MPT /
        MosaicGPT LM, "eager" (for the whole model, or under `"text_config"` in a dict, whose `""` entry is the
        top-level model's only) switches to its `MptAttention` (attention weights), any other value to
        [`OpenFlamingoMptSdpaAttention`] (the default); for MosaicGPT their QK-LayerNorm variants,
        [`OpenFlamingoMosaicGPTAttention`] / [`OpenFlamingoMosaicGPTSdpaAttention`]."""
        text = self.config.text_config
        if not _is_mpt(text):
            super().set_attn_implementation(attn_implementation, *args, **kwargs)
            return
        # transformers warns that `MptForCausalLM` (and its `attn_config`) cannot switch: the switch is done below.
        with _drop_transformers_warnings(_MPT_ATTENTION_SWITCH_WARNINGS):
            super().set_attn_implementation(attn_implementation, *args, **kwargs)
        requested = _lm_attention_of(attn_implementation)
        if requested is None:  # (a dict's `""` entry is the top-level model's only: the LM keeps its attention)
            return
        add_mpt_sdpa_attention(self.language_model, text, sdpa=requested != "eager")
        add_mpt_static_cache_support(self.language_model, text)
        text._attn_implementation = "eager"
        setattr(self.config, LM_SDPA_WRITTEN_AS_EAGER, requested != "eager")  # (a model built from the config follows)
        from .fast_decoding import forget_decoders  # (imported here: that module imports this one)

        forget_decoders(self)  # their graphs hold the attention they were captured with

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers < 5.23 (then it does this)

        def gradient_checkpointing_enable(
            self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
        ) -> None:
            """[`~PreTrainedModel.gradient_checkpointing_enable`], non-reentrant unless `use_reentrant` is given (the
            default of transformers 4.x is reentrant). A reentrant checkpoint gives no gradient to the weights inside
            it when none of its inputs needs one: LoRA in the LM's layers before the first gated block, with the
            embeddings frozen, would silently not train. With `use_reentrant=True` asked for, the input embeddings'
            output is made to need a gradient (`enable_input_require_grads`), as transformers >= 5.23 does."""
            checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)
            if checkpoint_kwargs["use_reentrant"]:
                self.enable_input_require_grads()

    def enable_input_require_grads(self) -> None:
        """[`~PreTrainedModel.enable_input_require_grads`] for both towers and the Perceiver: the input embeddings'
        outputs (the vision tower's patch embedding too, as transformers >= 5.23 hooks every sub-model's) and the
        Perceiver's input (the frozen tower's features, made without gradients) need a gradient, else a reentrant
        checkpoint gives trainable weights inside a frozen part (e.g. LoRA's in the vision tower, the Perceiver or the
        blocks' `to_kv`) no gradient."""
        super().enable_input_require_grads()
        if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers < 5.23: the LM's alone
            self.vision_model.enable_input_require_grads()

        # (named as transformers' hook: decoding, under `no_grad`, needs nothing of it, and the fast path's
        # decoders do not count it among the hooks that change a forward)
        def make_inputs_require_grads(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            features = args[0] if args else None
            if torch.is_tensor(features) and torch.is_grad_enabled() and not features.requires_grad:
                return (features.detach().requires_grad_(True), *args[1:])
            return None

        previous = self.__dict__.pop("_perceiver_require_grads_hook", None)
        if previous is not None:
            previous.remove()
        self._perceiver_require_grads_hook = self.perceiver.register_forward_pre_hook(make_inputs_require_grads)

    def disable_input_require_grads(self) -> None:
        super().disable_input_require_grads()
        if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
            self.vision_model.disable_input_require_grads()
        hook = self.__dict__.pop("_perceiver_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    if _CHECKPOINTS_WITHOUT_GRADIENTS:  # transformers < 5.24 (then its checkpointed layers do this)

        def _set_gradient_checkpointing(
            self,
            enable: bool = True,
            gradient_checkpointing_func: Any = torch.utils.checkpoint.checkpoint,
            **kwargs: Any,
        ) -> None:
            """As `PreTrainedModel`'s, with layers that run as they are without gradients, as on transformers >= 5.24:
            the frozen vision tower (run under `no_grad`) is not checkpointed for nothing, nor warns at every step
            (reentrant) that none of its inputs needs a gradient."""

            def checkpoint_with_gradients(function: Any, *args: Any, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return function(*args, **kwargs)
                return gradient_checkpointing_func(function, *args, **kwargs)

            # (`kwargs`: what later versions pass, e.g. 5.18-5.22's `every_n_layers`)
            super()._set_gradient_checkpointing(enable, checkpoint_with_gradients, **kwargs)

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """[`~PreTrainedModel.resize_token_embeddings`], refusing a size that would drop the rows of the model's own
        tokens (`<image>`, `<|endofchunk|>`, pad, eos): the config would then name ids the LM has no row for."""
        if new_num_tokens is not None:
            rows = new_num_tokens
            if pad_to_multiple_of:
                rows = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
            ids = {name: value for name, value in self.config.special_token_ids() if value >= rows}
            if ids:
                raise ValueError(
                    f"Resizing the embeddings to {rows} rows would drop the rows of {ids}; keep at least "
                    f"{max(ids.values()) + 1} (the tokenizer's length, with OpenFlamingo's added tokens)."
                )
            rows_in_training = self._modules.get("new_token_embeddings")
            trained = [i for i in getattr(rows_in_training, "token_id_list", ()) if i >= rows]
            if trained:
                raise ValueError(
                    f"Resizing the embeddings to {rows} rows would drop token ids {trained}, whose rows "
                    "freeze_for_training() is training (new_token_embeddings); keep at least "
                    f"{max(trained) + 1}."
                )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def set_decoder(self, decoder: nn.Module) -> None:
        """The LM's decoder (its base model, as [`get_decoder`] returns it), not the whole LM."""
        self.language_model.set_decoder(decoder)

    # ---- images ----

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Encode images: CLIP patch features of the last layer (no CLS token, no `post_layernorm`), then the Perceiver.

        Args:
            pixel_values: `(batch, num_images, 3, H, W)`, or the original layout `(batch, num_images, 1, 3, H, W)`.

        Returns:
            `(batch, num_images, num_latents, vision_hidden_size)`.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        batch_size, num_images = pixel_values.shape[:2]
        # a frozen tower runs without gradients (no activations kept), unless the pixels themselves need one
        # (saliency maps, adversarial images): freezing weights never stops the gradient to the inputs
        needs_grad = pixel_values.requires_grad or any(p.requires_grad for p in self.vision_model.parameters())
        weight = self.vision_model.get_input_embeddings().weight
        _check_left_on_cpu("pixel_values", pixel_values, weight.device, dispatched=hasattr(self, "hf_device_map"))
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            patches = self.vision_model(pixel_values=pixel_values.flatten(0, 1).to(weight.dtype)).last_hidden_state
        patches = patches[:, 1:].unflatten(0, (batch_size, num_images))
        return self.perceiver(patches.to(self.perceiver.latents.dtype))

    def _text_only_batches_run_the_image_path(self, labels: torch.Tensor | None) -> bool:
        """Whether a forward without images runs the image path on a blank image (see `forward`): in a loss step
        (training, or an evaluation with labels; never generation) under `torch.distributed` with several ranks."""
        return (
            ((self.training and torch.is_grad_enabled()) or labels is not None)
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` checked against the config, as `(batch, num_images, 3, H, W)` (from the 6-D layout too)."""
        if not (torch.is_tensor(pixel_values) and pixel_values.is_floating_point()):
            got = pixel_values.dtype if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be a floating-point tensor, normalized as the processor outputs it; got {got}."
            )
        if pixel_values.ndim == 6:
            if pixel_values.shape[2] != 1:
                raise ValueError(
                    f"pixel_values of shape {tuple(pixel_values.shape)} has {pixel_values.shape[2]} frames per image; "
                    "OpenFlamingo takes one frame (batch, num_images, 1, 3, H, W)."
                )
            pixel_values = pixel_values.squeeze(2)
        size = self.config.vision_config.image_size
        channels = self.config.vision_config.num_channels
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values must have shape (batch, num_images, {channels}, {size}, {size}) (or the original "
                f"(batch, num_images, 1, {channels}, {size}, {size})); got {tuple(pixel_values.shape)}."
            )
        return pixel_values

    def _check_input_shapes(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_hidden_states: torch.Tensor | None,
        image_indices: torch.Tensor | None,
        labels: torch.Tensor | None,
        image_cache: OpenFlamingoImageCache | None = None,
        spans_cache: bool = False,
    ) -> None:
        """Shapes and dtypes of the inputs against each other (host-side metadata only: no device sync).
        `attention_mask` spans the cached tokens too when continuing from a cache: then only its rank, rows and
        (4-D) query length are checked."""
        _check_tensors(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            image_indices=image_indices,
            pixel_values=pixel_values,
        )
        if input_ids is not None and (input_ids.ndim != 2 or not _is_integer(input_ids)):
            raise ValueError(
                f"input_ids must be integer token ids of shape (batch, seq); got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}."
            )
        if inputs_embeds is not None:
            width = self._input_embedding_width()
            if inputs_embeds.ndim != 3 or (width is not None and inputs_embeds.shape[-1] != width):
                raise ValueError(
                    f"inputs_embeds must have shape (batch, seq, {width or 'hidden'}) (the width of the LM's input "
                    f"embeddings); got {tuple(inputs_embeds.shape)}."
                )
        text = input_ids if input_ids is not None else inputs_embeds
        batch_and_seq = tuple(text.shape[:2])
        if not spans_cache:  # (with a cache, its attention counts the keys: `OpenFlamingoMptSdpaAttention`)
            _check_mpt_positions(_mpt_max_positions(self.config.text_config), batch_and_seq[1], "The input")
        if labels is not None and not _is_integer(labels):
            raise ValueError(f"labels must be integer token ids (-100 where ignored); got {labels.dtype}.")
        if torch.is_tensor(attention_mask):  # (not a flex attention `BlockMask`, which `generate` may make)
            self._check_attention_mask(attention_mask, batch_and_seq, spans_cache)
            # (`generate` gives MPT 4-D masks in MPT's own convention, with a cache only)
            if attention_mask.ndim == 4 and not spans_cache and _is_mpt(self.config.text_config):
                raise ValueError(
                    "A 4-D attention_mask with an MPT / MosaicGPT language model: transformers' MPT reads 4-D masks in "
                    "its own way (5.x: True as masked, the opposite of the other LMs and of "
                    "`causal_attention_mask_4d`; 4.x: other numbers again). Pass the 2-D padding mask, which MPT reads "
                    "on the device (no host sync)."
                )
        if pixel_values is not None:
            self._check_pixel_values(pixel_values)
        if image_hidden_states is not None:
            latents, dim = self.config.perceiver_num_latents, self.config.vision_config.hidden_size
            if (
                image_hidden_states.ndim != 4
                or tuple(image_hidden_states.shape[2:]) != (latents, dim)
                or not image_hidden_states.is_floating_point()
            ):
                raise ValueError(
                    f"image_hidden_states must be floating point of shape (batch, num_images, {latents}, {dim}) "
                    f"(`get_image_features`); got {image_hidden_states.dtype} {tuple(image_hidden_states.shape)}."
                )
        for name, images in (("pixel_values", pixel_values), ("image_hidden_states", image_hidden_states)):
            if images is not None and images.shape[0] != batch_and_seq[0]:
                raise ValueError(
                    f"{name} has {images.shape[0]} rows but the text has {batch_and_seq[0]}: one row of images per "
                    "row of text (zero-padded where a row has fewer images)."
                )
        if image_cache is not None:
            self._check_image_cache(image_cache, batch_and_seq[0])
        # a soft prompt before the embedded tokens (PEFT's prompt tuning): checked in the forward
        soft_prompted = input_ids is None and _covers_after_a_soft_prompt(image_indices, batch_and_seq)
        if image_indices is not None and (
            (tuple(image_indices.shape) != batch_and_seq and not soft_prompted) or not _is_integer(image_indices)
        ):
            raise ValueError(
                f"image_indices must be integers of shape (batch, seq) = {batch_and_seq}; got {image_indices.dtype} "
                f"{tuple(image_indices.shape)}."
            )
        if labels is not None and tuple(labels.shape) != batch_and_seq:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; the text has {batch_and_seq}.")

    def _input_embedding_width(self) -> int | None:
        """The width of what the LM's input embeddings return (its hidden size, or e.g. OPT's `word_embed_proj_dim`)."""
        embedding = self.get_input_embeddings()
        width = getattr(embedding, "embedding_dim", None)
        weight = getattr(embedding, "weight", None)
        return width if width is not None else weight.shape[-1] if torch.is_tensor(weight) else None

    @staticmethod
    def _check_attention_mask(attention_mask: torch.Tensor, batch_and_seq: tuple[int, int], spans_cache: bool) -> None:
        """A 2-D padding mask `(batch, seq)` (`(batch, cached + seq)` when continuing from a cache), or a 4-D mask
        `(batch or 1, heads or 1, seq, keys)` (see `forward`)."""
        batch, seq = batch_and_seq
        shape = tuple(attention_mask.shape)
        if attention_mask.ndim in (5, 6) and attention_mask.is_floating_point():
            raise ValueError(
                f"attention_mask of shape {shape} looks like images: the forward's second positional argument is "
                "`attention_mask` (as in transformers), not `pixel_values`: pass the images by keyword, "
                "model(input_ids, pixel_values=...)."
            )
        if attention_mask.ndim == 2:
            fits = shape[0] == batch and (shape[1] >= seq if spans_cache else shape[1] == seq)
            expected = f"({batch}, {'cached + ' if spans_cache else ''}{seq})"
        elif attention_mask.ndim == 4:
            fits = shape[0] in (1, batch) and shape[2] == seq and (spans_cache or shape[3] == seq)
            expected = f"({batch} or 1, heads or 1, {seq}, {'cached + ' if spans_cache else ''}{seq})"
        else:
            fits, expected = False, f"({batch}, {seq}) (1 for real tokens, 0 for padding), or a 4-D mask"
        if not fits:
            raise ValueError(f"attention_mask must have shape {expected}; got {shape}.")

    def _check_image_cache(self, image_cache: OpenFlamingoImageCache, batch_size: int) -> None:
        """An `image_cache` against the model (one keys/values pair per gated block) and the text's rows."""
        if not isinstance(image_cache, OpenFlamingoImageCache):
            raise ValueError(
                "image_cache must be the `image_cache` of an earlier output (an OpenFlamingoImageCache); got "
                f"{type(image_cache).__name__}."
            )
        key_values, last = image_cache.key_values or (), image_cache.last_image_index
        blocks = len(self.gated_cross_attn_layers)
        if len(key_values) != blocks:
            raise ValueError(
                f"image_cache holds the keys and values of {len(key_values)} gated cross-attention blocks; this model "
                f"has {blocks}: it was made by another model."
            )
        rows = {key_values[0][0].shape[0]} if key_values else set()
        if last is not None:
            rows.add(last.shape[0] if last.ndim else 0)
        if rows - {batch_size}:
            raise ValueError(
                f"image_cache has {min(rows - {batch_size})} rows but the text has {batch_size}: pass the image_cache "
                "of a call on the same rows (`generate` repeats it for beams itself; see "
                "`OpenFlamingoImageCache.repeat_interleave`)."
            )

    def _num_cached_images(self, image_cache: OpenFlamingoImageCache) -> int:
        """How many images per row `image_cache`'s keys and values are over."""
        key_values = image_cache.key_values
        return key_values[0][0].shape[-2] // self.config.perceiver_num_latents if key_values else 0

    def _image_indices(self, input_ids: torch.Tensor, num_images: int) -> torch.Tensor:
        if self.config.media_token_id is None:
            raise ValueError("config.media_token_id is not set: the model cannot find the <image> tokens.")
        return image_indices_from_input_ids(input_ids, self.config.media_token_id, num_images)

    def _image_indices_with_soft_prompt(self, inputs_embeds: torch.Tensor, image_indices: torch.Tensor) -> torch.Tensor:
        """`image_indices` `(batch, k)` of the last k positions of `inputs_embeds` `(batch, seq, hidden)`, made
        `(batch, seq)`: the positions before them (a soft prompt, as PEFT's prompt tuning and p-tuning prepend to the
        embedded tokens) see no image. Checked against the `<image>` embeddings the positions hold, so that indices of
        other positions are refused, not shifted."""
        prefix = inputs_embeds.shape[1] - image_indices.shape[1]
        found = None
        if self.config.media_token_id is not None:
            found = (self._media_ids_from_embeds(inputs_embeds) == self.config.media_token_id).cumsum(dim=-1)
        if found is None or bool(found[:, prefix - 1].any()) or not torch.equal(found[:, prefix:], image_indices):
            raise ValueError(
                f"image_indices {tuple(image_indices.shape)} cover the last {image_indices.shape[1]} of the "
                f"{inputs_embeds.shape[1]} positions of inputs_embeds (a soft prompt before them, as PEFT's prompt "
                "tuning prepends), but they do not number the <image> embeddings of those positions, with none "
                "before: pass image_indices (batch, seq) for every position, or none (the images are then placed by "
                "the <image> embeddings)."
            )
        return torch.cat((image_indices.new_zeros(image_indices.shape[0], prefix), image_indices), dim=-1)

    def _media_ids_from_embeds(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`(batch, seq)`: `config.media_token_id` where a position of `inputs_embeds` `(batch, seq, hidden)` holds the
        `<image>` token's input embedding, -1 elsewhere: ids to find the `<image>` tokens in."""
        media = self.config.media_token_id
        ids = torch.full((1, 1), media, dtype=torch.long, device=inputs_embeds.device)
        row = self.get_input_embeddings()(ids).to(inputs_embeds.dtype)
        return torch.where((inputs_embeds == row).all(dim=-1), media, -1)

    def _cross_attention_key_values(
        self, image_hidden_states: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        blocks = self.gated_cross_attn_layers.values()
        return tuple(block(image_hidden_states, return_key_values=True) for block in blocks)

    # ---- forward ----

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        image_indices: torch.LongTensor | None = None,
        image_cache: OpenFlamingoImageCache | None = None,
        past_key_values: Any | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Any | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> OpenFlamingoCausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids, with one `<image>` token where each image stands.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding; with a cache `(batch_size, cached + sequence_length)`. A 4-D mask
                `(batch_size or 1, 1, sequence_length, keys)` goes to the LM: for GPT-NeoX, LLaMA, ... boolean
                (`causal_attention_mask_4d`: True where a query attends to a key; made additive for an attention
                other than SDPA) or additive. MPT / MosaicGPT read a 4-D mask in their own way (transformers 5.x's
                `MptModel`: True where masked, as `generate` makes it for a static cache): give them the 2-D mask (a
                4-D one is refused unless continuing from a cache).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_images, 3, H, W)`, *optional*):
                The images of each row, in the order of its `<image>` tokens; rows with fewer images are zero-padded
                (padding images are never attended while a row has no more `<image>` tokens than images of its own,
                which the processor checks: the model cannot tell padding from an image; with
                `only_attend_immediate_media=False` a row's tokens before its first image average every latent,
                padding included, as in the original: README, Exactness). The original 6-D layout
                `(batch, num_images, 1, 3, H, W)` is accepted too. Zero images (`num_images == 0`) are as none given.
                None (and no `image_hidden_states` / `image_cache`): text only. Under `torch.distributed` with several
                ranks a loss step of text only runs the image path on a blank image that no token attends to (the
                same result; every rank then runs the same modules, as DDP and FSDP need).
            image_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_images, num_latents, dim)`, *optional*):
                Already encoded images ([`get_image_features`]), instead of `pixel_values`.
            image_indices (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                For each token, the 1-based number of the latest `<image>` at or before it (0: none), whose image it
                attends to (with `only_attend_immediate_media`; without it, every image up to it). A number beyond
                the images given (after an `<image>` that `generate` produced) attends to every latent equally, as
                the original. Values must be >= 0 (not read by the forward, whose training step makes no host sync:
                a negative value acts as 0). By default made from `input_ids`; when continuing from a cache,
                counted on from the prompt's last image.
            image_cache (`OpenFlamingoImageCache`, *optional*):
                `output.image_cache` of an earlier call on the same rows: the cross-attention keys and values over the
                images, reused instead of recomputed. Pass it with `past_key_values` to continue a sequence. The
                LM cache that a forward with images returns holds it too: a continued forward given that cache and
                no image source uses the cache's images (`image_indices`, when given, say which one), so a loop that
                passes only `past_key_values` after the first step (as for llava or mllama) goes on seeing them,
                under `torch.compile` too (with a dynamic cache; with a static one, pass `image_cache`).
            past_key_values (`Cache`, *optional*): the LM's key/value cache (`cache` on transformers >= 5.24).
            inputs_embeds (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                The LM's input embeddings, instead of `input_ids` (exactly one of the two). With images, the `<image>`
                positions are the rows equal to the `<image>` token's input embedding, unless `image_indices` are
                given; `image_indices` may cover only the last positions (a soft prompt before them, as PEFT's
                prompt tuning prepends).
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Passed to the LM (where its forward takes them).
            use_cache (`bool`, *optional*):
                Return the LM's cache (and `image_cache`); defaults to `config.use_cache`, and to `False` for a
                training step (train mode, gradients on, no cache given).
            output_attentions, output_hidden_states, return_dict (`bool`, *optional*):
                As for any transformers model; default to the model's config. MPT / MosaicGPT with SDPA attention (the
                default) return no attention weights.
            cache (`Cache`, *optional*): `past_key_values` under its transformers >= 5.24 name (either one).
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets for the LM loss; -100 is ignored. Shifted inside, as for any causal LM.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Return logits for the last `logits_to_keep` positions only (0: all), as transformers' causal LMs do;
                `generate` uses 1 for the prompt step, which spares a `(batch, prompt_len, vocab)` tensor. Not
                with `labels` (an error).

        Returns:
            [`OpenFlamingoCausalLMOutputWithPast`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past = cache if cache is not None else past_key_values
        if isinstance(past, (tuple, list)):
            raise ValueError(
                "past_key_values must be a transformers Cache (e.g. the `past_key_values` of an earlier output, or "
                "`transformers.DynamicCache(legacy)` for a tuple `legacy` of per-layer (key, value) tensors; "
                "`DynamicCache.from_legacy_cache` is gone in transformers 5); got a "
                f"{type(past).__name__}."
            )
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        _check_one_image_source(pixel_values, image_hidden_states, image_cache)
        self._check_input_shapes(
            input_ids,
            inputs_embeds,
            attention_mask=attention_mask,
            spans_cache=past is not None,  # then the mask spans the cached tokens too
            pixel_values=pixel_values,
            image_hidden_states=image_hidden_states,
            image_indices=image_indices,
            labels=labels,
            image_cache=image_cache,
        )
        # The images that a cache holds: in eager code (`_cache_images_apply`), and traced by `torch.compile` with
        # a dynamic cache (`_cache_images_apply_traced`: unchecked there)
        eager = _cache_images_apply()
        # (whether traced code may: decided on the caller's `image_indices`, before they are made below)
        may_trace_images = not eager and _cache_images_apply_traced(None, image_indices)
        traced = may_trace_images and past is not None and _is_dynamic_cache(past)
        cached_length = past.get_seq_length() if (eager or traced) and past is not None else 0
        rows, new_positions = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        checked = (rows, cached_length) if eager else (None, None)
        if (eager or traced) and past is not None and cached_length == 0:
            _store_image_cache(past, None, *checked)  # a new sequence (a reset or reused cache): no images yet
        elif (
            (eager or traced)
            and cached_length > 0
            and all(x is None for x in (pixel_values, image_hidden_states, image_cache))
        ):
            # the images of the forward that filled `past`, if it had any (`image_indices` given say which one)
            image_cache = _image_cache_on(past, *checked)
        continuing = cached_length > 0 if eager or traced else past is not None and past.get_seq_length() > 0
        if (
            eager
            and isinstance(cached_length, int)
            and torch.is_tensor(attention_mask)
            and attention_mask.ndim == 2
            and attention_mask.shape[-1] < cached_length + new_positions
        ):
            # the LM reads such a mask as that of the first positions (its own forward takes it silently): the
            # cached keys were masked or attended by the wrong columns, and the new tokens' logits were others
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} positions, but past_key_values holds {cached_length} "
                f"and input_ids add {new_positions}: continuing from a cache, the 2-D mask covers the cached tokens "
                f"too, (batch, cached + new) = {(rows, cached_length + new_positions)} (append the new tokens' ones "
                "to the previous mask)."
            )
        pixel_values, image_hidden_states = (
            None if _holds_no_images(x) else x for x in (pixel_values, image_hidden_states)
        )
        if use_cache is None and past is None and self.training and torch.is_grad_enabled():
            use_cache = False  # a training step has no use for a KV cache (and a compiled block would guard on it)
        # unset flags follow this model's config (as in any transformers model), not the LM's own `text_config`
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_attentions and not is_traced() and self._attention_weights_unavailable():
            logger.warning_once(
                "output_attentions=True: MPT's attention runs through SDPA here, which returns no attention weights "
                "(`attentions` holds None for the LM's layers). Load with attn_implementation='eager', or call "
                "model.set_attn_implementation('eager'), for them."
            )
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)

        # The checks that read input_ids on the host come before the images are encoded: the device has that work
        # queued while the host waits, instead of idling while the host then queues everything after the check.
        key_values, num_images = None, None
        if pixel_values is not None:  # checked above (`_check_input_shapes`); dim 1 in both layouts
            num_images = pixel_values.shape[1]
        elif image_hidden_states is not None:
            num_images = image_hidden_states.shape[1]
        elif image_cache is not None:
            key_values = image_cache.key_values
            num_images = self._num_cached_images(image_cache)
        has_images = num_images is not None

        if image_indices is not None and input_ids is None and image_indices.shape[-1] < inputs_embeds.shape[1]:
            if continuing:  # (a soft prompt comes before the prompt's tokens, in the first forward only)
                raise ValueError(
                    f"image_indices must be integers of shape (batch, seq) = {tuple(inputs_embeds.shape[:2])}; got "
                    f"{tuple(image_indices.shape)}: a soft prompt before the embedded tokens (as PEFT's prompt tuning "
                    "prepends) goes into the first forward only, not into one that continues from a cache."
                )
            image_indices = self._image_indices_with_soft_prompt(inputs_embeds, image_indices)
        placing_ids = input_ids  # the ids that the <image> tokens are found in
        if input_ids is None and image_indices is None and has_images and self.config.media_token_id is not None:
            # `inputs_embeds` alone (e.g. PEFT's prompt tuning prepends learned ones): the <image> tokens are the rows
            # that equal the <image> token's embedding, as transformers' vision-language models find them
            placing_ids = self._media_ids_from_embeds(inputs_embeds)
        if image_indices is None and placing_ids is not None and has_images and is_traced():
            # traced (`torch.compile(model)`, `torch.export`): the checks below read input_ids on the host, a graph
            # break (an export error); the numbering is theirs, unchecked. Pass image_indices to have them checked.
            if continuing and image_cache is None:
                raise ValueError(_CONTINUING_WITH_IMAGES)  # (as below, where it needs no input_ids either)
            last = image_cache.last_image_index.unsqueeze(-1) if continuing else placing_ids.new_zeros(())
            image_indices = _image_indices_after(last, placing_ids, self.config.media_token_id)
        # (traced without images: no check either, it reads input_ids on the host)
        checks = image_indices is None and placing_ids is not None and self.config.media_token_id is not None
        if checks and (has_images or not is_traced()):
            has_media = bool((placing_ids == self.config.media_token_id).any())
            if has_media and not has_images:
                raise ValueError(
                    "input_ids contain <image> tokens but no images were given (pixel_values, image_hidden_states "
                    "or image_cache)."
                )
            if continuing and image_cache is not None:
                offset = image_cache.last_image_index.unsqueeze(-1)
                image_indices = offset + self._image_indices(placing_ids, num_images)
                if bool((image_indices[:, -1] > num_images).any()):
                    raise ValueError(
                        f"The continued input_ids add <image> tokens beyond the {num_images} images of image_cache."
                    )
            elif has_images:
                if not has_media and not continuing:
                    if input_ids is None:
                        raise ValueError(
                            "Images were given but no position of inputs_embeds holds the <image> token's embedding "
                            "(`model.get_input_embeddings()` of it) to place them: pass image_indices."
                        )
                    raise ValueError("Images were given but input_ids contain no <image> token to place them.")
                if continuing:
                    raise ValueError(_CONTINUING_WITH_IMAGES)
                image_indices = self._image_indices(placing_ids, num_images)
        if has_images and image_indices is None:
            if input_ids is not None:  # (the only way here: no `media_token_id` to find the <image> tokens by)
                self._image_indices(input_ids, num_images)
            raise ValueError("With inputs_embeds and images, pass image_indices.")

        blank_image = None
        if not has_images and self._text_only_batches_run_the_image_path(labels):
            # A text-only batch in distributed training (DDP, FSDP, DeepSpeed ZeRO-3): the vision tower, the Perceiver
            # and every block's cross-attention run on one blank image that no token attends to (their output is
            # masked to exactly zero), so that every rank runs the same modules whatever its batch holds: DDP waits
            # for every trainable parameter's gradient, FSDP and ZeRO-3 gather each unit's parameters in collectives
            # that every rank must join (a rank skipping them hangs the others or fails their collective).
            text = input_ids if input_ids is not None else inputs_embeds
            batch_size, seq_len = text.shape[:2]
            size = self.config.vision_config.image_size
            blank = torch.zeros(1, 1, 3, size, size, device=text.device)  # (cast to the tower's dtype there)
            blank_image = self.get_image_features(blank).expand(batch_size, -1, -1, -1)
            key_values = self._cross_attention_key_values(blank_image)
            image_indices = torch.zeros(batch_size, seq_len, dtype=torch.long, device=blank.device)
        elif pixel_values is not None:
            image_hidden_states = self.get_image_features(pixel_values)
        elif image_hidden_states is not None:
            # given features in the dtype of the model's own (the Perceiver's), as `pixel_values` are cast
            image_hidden_states = image_hidden_states.to(self.perceiver.latents.dtype)
        if image_hidden_states is not None:
            key_values = self._cross_attention_key_values(image_hidden_states)

        named_key_values = None
        if key_values:
            named_key_values = dict(zip(self.gated_cross_attn_layers.keys(), key_values, strict=True))
        if torch.is_tensor(attention_mask) and attention_mask.ndim == 4:
            attention_mask = self._lm_attention_mask_4d(attention_mask)
        lm_kwargs = self._language_model_kwargs(
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        if past is not None:
            lm_kwargs[_CACHE_FIELD if self._lm_accepts(_CACHE_FIELD) else "past_key_values"] = past
        keeps_some = not (isinstance(logits_to_keep, int) and logits_to_keep == 0)
        if labels is not None and keeps_some:
            # transformers' causal LMs slice the logits and then fail on the labels' length; ignoring it would
            # return every position's logits (and score them all) where the caller asked for the last ones
            raise ValueError(
                "logits_to_keep with labels: the loss needs every position's logits. Pass labels=None and compute "
                "the loss from the kept logits, or leave logits_to_keep at 0."
            )
        slice_logits = labels is None and keeps_some
        if slice_logits and self._lm_takes_logits_to_keep:
            lm_kwargs["logits_to_keep"], slice_logits = logits_to_keep, False
        attn_mask = keeps_query = keeps_output = None
        if key_values:
            attn_mask, keeps_query, keeps_output = cross_attention_mask(
                image_indices,
                key_values[0][0].shape[-2],
                self.config.perceiver_num_latents,
                # (a blank image is attended by no token: with `False`, tokens before the first image would average it)
                self.config.only_attend_immediate_media or blank_image is not None,
            )
        active = _ActiveCrossAttention(
            self.gated_cross_attn_layers,
            named_key_values,
            attn_mask,
            keeps_query,
            keeps_output,
        )
        with _cross_attention_active(active):
            outputs = self.language_model(
                input_ids=input_ids, inputs_embeds=inputs_embeds, return_dict=True, **lm_kwargs
            )

        hidden_states = outputs.hidden_states
        if hidden_states is not None and hidden_states[0] is not None and active.first_layer_input is not None:
            # the embeddings, as transformers' LMs and the original give them, not the first block's output
            hidden_states = (active.first_layer_input, *hidden_states[1:])
        logits = outputs.logits
        if slice_logits:  # an LM that cannot skip the logits itself
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = logits[:, keep]
        loss = None
        if labels is not None:
            compiled = self._loss_compile_kwargs is not None
            loss_function = _compiled_loss(self._loss_compile_kwargs) if compiled else self.causal_lm_loss
            loss = loss_function(logits, labels, num_items_in_batch)

        new_cache = getattr(outputs, _CACHE_FIELD, None)
        new_image_cache = None
        if (
            blank_image is None
            and key_values is not None
            and (use_cache if use_cache is not None else new_cache is not None)
        ):
            last = image_indices[:, -1] if image_indices.shape[-1] else image_cache.last_image_index
            new_image_cache = OpenFlamingoImageCache(key_values=key_values, last_image_index=last)
        if new_cache is not None and new_image_cache is not None:  # (`past` filled in place, or a new one)
            if eager:
                _store_image_cache(new_cache, new_image_cache, rows, cached_length + new_positions)
            elif traced or (may_trace_images and past is None and _is_dynamic_cache(new_cache)):
                _store_image_cache(new_cache, new_image_cache, None, None)
        output = OpenFlamingoCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=hidden_states,
            attentions=getattr(outputs, "attentions", None),  # (state-space LMs such as Mamba return none)
            image_hidden_states=image_hidden_states,
            image_cache=new_image_cache,
            **{_CACHE_FIELD: new_cache},
        )
        return output if return_dict else output.to_tuple()

    def _lm_attention_mask_4d(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """A 4-D mask as the LM's attention reads it. transformers passes a 4-D mask to the attention function as it
        is: SDPA reads a boolean one (True: attend, as `causal_attention_mask_4d` makes it) as a mask, but eager and
        flex attention add it to the scores, so a boolean one becomes additive here (0 where True, the dtype's
        minimum where False). A float mask is taken to be additive already. Only for an LM that builds its masks with
        transformers' `masking_utils` (which passes a 4-D one on as it is): others (MPT, 4.x's XGLM, ...) read a 4-D
        mask in their own way, and get it unchanged."""
        if (
            attention_mask.dtype != torch.bool
            or self.config.text_config._attn_implementation == "sdpa"
            or not self._lm_passes_4d_mask_on
        ):
            return attention_mask
        dtype = self.language_model.dtype
        additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return additive.masked_fill(~attention_mask, torch.finfo(dtype).min)

    @staticmethod
    def causal_lm_loss(
        logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """The loss `forward` returns with `labels`: each position's logits score the next token (cross-entropy in
        fp32), the mean over labels != -100, or their sum divided by `num_items_in_batch` (`Trainer`'s count of the
        accumulated batch's targets) when it is given. `label_smoothing` as `torch.nn.functional.cross_entropy` takes
        it (`forward` uses none): a `Trainer` `compute_loss_func` can call this with it (`examples/finetune.py`).

        Args:
            logits (`torch.Tensor` of shape `(batch_size, sequence_length, vocab_size)`): the model's logits.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): the input ids, -100 where no loss
                is wanted (not shifted: position t's logits score `labels[:, t + 1]`).

        Returns:
            `torch.Tensor`: the loss, a 0-d fp32 tensor."""
        logits = logits[:, :-1].float().flatten(0, 1)
        targets = labels[:, 1:].to(logits.device).flatten()
        if num_items_in_batch is None:
            return F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=label_smoothing)
        loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch

    def _lm_accepts(self, name: str) -> bool:
        accepted = _accepted_kwargs(self.language_model)
        return accepted is None or name in accepted

    def _language_model_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """Drop unset arguments, and those the LM's forward does not take (only an LM whose forward has no
        `**kwargs` drops any: transformers' LMs take them all)."""
        accepted = _accepted_kwargs(self.language_model)
        return {k: v for k, v in kwargs.items() if v is not None and (accepted is None or k in accepted)}

    # ---- generation ----

    def _resolved_generation_config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        """The generation config that `generate` decodes with: the model's, or a `generation_config` given to the call
        completed as transformers completes it (the fields it leaves unset taken from the model's, on transformers
        >= 4.50), so that the checks before decoding read the settings the decoding will use."""
        given = kwargs.get("generation_config")
        if given is None:
            return self.generation_config
        others = {name: value for name, value in kwargs.items() if name != "generation_config"}
        return self._prepare_generation_config(given, **others)[0]

    def _prepare_attention_mask_for_generation(
        self, inputs_tensor: torch.Tensor, generation_config: GenerationConfig, model_kwargs: dict[str, Any]
    ) -> torch.LongTensor:
        """`GenerationMixin`'s mask for a call given none (from the pad token, where it is in the prompt and is no end
        id), with a row of padding only refused as in a given mask."""
        attention_mask = super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)
        _check_no_empty_row(attention_mask, INFERRED_MASK)
        return attention_mask

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """
        [`~GenerationMixin.generate`], with the images encoded once per call, before any beam or sample expansion.

        Takes everything `GenerationMixin.generate` takes (decoding strategy, `generation_config`, logits processors,
        stopping criteria, `streamer`, ...) plus the image inputs of [`forward`]:

        - `input_ids` `(batch, prompt_len)`, left-padded, with one `<image>` token where each image stands;
        - `attention_mask` `(batch, prompt_len)`;
        - `pixel_values` `(batch, num_images, 3, H, W)` (zero-padded for rows with fewer images; omit it for
          text-only prompts), or already encoded `image_hidden_states` `(batch, num_images, num_latents, dim)`, or
          the `image_cache` of an earlier output on the same rows (its images: the prompt's `<image>` tokens are
          numbered as with `pixel_values`, unless `image_indices` are given). One of the three.

        The vision tower and the Perceiver run here, once, on the `batch` rows; the first forward computes the
        cross-attention keys/values over the latents of the (beam- or sample-expanded) batch once, and every later step
        reuses them (`image_cache`) together with the LM's KV cache. Every generated token sees the last image of its
        row's prompt (none for a text-only row), until a generated `<image>` token is fed back; then
        `config.generated_image_conditioning` says what follows, as the original generated: `"sequence"`, the token
        starts the row's next image (beyond the images given, it and the tokens after it attend to every latent
        equally; those of a text-only call stay text only, while a row with fewer images than the batch attends to
        the zero-padding image after its own, as README's "Batches" says); `"original_kv_cache"`, every row is
        conditioned on that step's tokens alone, by row position: those fed `<image>` see their first image, the
        others none. Without `eos_token_id`, generation stops at `generation_config.eos_token_id`:
        `config.eos_token_id`, which is `<|endofchunk|>` unless the config says otherwise.

        With `cache_implementation="static"` on a CUDA device, plain greedy decoding and plain beam search (no
        sampling, logits processors, streamers or extra outputs) run a fast path of their own: one compiled decoding
        step replayed as a CUDA graph, with the same sequences as `GenerationMixin`'s loop (`fast_decoding.py`:
        `_StaticGreedyDecoder`, `_StaticBeamDecoder`). Its first call per batch size and cache length compiles.

        Returns:
            As `GenerationMixin.generate`: `torch.LongTensor` of shape
            `(batch * num_return_sequences, prompt_len + new_tokens)` (the prompt's ids included when `input_ids` were
            given; from `inputs_embeds` alone, the new tokens only), or a `GenerateOutput` with
            `return_dict_in_generate=True`.
        """
        kwargs = _generate_keywords(args, kwargs)
        if torch.is_tensor(kwargs.get("generation_config")):
            raise ValueError(
                "generate's second positional argument is `generation_config` (as in transformers), not an image "
                "tensor: pass the images by keyword, generate(input_ids, pixel_values=...); the original's "
                "generate(vision_x, lang_x) is generate(input_ids=lang_x, pixel_values=vision_x) here."
            )
        _check_tensors(**{k: kwargs.get(k) for k in ("input_ids", "attention_mask", "pixel_values", "image_indices")})
        generation_config = self._resolved_generation_config(kwargs)
        self._check_cache_support(kwargs, generation_config)
        _check_one_image_source(*(kwargs.get(name) for name in ("pixel_values", "image_hidden_states", "image_cache")))
        input_ids = kwargs.get("input_ids")
        if torch.is_tensor(input_ids) and input_ids.shape[-1] == 0 and kwargs.get("inputs_embeds") is None:
            raise ValueError(
                "generate needs a prompt of at least one token; input_ids has none (the released tokenizers add no "
                "BOS token, so an empty text gives no tokens). Start the prompt with some text or an <image>."
            )
        _check_no_empty_row(kwargs.get("attention_mask"), "generate")
        chunked = kwargs.get("prefill_chunk_size", getattr(generation_config, "prefill_chunk_size", None))
        if kwargs.get("assistant_early_exit", getattr(generation_config, "assistant_early_exit", None)) is not None:
            raise ValueError(
                "assistant_early_exit (self-speculative decoding from an early layer, as LayerSkip models are trained "
                "for) is not supported: OpenFlamingo's LMs have no early-exit head, and the early layers alone skip "
                "the later cross-attention blocks. Use prompt_lookup_num_tokens or an assistant_model instead."
            )
        media = self.config.media_token_id
        if kwargs.get("token_healing", getattr(generation_config, "token_healing", None)) and (
            any(kwargs.get(name) is not None for name in ("pixel_values", "image_hidden_states", "image_cache"))
            or (torch.is_tensor(input_ids) and media is not None and bool((input_ids == media).any()))
        ):
            raise ValueError(
                "token_healing with images is not supported: transformers' token healing decodes the prompt with "
                "skip_special_tokens=True and tokenizes that text again, which drops the <image> (and "
                "<|endofchunk|>) tokens, so the images would no longer be placed. Leave token_healing unset."
            )
        if kwargs.get("inputs_embeds") is not None and kwargs.get("assistant_model") is not None:
            raise ValueError(
                "Assisted decoding (assistant_model) with inputs_embeds is not supported (it gave other tokens than "
                "greedy decoding on transformers 5.x, and failed on 4.x): pass input_ids alone, or leave "
                "assistant_model unset."
            )
        if chunked is not None and _peft_prompt_learning(self):
            raise ValueError(
                "prefill_chunk_size with PEFT's prompt learning (prompt tuning, p-tuning, prefix tuning) is not "
                "supported: PEFT's prepare_inputs_for_generation keeps only the last token of every chunk after the "
                "first (a plain LM then generates other tokens). Leave prefill_chunk_size unset."
            )
        if chunked is not None and kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            if not torch.is_tensor(input_ids) or input_ids.shape[-1] != embeds.shape[1]:
                got = f"input_ids {tuple(input_ids.shape)}" if torch.is_tensor(input_ids) else "no input_ids"
                raise ValueError(
                    "prefill_chunk_size splits the prompt's input_ids into chunks, each fed its inputs_embeds: pass "
                    f"the ids of every embedded position (got {got} for inputs_embeds {tuple(embeds.shape)}), or "
                    "leave prefill_chunk_size unset."
                )
            kwargs["prefill_chunked_embeds"] = True  # [`prepare_inputs_for_generation`] feeds each chunk its own
        if torch.is_tensor(kwargs.get("inputs_embeds")):
            # `GenerationMixin` appends the generated tokens to the ids given with the embeddings (none, the
            # embedded positions' or a soft prompt's fewer): [`prepare_inputs_for_generation`] finds them after these
            kwargs["embeds_prompt_ids"] = input_ids.shape[-1] if torch.is_tensor(input_ids) else 0
            embedded, given = kwargs["inputs_embeds"].shape[:2], kwargs["embeds_prompt_ids"]
            if 0 < given != embedded[-1] and kwargs.get("attention_mask") is None:
                # `GenerationMixin` would make the mask from the ids, of another length (an error deep in the LM)
                raise ValueError(
                    f"inputs_embeds hold {embedded[-1]} positions and input_ids {given}: pass an attention_mask of "
                    f"shape {tuple(embedded)}, 1 for every embedded position to attend to."
                )
        self._extend_image_indices(input_ids, kwargs)
        if torch.is_tensor(input_ids) and kwargs.get("inputs_embeds") is None:
            # before the images are encoded or expanded for beams: the errors then name the caller's shapes
            images = (kwargs.get("pixel_values"), kwargs.get("image_hidden_states"))
            attention_mask = kwargs.get("attention_mask")
            self._check_input_shapes(
                input_ids,
                None,
                attention_mask if torch.is_tensor(attention_mask) else None,
                *images,
                image_indices=kwargs.get("image_indices"),
                labels=None,
                image_cache=kwargs.get("image_cache"),
                spans_cache=_lm_cache(kwargs) is not None,
            )
        for key in ("pixel_values", "image_hidden_states"):
            if _holds_no_images(kwargs.get(key)):
                del kwargs[key]
        self._check_generated_positions(kwargs, generation_config)
        # with an assistant model, `pixel_values` stay: it encodes them with its own vision tower and Perceiver
        encode = self._prepare_images_for_generation(input_ids, kwargs) and kwargs.get("assistant_model") is None
        self._prepare_generated_image_state(kwargs, generation_config)
        from .fast_decoding import generate_static  # (imported here: that module imports this one)

        with _gradient_checkpointing_paused(self):
            fast = generate_static(self, kwargs)  # encodes the images itself, inside its prompt graph
            if fast is not None:
                return fast
            if encode:
                kwargs["image_hidden_states"] = self.get_image_features(kwargs.pop("pixel_values"))
            return super().generate(**kwargs)

    def _prepare_generated_image_state(self, kwargs: dict[str, Any], generation_config: GenerationConfig) -> None:
        """With `config.generated_image_conditioning="original_kv_cache"` and a cache (the original's generation with a
        KV cache), `generated_image_state` in `kwargs`: each row's image after the prompt, `(batch, 1)`, which
        [`prepare_inputs_for_generation`] updates as generated tokens are fed. Without a cache the original ran one
        forward over the whole sequence per step (`"sequence"`); candidates that an assistant or prompt lookup feeds
        and then rejects would corrupt the state, so those calls decode as `"sequence"` too."""
        image_indices = kwargs.get("image_indices")
        use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
        if (
            self.config.generated_image_conditioning == "sequence"
            or not torch.is_tensor(image_indices)
            or image_indices.ndim != 2
            or image_indices.shape[-1] == 0
            or use_cache is False
            or any(kwargs.get(name) is not None for name in ("assistant_model", "prompt_lookup_num_tokens"))
            or getattr(generation_config, "prompt_lookup_num_tokens", None) is not None
        ):
            return
        kwargs["generated_image_state"] = image_indices[:, -1:].clone()

    def _check_generated_positions(self, kwargs: dict[str, Any], generation_config: GenerationConfig) -> None:
        """An MPT / MosaicGPT LM refuses a prompt plus `max_new_tokens` (or a `max_length`) beyond its `max_seq_len`
        before decoding starts, rather than at the step that crosses it (or at the first, with a static cache)."""
        limit = _mpt_max_positions(self.config.text_config)
        text = next((kwargs[k] for k in ("inputs_embeds", "input_ids") if torch.is_tensor(kwargs.get(k))), None)
        if limit is None or text is None:
            return
        max_new_tokens, max_length = (
            _generation_setting(kwargs, generation_config, name) for name in ("max_new_tokens", "max_length")
        )
        if isinstance(max_new_tokens, int):
            _check_mpt_positions(
                limit, text.shape[1] + max_new_tokens, f"The prompt ({text.shape[1]}) plus max_new_tokens"
            )
        elif max_length is None or (kwargs.get("max_length") is None and max_length == GenerationConfig().max_length):
            # no length set (or transformers 4's default of 20, which it reads as new tokens): `generate` makes
            # transformers' default of 20 new tokens
            default = max_length or 20
            _check_mpt_positions(
                limit, text.shape[1] + default, f"The prompt ({text.shape[1]}) plus the default {default} new tokens"
            )
        else:
            _check_mpt_positions(limit, max_length, "max_length")

    def _check_cache_support(self, kwargs: dict[str, Any], generation_config: GenerationConfig) -> None:
        """A static (compileable) cache with an MPT / MosaicGPT LM needs transformers >= 5: 4.x's `MptModel` checks a
        4-D mask against the cache's filled length, not its fixed one, and fails deep inside with a shape error.
        With `use_cache=False` no cache is made from `cache_implementation`: only a cache object given is refused."""
        if not _is_mpt(self.config.text_config) or _TRANSFORMERS_MAJOR >= 5:
            return
        implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
        if kwargs.get("use_cache", getattr(generation_config, "use_cache", True)) is False:
            implementation = None  # no cache is made (a cache object given is still one)
        caches = (kwargs.get(name) for name in ("past_key_values", "cache"))
        if implementation in _COMPILEABLE_CACHES or any(getattr(c, "is_compileable", False) for c in caches):
            what = f"cache_implementation={implementation!r}" if implementation else "a compileable cache object"
            raise ValueError(
                f"A static cache ({what}) with an MPT / MosaicGPT language model "
                f"needs transformers >= 5 (this is {_TRANSFORMERS_VERSION}, whose MptModel cannot mask one). Leave "
                "cache_implementation unset to decode with the dynamic cache, or upgrade transformers."
            )

    def _get_candidate_generator(self, *args: Any, **kwargs: Any) -> Any:
        """As `GenerationMixin`'s, with an OpenFlamingo assistant model given the images encoded once, by its own
        vision tower and Perceiver (`image_hidden_states`): it is called anew for every round of candidates, and
        `pixel_values` would be encoded again each time (transformers 4.x) or dropped after its first forward (5.x)."""
        generator = super()._get_candidate_generator(*args, **kwargs)
        assistant = getattr(generator, "assistant_model", None)
        assistant_kwargs = getattr(generator, "assistant_kwargs", None)
        # (by model type, not class: a PEFT-wrapped assistant, or one loaded with trust_remote_code, is another class)
        is_openflamingo = getattr(getattr(assistant, "config", None), "model_type", None) == self.config.model_type
        if is_openflamingo and isinstance(assistant_kwargs, dict):
            assistant_kwargs.pop("image_cache", None)  # this model's cross-attention keys/values, not the assistant's
            pixel_values = assistant_kwargs.pop("pixel_values", None)
            if pixel_values is not None:
                with torch.no_grad():
                    assistant_kwargs["image_hidden_states"] = assistant.get_image_features(pixel_values)
        elif assistant is not None and isinstance(assistant_kwargs, dict):
            # a text-only draft model (a plain causal LM of the same tokenizer): it drafts without the images, and
            # this model verifies every candidate with them, so the tokens stay those of greedy decoding
            for name in ("pixel_values", "image_hidden_states", "image_cache", "image_indices", *_GENERATE_STATE_KEYS):
                assistant_kwargs.pop(name, None)
        return generator

    def _extend_image_indices(self, input_ids: Any, kwargs: dict[str, Any]) -> None:
        """As an assistant model (`generation_config.is_assistant`), `image_indices` of the prompt given with
        `input_ids` that continue it (assisted decoding calls its assistant's `generate` with the tokens generated so
        far): the later tokens get their images as generated tokens do ([`prepare_inputs_for_generation`]), in place
        in `kwargs`."""
        image_indices = kwargs.get("image_indices")
        if not getattr(kwargs.get("generation_config"), "is_assistant", False):
            return  # anyone else's `image_indices` must cover `input_ids` (the shape check says so)
        if not (
            torch.is_tensor(input_ids) and torch.is_tensor(image_indices) and self.config.media_token_id is not None
        ):
            return
        if input_ids.ndim != 2 or image_indices.ndim != 2 or image_indices.shape[0] != input_ids.shape[0]:
            return  # the shape check names them
        grown = input_ids.shape[1] - image_indices.shape[1]
        if grown > 0 and image_indices.shape[1] > 0 and not image_indices.is_floating_point():
            following = input_ids[:, image_indices.shape[1] :]
            kwargs["image_indices"] = _image_indices_followed_by(image_indices, following, self.config.media_token_id)

    def _prepare_images_for_generation(self, input_ids: Any, kwargs: dict[str, Any]) -> bool:
        """Pin each prompt token's image (`image_indices`), in place in `kwargs`; True when `pixel_values` are then
        to be encoded once, before decoding.

        Inputs that the first forward rejects (`<image>` tokens without images, images without `<image>` tokens) are
        left alone, so that `generate` raises the same errors as `forward`.
        """
        media = self.config.media_token_id
        embeds = kwargs.get("inputs_embeds")
        image_cache = kwargs.get("image_cache")
        pixel_values, image_hidden_states = kwargs.get("pixel_values"), kwargs.get("image_hidden_states")
        has_images = any(images is not None for images in (pixel_values, image_hidden_states, image_cache))
        if kwargs.get("image_indices") is not None:
            # placed by the caller (a collator's batch, inputs_embeds): the pixels are still encoded once, not per beam
            given = kwargs["image_indices"]
            if torch.is_tensor(embeds) and embeds.ndim == 3 and _covers_after_a_soft_prompt(given, embeds.shape[:2]):
                # those of the positions after a soft prompt, as the forward takes them (checked there too)
                kwargs["image_indices"] = self._image_indices_with_soft_prompt(embeds, given)
            if pixel_values is not None:
                kwargs["pixel_values"] = self._check_pixel_values(pixel_values)
            return pixel_values is not None
        if media is None:
            return False
        if (
            torch.is_tensor(embeds)
            and embeds.ndim == 3
            and not (torch.is_tensor(input_ids) and tuple(input_ids.shape) == tuple(embeds.shape[:2]))
        ):
            # `inputs_embeds` without the ids of each embedded position
            if not has_images:
                # Text only: the tokens see no image, a generated <image> included (as with input_ids below).
                kwargs["image_indices"] = embeds.new_zeros(embeds.shape[:2], dtype=torch.long)
                return False
            # the <image> tokens are the positions that hold the <image> token's embedding (as the forward finds them)
            input_ids = self._media_ids_from_embeds(embeds)
        if (
            not torch.is_tensor(input_ids)
            or input_ids.ndim != 2
            or input_ids.is_floating_point()
            # `inputs_embeds` with the `input_ids` they embed (as `generate` takes both) place the images by those
            or (embeds is not None and (not torch.is_tensor(embeds) or tuple(embeds.shape[:2]) != input_ids.shape))
        ):
            return False
        has_media = bool((input_ids == media).any())
        cache = _lm_cache(kwargs)
        cached_length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if has_media and not has_images and cached_length > 0:
            # continuing from the cache of a call with images: its images
            image_cache = _image_cache_on(cache, input_ids.shape[0], cached_length)
            if image_cache is not None:
                kwargs["image_cache"] = image_cache
        if image_cache is not None:
            # The images of an earlier call: the <image> tokens are numbered as with pixel_values, a continued
            # sequence's too (`generate` takes the whole sequence with past_key_values), so that an <image> beyond the
            # cached images is refused and a generated one is counted as with the other image sources.
            if not has_media:
                raise ValueError(
                    "Images were given (image_cache) but input_ids contain no <image> token to place them."
                )
            kwargs["image_indices"] = self._image_indices(input_ids, self._num_cached_images(image_cache))
            return False
        if not has_media and not has_images:
            # Text only: tokens see no image, a generated <image> included.
            kwargs["image_indices"] = torch.zeros_like(input_ids)
            return False
        if has_media and not has_images and _lm_cache(kwargs) is not None:
            # Continuing from a cache, the forward sees only the new tokens: it would decode them as text only.
            raise ValueError(
                "input_ids contain <image> tokens but no images were given (pixel_values, image_hidden_states or "
                "image_cache): continuing from past_key_values, pass the images again (pixel_values, or the "
                "image_hidden_states of `get_image_features`, or a forward output's image_cache), as the prompt's "
                "tokens need them. If those <image> tokens were generated in a "
                "text-only conversation, pass image_indices=torch.zeros_like(input_ids) to keep it text only."
            )
        if not has_media or not has_images:  # (two image sources: refused by `generate` before this)
            return False
        if pixel_values is not None:
            pixel_values = kwargs["pixel_values"] = self._check_pixel_values(pixel_values)
        images = image_hidden_states if image_hidden_states is not None else pixel_values
        # the forward's error on a count mismatch
        kwargs["image_indices"] = self._image_indices(input_ids, images.shape[1])
        return pixel_values is not None

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        *args: Any,
        inputs_embeds: torch.FloatTensor | None = None,
        image_cache: OpenFlamingoImageCache | None = None,
        image_indices: torch.LongTensor | None = None,
        generated_image_state: torch.LongTensor | None = None,
        prefill_chunked_embeds: bool = False,
        embeds_prompt_ids: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """After the prompt, images are not re-encoded: new tokens reuse `image_cache` and see the prompt's last image.

        `image_indices` `(batch, prompt_len)` are the prompt's (set by [`generate`]); tokens generated after it get the
        prompt's last image, or, after a generated `<image>`, the next one (there is no image for it: the average of
        every latent, as in the original's forward over the whole sequence). So a step with the LM cache and a full
        forward without it (`use_cache=False`) agree. With `config.generated_image_conditioning="original_kv_cache"`
        [`generate`] passes `generated_image_state` `(batch, 1)`, each row's image by row position (beam search does
        not reorder it), updated in place as the tokens are fed ([`_fed_image_indices`]). With `prefill_chunk_size`
        and `inputs_embeds`, [`generate`] sets `prefill_chunked_embeds`: each chunk of the prompt is fed its own
        embeddings (otherwise `inputs_embeds` may be longer than `input_ids`, e.g. a soft prompt, and are not sliced).
        With `inputs_embeds`, [`generate`] sets `embeds_prompt_ids`: how many ids came with them (none, one per
        embedded position, or a soft prompt's fewer); `input_ids` are those, then the generated tokens, which follow
        `image_indices` (one per embedded position).
        """
        span = None
        if inputs_embeds is None or prefill_chunked_embeds:  # (else `input_ids` may be shorter: a soft prompt)
            span = self._prompt_span(input_ids, inputs_embeds, image_indices, kwargs)
        if span is not None and inputs_embeds is not None:  # the fed positions' own embeddings, not their ids'
            inputs_embeds = inputs_embeds[:, span[0] : span[1]]
            if _TRANSFORMERS_MAJOR >= 5:
                # (which `GenerationMixin` feeds only on a first iteration: transformers 5.18-5.22's chunked prefill
                # calls this without saying so, and its chunks were fed their ids' embeddings, silently)
                kwargs["is_first_iteration"] = True
        # `inputs_embeds` named in the signature: `generate` takes them only from a model whose signature has them
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        if model_inputs.get("input_ids") is not None:
            new_tokens = model_inputs["input_ids"].shape[-1]
        elif model_inputs.get("inputs_embeds") is not None:
            new_tokens = model_inputs["inputs_embeds"].shape[1]
        else:
            new_tokens = input_ids.shape[-1]
        if image_indices is not None:
            if span is not None:  # a chunk of the prompt ends before the prompt does
                image_indices = image_indices[:, : span[1]]
            # the tokens after those that `image_indices` cover: generated ones
            start = image_indices.shape[-1] if embeds_prompt_ids is None else embeds_prompt_ids
            generated = input_ids[:, start:]
            grown = generated.shape[-1]
            if grown > 0 and generated_image_state is not None and new_tokens <= grown:
                fed = generated[:, -new_tokens:]  # generated tokens, fed one step at a time
                image_indices = _fed_image_indices(
                    generated_image_state, fed, self.config.media_token_id, self.config.generated_image_conditioning
                )
                generated_image_state.copy_(image_indices[:, -1:])
            elif grown > 0:
                image_indices = _image_indices_followed_by(image_indices, generated, self.config.media_token_id)
            # a copy with the same strides at every step, as `input_ids`: a compiled step would recompile on new strides
            model_inputs["image_indices"] = image_indices[:, image_indices.shape[-1] - new_tokens :].clone(
                memory_format=torch.contiguous_format
            )
        if image_cache is not None:
            # (without `image_indices` the forward places the fed tokens after the cache's last image itself)
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_hidden_states", None)
            model_inputs["image_cache"] = image_cache
        if (
            _CACHE_FIELD != "past_key_values"
            and model_inputs.get(_CACHE_FIELD) is not None
            and _peft_prompt_learning(self)
            and _peft_reads_past_key_values()
        ):
            # peft 0.21 reads and replaces the cache as `past_key_values` (transformers >= 5.24 names it `cache`):
            # without it, prompt tuning adds the virtual tokens again at every step, prefix tuning drops the prefix
            model_inputs["past_key_values"] = model_inputs.pop(_CACHE_FIELD)
        return model_inputs

    @staticmethod
    def _prompt_span(
        input_ids: torch.LongTensor,
        inputs_embeds: torch.FloatTensor | None,
        image_indices: torch.LongTensor | None,
        kwargs: dict[str, Any],
    ) -> tuple[int, int] | None:
        """The prompt positions `[start, end)` that this step feeds, while it feeds the prompt with a cache: `start`
        is the cache's length; `input_ids` are a chunk of the prompt (`prefill_chunk_size`) or the whole prompt (of
        which the cache holds the first `start`: transformers 4.x feeds the last prompt token after the chunks).
        None past the prompt (generated tokens; with `inputs_embeds` alone `input_ids` hold only those) or without
        a cache."""
        if inputs_embeds is not None:
            prompt_length = inputs_embeds.shape[1]
        elif image_indices is not None:
            prompt_length = image_indices.shape[-1]
        else:
            return None
        cache = _lm_cache(kwargs)
        fed = input_ids.shape[-1]
        if cache is None or not 0 < fed <= prompt_length:
            return None
        start = cache.get_seq_length()
        if fed < prompt_length and start + fed <= prompt_length:
            return start, start + fed
        return (start, prompt_length) if fed == prompt_length and start < prompt_length else None

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """As `GenerationMixin`'s, which repeats tensors only: a given `image_cache`, and a given LM cache (continuing
        from an earlier call's `past_key_values` with beams or `num_return_sequences`), are repeated with the rows. The
        LM cache is repeated into a new cache: the caller's stays as it was."""
        image_cache = model_kwargs.pop("image_cache", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if image_cache is not None:
            model_kwargs["image_cache"] = image_cache.repeat_interleave(expand_size) if expand_size > 1 else image_cache
        for name in ("cache", "past_key_values") if expand_size > 1 else ():
            cache = model_kwargs.get(name)
            # a filled one, whose layers repeat (an empty or static cache is made for the expanded rows already)
            layers = getattr(cache, "layers", None) if isinstance(cache, Cache) else None
            if layers and all(hasattr(layer, "batch_repeat_interleave") for layer in layers) and cache.get_seq_length():
                model_kwargs[name] = self._repeat_cache(cache, expand_size)
        return input_ids, model_kwargs

    def _validate_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        """As `GenerationMixin`'s, without the keys `generate` adds for [`prepare_inputs_for_generation`]: they are
        this model's own, and a wrapper's replacement of that method (PEFT's prompt learning) does not name them."""
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in _GENERATE_STATE_KEYS})

    def _get_logits_processor(self, *args: Any, **kwargs: Any) -> LogitsProcessorList:
        """As `GenerationMixin`'s, with classifier-free guidance's unconditional pass (`guidance_scale`: its own
        forwards of the prompt's last token, or of `negative_prompt_ids`, then of each generated token) text only, as
        it has no images: an `<image>` token there sees no image, instead of being refused for want of images."""
        processors = super()._get_logits_processor(*args, **kwargs)
        for processor in processors:
            if isinstance(processor, UnbatchedClassifierFreeGuidanceLogitsProcessor):
                processor.model = functools.partial(_text_only_forward, self)
        return processors

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        # Beam search reorders the LM cache only; the image state needs no reordering, as the beams of a row share it.
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, "image_cache", None) is not None:
            model_kwargs["image_cache"] = outputs.image_cache
        return model_kwargs

    # ---- scoring ----

    @torch.no_grad()
    def score_continuations(
        self,
        input_ids: torch.LongTensor,
        continuations: Sequence[Sequence[int]] | torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_hidden_states: torch.FloatTensor | None = None,
        continuation_mask: torch.Tensor | None = None,
        normalize_length: bool = False,
        candidates_per_forward: int | None = None,
    ) -> torch.FloatTensor:
        """
        Log-likelihood of each candidate continuation after each prompt (rank classification, as the original's
        `get_rank_classifications` with `--no_kv_caching` or one prompt at a time: its default, cached path lets the
        candidates attend to the left padding of a batch's shorter prompts; these scores do not depend on the batch).

        The prompts (e.g. few-shot demonstrations ending in `<image>Output:`) run through the model once, with their
        images; the LM's KV cache and the cross-attention keys/values of that one forward are then shared by every
        candidate, so scoring K class names costs one prompt forward plus one forward over the candidates' tokens
        (none at all when every candidate is a single token), not K prompt forwards.

        This is the model's own method: a PEFT wrapper hands it on unchanged, so under prompt tuning, p-tuning or
        prefix tuning (whose virtual tokens only the wrapper's `forward` and `generate` add) it scores the model
        without them; score such a model with the wrapper's `forward` (README, "PEFT"). Adapters inside the layers
        (LoRA and the like) are scored.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, prompt_len)`):
                The prompts, left-padded (the processor's default), `<image>` where each image stands.
            continuations (`list[list[int]]` or `torch.LongTensor` of shape `(num_candidates, max_len)`):
                The K candidates' token ids, without special tokens (e.g.
                `tokenizer(class_names, add_special_tokens=False)["input_ids"]`). As a tensor, padded on either side
                (`tokenizer(..., padding=True, return_tensors="pt")`), with `continuation_mask`.
            attention_mask (`torch.Tensor` of shape `(batch, prompt_len)`, *optional*): 1 for real prompt tokens.
            pixel_values (`torch.FloatTensor` of shape `(batch, num_images, 3, H, W)`, *optional*):
                The prompts' images (zero-padded rows), as for [`forward`].
            image_hidden_states (`torch.FloatTensor` of shape `(batch, num_images, num_latents, dim)`, *optional*):
                Already encoded images, instead of `pixel_values`.
            continuation_mask (`torch.Tensor` of shape `(num_candidates, max_len)`, *optional*):
                With a tensor `continuations`: 1 for real tokens, 0 for padding (on either side).
            normalize_length (`bool`, defaults to `False`):
                Return the mean log-probability per candidate token instead of the sum.
            candidates_per_forward (`int`, *optional*):
                Score at most this many candidates per forward (bounds memory: the prompt cache is repeated for each
                candidate of a chunk). Default: all at once.

        Returns:
            `torch.FloatTensor` of shape `(batch, num_candidates)` (fp32): for row `b` and candidate `k`,
            `sum_t log p(c_k[t] | prompt_b, c_k[:t])` (or its mean over `t`).
        """
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2 or not _is_integer(input_ids):
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if torch.is_tensor(input_ids) else type(input_ids)
            raise ValueError(
                f"input_ids must be a tensor of token ids of shape (batch, prompt_len) (the processor's "
                f"`return_tensors='pt'`); got {got}."
            )
        candidates, candidate_mask = self._pad_continuations(continuations, continuation_mask, input_ids.device)
        batch_size, prompt_len = input_ids.shape
        if prompt_len == 0:
            raise ValueError("score_continuations needs a non-empty prompt (input_ids of length >= 1).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (batch_size, prompt_len):
            raise ValueError(
                f"attention_mask must have the shape of input_ids, {(batch_size, prompt_len)}; got "
                f"{tuple(attention_mask.shape)}."
            )
        else:
            _check_no_empty_row(attention_mask, "score_continuations")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "score_continuations needs left-padded prompts (the candidates follow each prompt's last position): "
                "attention_mask has padding at the end of a row (the processor pads left unless told otherwise)."
            )
        num_candidates, max_len = candidates.shape

        candidates_per_forward = _as_int(candidates_per_forward)  # numpy's too
        if candidates_per_forward is not None and (not _is_int(candidates_per_forward) or candidates_per_forward < 1):
            raise ValueError(
                f"candidates_per_forward must be an int >= 1 (or None: all); got {candidates_per_forward!r}."
            )
        with _gradient_checkpointing_paused(self):  # the prompt's KV cache is scored from
            prompt = self(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_hidden_states=image_hidden_states,
                position_ids=_position_ids_from_mask(attention_mask),
                use_cache=True,
                return_dict=True,
                logits_to_keep=1,  # only the last prompt position's (the LM skips the rest where it can)
            )
            cache = getattr(prompt, _CACHE_FIELD)
            # (batch, vocab): predicts each candidate's first token
            first = prompt.logits[:, -1].float().log_softmax(dim=-1)
            if bool((candidates >= first.shape[-1]).any()):
                raise ValueError(f"continuations hold token ids beyond the vocabulary ({first.shape[-1]} tokens).")
            scores = first[:, candidates[:, 0]]  # (batch, num_candidates)

            if max_len > 1:
                if cache is None:
                    raise ValueError("The language model returned no KV cache; score_continuations needs one.")
                chunk = candidates_per_forward or num_candidates
                for start in range(0, num_candidates, chunk):
                    ids = candidates[start : start + chunk]
                    mask = candidate_mask[start : start + chunk]
                    k = ids.shape[0]
                    # rows ordered (prompt, candidate): row b * k + j is prompt b followed by candidate start + j
                    prompt_mask = attention_mask.repeat_interleave(k, dim=0)
                    candidate_part = mask[:, :-1].repeat(batch_size, 1).to(prompt_mask.dtype)
                    full_mask = torch.cat((prompt_mask, candidate_part), dim=1)
                    image_cache = prompt.image_cache.repeat_interleave(k) if prompt.image_cache is not None else None
                    out = self(
                        input_ids=ids[:, :-1].repeat(batch_size, 1),
                        attention_mask=full_mask,
                        position_ids=_position_ids_from_mask(full_mask)[:, prompt_len:],
                        image_cache=image_cache,
                        use_cache=True,
                        return_dict=True,
                        **{_CACHE_FIELD: self._repeat_cache(cache, k)},
                    )
                    logits = out.logits.float()  # (batch * k, max_len - 1, vocab)
                    targets = ids[:, 1:].repeat(batch_size, 1)
                    token_scores = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
                    token_scores = token_scores.masked_fill(mask[:, 1:].repeat(batch_size, 1) == 0, 0.0)
                    scores[:, start : start + k] += token_scores.sum(dim=-1).view(batch_size, k)
        if normalize_length:
            scores = scores / candidate_mask.sum(dim=-1).to(scores.dtype)
        return scores

    @staticmethod
    def _pad_continuations(
        continuations: Sequence[Sequence[int]] | torch.Tensor, continuation_mask: torch.Tensor | None, device: Any
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """`(num_candidates, max_len)` right-padded ids and their mask (a left-padded tensor is moved to the right);
        every candidate must have a first token."""
        if torch.is_tensor(continuations):
            if continuations.ndim != 2 or not _is_integer(continuations):
                raise ValueError(
                    "continuations must be a (num_candidates, max_len) tensor of token ids or a list of lists of ids; "
                    f"got a tensor of shape {tuple(continuations.shape)} and dtype {continuations.dtype}."
                )
            ids = continuations.to(device=device, dtype=torch.long)
            if continuation_mask is None:
                mask = torch.ones_like(ids)
            else:
                if continuation_mask.shape != ids.shape:
                    raise ValueError(
                        f"continuation_mask has shape {tuple(continuation_mask.shape)}, continuations "
                        f"{tuple(ids.shape)}."
                    )
                if bool(((continuation_mask != 0) & (continuation_mask != 1)).any()):
                    raise ValueError("continuation_mask must hold 1 for real tokens and 0 for padding, nothing else.")
                mask = continuation_mask.to(device=device, dtype=torch.long)
                if bool((mask[:, 1:] > mask[:, :-1]).any()):
                    if bool((mask[:, 1:] < mask[:, :-1]).any()):
                        raise ValueError("continuation_mask must be padding on one side: 1s then 0s, or 0s then 1s.")
                    # left padding (a tokenizer that pads left): each row's tokens moved to its front
                    order = torch.argsort(1 - mask, dim=-1, stable=True)
                    ids, mask = ids.gather(-1, order), mask.gather(-1, order)
        else:
            if continuation_mask is not None:
                raise ValueError("continuation_mask goes with a tensor of continuations, not with lists of ids.")
            if isinstance(continuations, (str, bytes)) or not all(
                isinstance(row, (list, tuple)) and all(isinstance(t, int) for t in row) for row in continuations
            ):
                raise ValueError(
                    "continuations must be a list of candidates, each a list of token ids (e.g. "
                    "`tokenizer(names, add_special_tokens=False)['input_ids']`)."
                )
            rows = [list(row) for row in continuations]
            if not rows:
                raise ValueError("continuations is empty: pass at least one candidate.")
            max_len = max(len(row) for row in rows)
            ids = torch.zeros(len(rows), max(max_len, 1), dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
                mask[i, : len(row)] = 1
        if ids.shape[0] == 0:
            raise ValueError("continuations is empty: pass at least one candidate.")
        empty = (mask[:, 0] == 0).nonzero().flatten().tolist() if ids.shape[1] else list(range(ids.shape[0]))
        if empty:
            raise ValueError(f"Continuations {empty} are empty; every candidate needs at least one token.")
        ids = ids.masked_fill(mask == 0, 0)  # whatever the padding held
        if bool((ids < 0).any()):  # a negative id would index the vocabulary from its end
            raise ValueError("continuations hold negative token ids (padding belongs in continuation_mask).")
        return ids, mask

    @staticmethod
    def _repeat_cache(cache: Any, repeats: int) -> Any:
        """A new cache whose rows are each row of `cache` repeated `repeats` times; `cache` itself is left unchanged.

        The layers are copied shallowly and their tensors replaced (`batch_repeat_interleave` rebinds them, and the
        LM's `update` concatenates into new tensors), so the shared prompt cache is never written to.
        """
        if isinstance(getattr(cache, "layers", None), list):
            repeated = copy.copy(cache)
            repeated.layers = [copy.copy(layer) for layer in cache.layers]
        else:
            repeated = copy.deepcopy(cache)
        repeated.batch_repeat_interleave(repeats)
        return repeated

    # ---- training ----

    def freeze_for_training(
        self, train_new_token_embeddings: bool = True, new_token_ids: Sequence[int] | None = None
    ) -> None:
        """
        Set up the original's training recipe: the vision tower and the language model frozen; the Perceiver, the
        gated cross-attention blocks and (optionally) the embedding rows of the added tokens trainable.

        The added tokens' rows train without unfreezing the embedding matrix: they are copied into a small trainable
        parameter, `new_token_embeddings.weight` `(num_new_tokens, hidden_size)`, which replaces them in the LM's
        input embeddings (forward hook) and, when the LM ties its output embeddings to them (MPT, MosaicGPT), in the
        logits of those tokens too, so both roles train, as with the original's tied matrix. The matrix itself keeps
        `requires_grad=False`: no gradient, optimizer state or weight decay for its other rows, and under FSDP (FSDP1
        with `use_orig_params=True`, or FSDP2) the rows are an ordinary small parameter, where a gradient-mask hook on
        the sharded embedding would not run. ([`save_pretrained`] writes the rows into the saved embedding matrix;
        loading a state dict that lacks them takes them from its embedding matrix; [`merge_new_token_embeddings`]
        folds them back in place.)

        The original trained the `<image>` and `<|endofchunk|>` rows (its gradient mask kept those two); by default
        the `<PAD>` row is trainable too (its input row gets no gradient, as padding is masked; a tied output row
        learns a low `<PAD>` logit). Pass `new_token_ids=[config.media_token_id, config.eoc_token_id]` for exactly
        the original's pair. Calling this again first folds rows that are being trained.

        Args:
            train_new_token_embeddings (`bool`, defaults to `True`):
                Also train the embedding rows of the added tokens.
            new_token_ids (`Sequence[int]`, *optional*):
                The token ids whose rows train (held in ascending order). Defaults to `config.eoc_token_id`,
                `config.media_token_id` and `config.pad_token_id` (those that are set). A PEFT adapter saved with
                `modules_to_save=model.peft_modules_to_save()` holds the rows, not their ids: load it into a model
                set up with the same `new_token_ids` (another number of rows is refused; other ids of the same
                number would take the rows).
        """
        if any(_is_peft_layer(type(module)) for module in self.modules()):
            raise ValueError(
                "freeze_for_training() on a model with PEFT adapters would freeze the adapters and make the "
                "Perceiver's and the cross-attention blocks' own weights trainable, outside the adapter (which does "
                "not save them): call it before get_peft_model, with "
                "LoraConfig(..., modules_to_save=model.peft_modules_to_save())."
            )
        # Quantized, they cannot train (transformers' quantization integrations convert them unless told not to):
        # torchao's weights would take requires_grad and get no gradient, bitsandbytes' refuse it half-way through.
        trained = ("perceiver", "gated_cross_attn_layers")
        quantized = [
            name for part in trained for name, p in getattr(self, part).named_parameters(part) if _is_quantized(p)
        ]
        if quantized:
            raise ValueError(
                "freeze_for_training() trains the Perceiver and the gated cross-attention blocks, but "
                f"{len(quantized)} of their weights are quantized (e.g. {quantized[0]!r}). Load the model with them "
                "left out of quantization: BitsAndBytesConfig(..., llm_int8_skip_modules=SKIP), or TorchAoConfig / "
                "QuantoConfig(..., modules_to_not_convert=SKIP), with SKIP = ['perceiver', 'gated_cross_attn_layers', "
                "'lm_head'] (a list replaces transformers' own, so it names the output layer too)."
            )
        embedding = self.get_input_embeddings()
        weight = getattr(embedding, "weight", None)
        token_ids: list[int] = []
        if train_new_token_embeddings:  # the arguments checked before anything changes
            if new_token_ids is None:
                ids = [self.config.eoc_token_id, self.config.media_token_id, self.config.pad_token_id]
                new_token_ids = [i for i in ids if i is not None]
                if not new_token_ids:
                    raise ValueError(
                        "No token ids to train: config.eoc_token_id, media_token_id and pad_token_id are unset; pass "
                        "new_token_ids, or train_new_token_embeddings=False."
                    )
            try:  # ints (numpy's and 0-d integer tensors too), not strings, floats or a bare int
                if isinstance(new_token_ids, (str, bytes)):
                    raise TypeError
                token_ids = sorted({operator.index(i) for i in new_token_ids})  # one order, however given
            except TypeError:
                raise ValueError(f"new_token_ids must be a list of token ids (ints); got {new_token_ids!r}.") from None
            if not token_ids:
                raise ValueError("new_token_ids is empty: pass the ids to train, or train_new_token_embeddings=False.")
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                raise ValueError(
                    f"The language model's input embeddings ({type(embedding).__name__}) have no 2-D `weight`; "
                    "cannot train rows of it."
                )
            if weight.is_meta and getattr(self, "hf_device_map", None):  # (not a model built on the meta device)
                raise ValueError(
                    "The language model's input embeddings are offloaded (device_map to 'disk' or CPU offload): "
                    "freeze_for_training() copies the rows it trains out of them. Load the model with the input "
                    "embeddings on a device (e.g. device_map with the LM's embeddings on 'cpu' or a GPU), or pass "
                    "train_new_token_embeddings=False."
                )
            out_of_range = [i for i in token_ids if not 0 <= i < weight.shape[0]]
            if out_of_range:
                raise ValueError(
                    f"new_token_ids {out_of_range} are outside the embedding matrix ({weight.shape[0]} rows)."
                )
        self.merge_new_token_embeddings()
        self.requires_grad_(False)
        self.perceiver.requires_grad_(True)
        self.gated_cross_attn_layers.requires_grad_(True)
        if not train_new_token_embeddings:
            return
        self.new_token_embeddings = OpenFlamingoNewTokenEmbeddings(weight, token_ids)
        handles = [
            embedding.register_forward_hook(self._new_token_input_hook, with_kwargs=True),
            self.register_load_state_dict_pre_hook(self._new_token_load_hook),
        ]
        output = self.get_output_embeddings()
        if output is not None and getattr(output, "weight", None) is weight:
            handles.append(output.register_forward_hook(self._new_token_output_hook, with_kwargs=True))
        self._new_token_hooks = handles

    def merge_new_token_embeddings(self) -> None:
        """Write the rows trained since [`freeze_for_training`] into the LM's embedding matrix and remove them.

        Afterwards the model is an ordinary model again (its state dict has no `new_token_embeddings.weight`). Call it
        on the unwrapped model (not under FSDP). A no-op when no rows are being trained.
        """
        rows = self._modules.get("new_token_embeddings")
        if rows is not None and not isinstance(rows, OpenFlamingoNewTokenEmbeddings):
            raise ValueError(
                f"new_token_embeddings is wrapped ({type(rows).__name__}, e.g. PEFT's modules_to_save): unwrap the "
                "model first (PEFT: merge_and_unload())."
            )
        for handle in self.__dict__.pop("_new_token_hooks", []):
            handle.remove()
        if rows is None:
            return
        weight = self.get_input_embeddings().weight
        with torch.no_grad():
            weight[rows.token_ids.to(weight.device)] = rows.weight.detach().to(device=weight.device, dtype=weight.dtype)
        del self.new_token_embeddings

    def peft_modules_to_save(self) -> list[str]:
        """Names of the modules that [`freeze_for_training`] trains in full, for PEFT's `modules_to_save`: the
        Perceiver, each gated cross-attention block, and `new_token_embeddings` while it exists. So
        `LoraConfig(target_modules=[...LM names...], modules_to_save=model.peft_modules_to_save())` is the original
        recipe plus LoRA on the language model.
        """
        names = ["perceiver", *(f"gated_cross_attn_layers.{key}" for key in self.gated_cross_attn_layers)]
        if "new_token_embeddings" in self._modules:
            names.append("new_token_embeddings")
        return names

    def training_parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups as in the original's training script ([`gets_weight_decay`]): weight decay on every
        parameter of the gated cross-attention blocks; none on the Perceiver and on the embedding rows. Trainable
        parameters only.

        Example: `torch.optim.AdamW(model.training_parameter_groups(0.1), lr=1e-4)`.
        """
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                (decay if gets_weight_decay(name) else no_decay).append(parameter)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def repeated_blocks(self) -> list[nn.Module]:
        """The model's repeated blocks: the vision tower's encoder layers, the Perceiver's layers, the language
        model's decoder layers and the gated cross-attention blocks (each kind shares one compiled version)."""
        vision_layers = find_decoder_layers(self.vision_model, self.config.vision_config.num_hidden_layers)
        lm_layers = find_decoder_layers(self.language_model, self.config.text_config.num_hidden_layers)
        return [*vision_layers, *self.perceiver.layers, *lm_layers, *self.gated_cross_attn_layers.values()]

    def compile_repeated_blocks(self, **compile_kwargs: Any) -> None:
        """Regional compilation: `torch.compile` each of [`repeated_blocks`] in place (`nn.Module.compile`).

        Each kind of block compiles once and its other instances reuse it, so this compiles in a small fraction of
        the time of `torch.compile(model)`, and takes most of its gain in training: fused elementwise work, layer
        norms and dtype casts, and far fewer kernel launches (eager training of of3b is bound by its host). The loss
        (cross-entropy over the vocabulary) is compiled too: its fp32 upcast, log-softmax and backward fuse into a few
        passes over the logits instead of several full fp32 copies. Parameter
        names, `state_dict`, `save_pretrained`, gradient checkpointing, PEFT and FSDP see the same modules as before.
        Under the gated layers' own call (see [`_GatedDecoderLayerMixin`]), a gated block runs compiled before its
        compiled decoder layer.

        All kinds enter through one function (transformers' checkpointing wrapper of `forward`), whose compiled
        versions dynamo counts together: its recompile limit is raised to 16 per kind of block (a global setting).

        Args:
            compile_kwargs: passed to `torch.compile` (e.g. `mode`, `dynamic`, `backend`).
        """
        blocks = self.repeated_blocks()
        kinds = len({type(block) for block in blocks})
        limit = max(16 * kinds, getattr(torch._dynamo.config, _RECOMPILE_LIMIT))
        setattr(torch._dynamo.config, _RECOMPILE_LIMIT, limit)
        for block in blocks:
            block.compile(**compile_kwargs)
        self._loss_compile_kwargs = dict(compile_kwargs)

    @classmethod
    def _from_config(cls, config: OpenFlamingoConfig, **kwargs: Any) -> Any:
        """As `PreTrainedModel._from_config` (`AutoModelForImageTextToText.from_config`), with the LM's attention
        asked for by name (`attn_implementation={"text_config": "eager", ...}`) as asked, also for MPT."""
        with _lm_attention_requested(kwargs.get("attn_implementation")):
            return super()._from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """As `PreTrainedModel.from_pretrained`, except that weights which do not fit the config are an error, not a
        logged report: a missing tensor would stay randomly initialised (say, a gated block after
        `cross_attn_every_n_layers` was changed) and an unexpected one would be dropped. With
        `output_loading_info=True` the model loads anyway and the report is returned, as usual.

        On transformers 4.x, a per-part `dtype` dict (`{"text_config": torch.bfloat16, "": torch.float32}`) gives the
        parts it leaves out its `""` dtype (float32 without one), as it does the Perceiver and the gated blocks, not
        a dtype that the folder's sub-config may hold.

        Hub kernels are off unless asked for (`use_kernels=True`, a `kernel_config` or a `kernels_mode`):
        transformers >= 5.25 turns them on by default, and on a GPU that swaps LLaMA's RMSNorm and rotary embedding
        and, in eval mode, the activations (CLIP's quick-GELU, GPT-NeoX's GELU, LLaMA's SiLU) for kernels downloaded
        from the hub: other numbers than the original's, and an error on a machine without network access (at load
        with `device_map="cuda"`, or when `train()` changes the mode of a model on the GPU)."""
        if all(kwargs.get(key) is None for key in ("use_kernels", "kernel_config", "kernels_mode")):
            kwargs["use_kernels"] = False
        if _TRANSFORMERS_MAJOR < 5:
            for key in ("dtype", "torch_dtype"):
                if isinstance(kwargs.get(key), dict):
                    main = kwargs[key].get("", torch.float32)
                    kwargs[key] = {"text_config": main, "vision_config": main, **kwargs[key]}
        loading_info = kwargs.pop("output_loading_info", False)
        token = _LOADING_PRETRAINED.set(True)
        try:
            with _lm_attention_requested(kwargs.get("attn_implementation")):
                model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        finally:
            _LOADING_PRETRAINED.reset(token)
        model._untie_if_configured()
        if loading_info:
            return model, info
        missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
        if any(key.startswith("new_token_embeddings.") for key in unexpected):  # an adapter's folder (transformers 5)
            raise _new_token_rows_not_loadable()
        if missing or unexpected:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            gated = any(k.startswith("gated_cross_attn_layers.") for k in (*missing, *unexpected))
            found = [
                f"{len(keys)} {what} (e.g. {keys[:3]})"
                for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            ]
            raise ValueError(
                f"The weights of {where} do not fit its config: tensors {', '.join(found)}."
                + (" Was cross_attn_every_n_layers (or the LM's depth) changed?" if gated else "")
                + " Pass output_loading_info=True to load it anyway and inspect the report."
            )
        return model

    def _untie_if_configured(self) -> None:
        """A tied folder loaded with `tie_word_embeddings=False` (a config untied at the top only): the output matrix
        becomes a parameter of its own, starting as the loaded embeddings (the same logits), as the bare LM's kwarg
        unties it; the LM's own flag follows, so that `tie_weights` and the saved folder keep it apart."""
        if not _untied_at_the_top_only(self.config):
            return
        output, embedding = self.get_output_embeddings(), self.get_input_embeddings()
        if output is not None and getattr(output, "weight", None) is embedding.weight:
            output.weight = nn.Parameter(
                embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad
            )
        self.config.text_config.tie_word_embeddings = False

    def enable_adapters(self) -> None:
        """[`~PeftAdapterMixin.enable_adapters`], turning the adapters' `modules_to_save` copies back on too:
        transformers' `disable_adapters` turns them off but its `enable_adapters` turned only the tuner layers (e.g.
        LoRA's) back on: the recipe's Perceiver, gated blocks and trained rows silently stayed at the base weights."""
        super().enable_adapters()
        # (peft is there past the line above: the check keeps transformers' remote-code loader, which requires every
        # package a file imports outside such checks and `try` blocks, from requiring peft of a saved folder)
        if is_peft_available():
            from peft.utils import ModulesToSaveWrapper

            for module in self.modules():
                if isinstance(module, ModulesToSaveWrapper):
                    module.enable_adapters(True)

    def load_adapter(self, peft_model_id: str | os.PathLike | None = None, *args: Any, **kwargs: Any) -> Any:
        """[`~PreTrainedModel.load_adapter`], refusing an adapter whose `new_token_embeddings` (rows trained after
        [`freeze_for_training`]) this model has no place for (transformers 5 would drop them with a logged report):
        before anything is loaded when the adapter is a local folder or a state dict; otherwise after, with the added
        adapter deleted again where PEFT can (`delete_adapter` needs peft >= 0.22 on transformers 5)."""
        held = _adapter_new_token_rows(peft_model_id, kwargs.get("adapter_state_dict"))
        rows = self._modules.get("new_token_embeddings")
        if rows is not None:
            if held is not None and held[1] != len(rows.token_id_list):
                raise _new_token_rows_mismatch(*held, rows.token_id_list)
            return super().load_adapter(peft_model_id, *args, **kwargs)
        if held is not None:
            raise _new_token_rows_not_loadable()
        before = set(getattr(self, "peft_config", None) or ())
        info = super().load_adapter(peft_model_id, *args, **kwargs)
        unexpected = getattr(info, "unexpected_keys", None) or ()
        if any(key.startswith("new_token_embeddings.") for key in unexpected):
            error = _new_token_rows_not_loadable()
            try:
                for name in set(getattr(self, "peft_config", None) or ()) - before:
                    self.delete_adapter(name)
            except (ImportError, ValueError) as cannot:
                raise ValueError(
                    f"{error} The adapter stays loaded without them ({cannot}): load the base model again."
                ) from None
            raise error
        return info

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """[`~PreTrainedModel.save_pretrained`]; rows trained since [`freeze_for_training`] are written into the saved
        embedding matrix (and its tied output copy), so the folder loads as an ordinary model. A `state_dict` passed
        in (e.g. by `Trainer` under FSDP) is folded the same way; it must hold full tensors. The config records the
        dtype of each part (vision tower, LM, the rest), so that transformers 4.x's `dtype="auto"` restores a model of
        mixed dtypes as it was.

        Under FSDP2 the model's class is a subclass that torch makes (`FSDPOpenFlamingoForConditionalGeneration`);
        the folder's code and `auto_map` are those of this class, not of torch's FSDP module.
        """
        text_config = self.config.text_config
        output, embedding = self.get_output_embeddings(), self.get_input_embeddings()
        if _untied_at_the_top_only(self.config) and output is not None:
            if getattr(output, "weight", None) is not embedding.weight:
                # untied at the top only (as PEFT's merge_and_unload of an adapted MPT `wte` leaves it): transformers
                # 4.x ties by the LM's own flag when loading, which would drop the saved output matrix
                text_config.tie_word_embeddings = False
            else:  # still one matrix: saved once, and the folder says so
                self.config.tie_word_embeddings = True
        if "new_token_embeddings" in self._modules:
            if len(args) >= 2:  # (is_main_process, state_dict, ...) given positionally
                args = (args[0], self._fold_new_token_embeddings(args[1]), *args[2:])
            else:
                kwargs["state_dict"] = self._fold_new_token_embeddings(kwargs.get("state_dict"))
        wrapped_class = type(self)
        own_class = next(c for c in wrapped_class.__mro__ if not c.__module__.startswith("torch.distributed"))
        self.__class__ = own_class
        token = SAVED_PART_DTYPES.set((self.config, self._part_dtypes()))
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            SAVED_PART_DTYPES.reset(token)
            self.__class__ = wrapped_class

    def _part_dtypes(self) -> dict[str, str]:
        """The dtypes of the vision tower, the LM and the Perceiver (their first floating parameter's), by sub-config
        name (`""` for the Perceiver, whose dtype the gated blocks share unless set apart)."""
        dtypes = {}
        parts = (("vision_config", self.vision_model), ("text_config", self.language_model), ("", self.perceiver))
        for name, module in parts:
            dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
            if dtype is not None:
                dtypes[name] = str(dtype).removeprefix("torch.")
        return dtypes

    def _new_token_embedding_keys(self) -> list[str]:
        """State-dict names of the embedding matrix whose rows are trained (input embeddings, and a tied output)."""
        embedding = self.get_input_embeddings()
        output = self.get_output_embeddings()
        tied = output is not None and getattr(output, "weight", None) is embedding.weight
        return [
            f"{name}.weight"
            for name, module in self.named_modules(remove_duplicate=False)
            if module is embedding or (tied and module is output)
        ]

    def _fold_new_token_embeddings(self, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if state_dict is None:
            state_dict = self.state_dict()
            if any(tensor.is_meta for tensor in state_dict.values()):
                # parts offloaded by a device map (CPU / disk) are placeholders here: their weights are read back, as
                # transformers does for a save without a given state dict (4.x only then)
                if is_accelerate_available():  # (a device map needs it; the check as in `enable_adapters`)
                    from accelerate.utils.modeling import get_state_dict_offloaded_model

                    state_dict = get_state_dict_offloaded_model(self)
        state_dict = dict(state_dict)
        rows = state_dict.pop("new_token_embeddings.weight", None)
        if rows is None:
            return state_dict
        if type(rows) is not torch.Tensor and not isinstance(rows, nn.Parameter):
            raise ValueError(
                f"Cannot write the trained embedding rows into a state dict of {type(rows).__name__}s; save a full "
                "state dict (FSDP: state_dict_type FULL_STATE_DICT), or call merge_new_token_embeddings() first."
            )
        folded = None
        for key in self._new_token_embedding_keys():
            if key in state_dict:
                if folded is None:
                    folded = state_dict[key].detach().clone()
                    folded[self.new_token_embeddings.token_ids.to(folded.device)] = rows.detach().to(folded)
                state_dict[key] = folded  # one tensor for tied names, so that they stay recognisably tied
        return state_dict

    def _new_token_input_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        if _is_peft_layer(type(self.get_input_embeddings())):
            raise ValueError(
                "A PEFT adapter on the input embeddings together with freeze_for_training()'s new-token rows: the rows "
                "replace the embedding's output for those tokens, so merging the adapter would drop its change to "
                "them. Leave the embeddings out of target_modules, or call "
                "freeze_for_training(train_new_token_embeddings=False) before get_peft_model."
            )
        input_ids = args[0] if args else kwargs["input"]
        return self.new_token_embeddings(input_ids=input_ids, inputs_embeds=output)

    def _new_token_output_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        hidden_states = args[0] if args else kwargs["input"]
        return self.new_token_embeddings(hidden_states=hidden_states, logits=output, bias=getattr(module, "bias", None))

    @property
    def _keys_to_ignore_on_save(self) -> set[str]:
        """The submodels' keys (as `post_init` gathers them) and the tied names that `save_pretrained` leaves out:
        `Trainer` resumes with `load_state_dict(strict=False)`, which reports those missing; named here, `Trainer`
        re-ties the weights instead of warning. Computed when read, from the parameters as they are then: on
        transformers 4.x `from_pretrained` ties them after `__init__`, and untied weights are both saved."""
        keys = set(self.__dict__.get("_own_keys_to_ignore_on_save") or ())
        for name, child in self.named_children():
            keys.update(f"{name}.{key}" for key in getattr(child, "_keys_to_ignore_on_save", None) or ())
        return keys | self._tied_names_left_out_on_save()

    @_keys_to_ignore_on_save.setter
    def _keys_to_ignore_on_save(self, value: Any) -> None:
        # (`post_init` writes back what it read: the tied names of that moment are not kept, they are read anew)
        self.__dict__["_own_keys_to_ignore_on_save"] = set(value or ()) - self._tied_names_left_out_on_save()

    def _tied_parameter_names(self) -> list[list[str]]:
        """The names of each parameter that has more than one (tied weights), in `named_parameters` order."""
        names: dict[int, list[str]] = {}
        for name, parameter in self.named_parameters(remove_duplicate=False):
            names.setdefault(id(parameter), []).append(name)
        return [group for group in names.values() if len(group) > 1]

    def _tied_names_left_out_on_save(self) -> set[str]:
        """The names of tied parameters that `save_pretrained` leaves out (e.g. MPT's output matrix, tied to the input
        embeddings; the embeddings' own name is kept)."""
        tied = getattr(self, "all_tied_weights_keys", None)
        if tied is not None:  # transformers 5: {left out: kept}, left out while they are one parameter
            shared = {name for names in self._tied_parameter_names() for name in names}
            return set(tied) & shared
        # transformers 4.x keeps a tied parameter's first name (the embeddings', before the output layer's)
        return {name for names in self._tied_parameter_names() for name in names[1:]}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """`nn.Module.load_state_dict`, taking a saved folder's weights as `from_pretrained` does (see
        [`_state_dict_pre_load_hook`]). With `strict=True` (the default), tied parameters that `save_pretrained`
        stores once are given under each of their names, so the load passes; with `strict=False` the other names are
        reported missing, as torch and transformers' own models report them: `safetensors.torch.load_model`
        (accelerate's `load_state`) expects that of the names it left out, and `Trainer` re-ties them (they are
        `_keys_to_ignore_on_save`). A wrapper's `load_state_dict` (DDP, `torch.compile`, PEFT) does not come through
        here: a strict load through it reports the left-out name missing, as for transformers' own models."""
        token = _FILL_TIED_NAMES.set(strict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            _FILL_TIED_NAMES.reset(token)

    def _state_dict_pre_load_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """`load_state_dict` of a saved folder's weights (e.g. `Trainer`'s `resume_from_checkpoint`) as
        `from_pretrained` loads them: the vision tower's names in this transformers' layout (folders hold 4.x's
        `vision_model.vision_model.*` on either major), and on transformers 5.x the LM's own checkpoint renamings
        (GPT-NeoX's saved `embed_out` is its `lm_head`: [`_checkpoint_renamings`]); in a strict load of this model, tied
        parameters that `save_pretrained` stores once given under each of their names ([`load_state_dict`]). Rows
        trained by [`freeze_for_training`] (a PEFT adapter's `new_token_embeddings`) are refused by a model without that
        module, rather than silently dropped."""
        if "new_token_embeddings" not in self._modules and any(
            key.startswith(f"{prefix}new_token_embeddings.") for key in state_dict
        ):
            raise _new_token_rows_not_loadable()
        for key, new in self._saved_name_renames(state_dict, prefix).items():
            state_dict[new] = state_dict.pop(key)
        if not _FILL_TIED_NAMES.get():
            return
        for names in self._tied_parameter_names():
            names = [f"{prefix}{name}" for name in names]
            given = next((name for name in names if name in state_dict), None)
            for name in names if given is not None else ():
                state_dict.setdefault(name, state_dict[given])

    def _saved_name_renames(self, keys: Iterable[str], prefix: str = "") -> dict[str, str]:
        """{saved name: this model's name} for the names among `keys` that a load renames: the vision tower's in this
        transformers' layout (folders hold 4.x's `vision_model.vision_model.*` on either major), and on 5.x the LM's
        own checkpoint renamings ([`_checkpoint_renamings`])."""
        if "vision_model" in self.vision_model._modules:  # transformers 4.x: the nested layout is the model's own
            nested, flat = f"{prefix}vision_model.vision_model.", f"{prefix}vision_model."
            renames = {key: nested + key[len(flat) :] for key in keys if key.startswith(flat)}
            return {key: new for key, new in renames.items() if not key.startswith(nested)}
        # 5.x: `from_pretrained`'s renamings, the vision tower's nested names (registered above) included
        renamings = _checkpoint_renamings(self)
        renames = {
            key: prefix + _apply_renamings(key[len(prefix) :], renamings) for key in keys if key.startswith(prefix)
        }
        return {key: new for key, new in renames.items() if new != key}

    def saved_names_load_report(self, saved_names: Iterable[str]) -> tuple[list[str], list[str]]:
        """`(missing, unexpected)`: this model's `state_dict` names that a saved folder holding `saved_names` (e.g. a
        sharded checkpoint's index) leaves unloaded, and the saved names it does not take, counting what the load hooks
        fill in: renamed names, tied parameters stored once, and rows trained by [`freeze_for_training`] (given from
        the saved embedding matrix). transformers' `load_sharded_checkpoint` (which `Trainer` resumes from a sharded
        checkpoint with) compares the names before the hooks run: `examples/finetune.py`'s `FlamingoTrainer` reports
        this instead."""
        names = list(saved_names)
        renames = self._saved_name_renames(names)
        loaded = {renames.get(name, name) for name in names}
        for group in self._tied_parameter_names():
            if loaded.intersection(group):
                loaded.update(group)
        if "new_token_embeddings" in self._modules and loaded.intersection(self._new_token_embedding_keys()):
            loaded.add("new_token_embeddings.weight")
        own = list(self.state_dict())
        unexpected = dict.fromkeys(renames.get(name, name) for name in names if renames.get(name, name) not in own)
        return [name for name in own if name not in loaded], list(unexpected)

    def _new_token_load_hook(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A state dict without the rows (e.g. a folder written by [`save_pretrained`]) gives them from its matrix;
        rows of another number than this model trains (an adapter trained with other `new_token_ids`) are an error."""
        rows_key = f"{prefix}new_token_embeddings.weight"
        ids = getattr(self._modules.get("new_token_embeddings"), "token_id_list", None)
        for key, value in state_dict.items():
            if ids and key.startswith(prefix) and torch.is_tensor(value):
                if _is_new_token_rows(key[len(prefix) :], tuple(value.shape)) and value.shape[0] != len(ids):
                    raise _new_token_rows_mismatch(key, value.shape[0], ids)
        if rows_key in state_dict or "new_token_embeddings" not in self._modules:
            return
        for key in self._new_token_embedding_keys():
            if f"{prefix}{key}" in state_dict:
                weight = state_dict[f"{prefix}{key}"]
                state_dict[rows_key] = weight[self.new_token_embeddings.token_ids.to(weight.device)]
                return


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


class OpenFlamingoNewTokenEmbeddings(nn.Module):
    """Trainable embedding rows for a few token ids of a frozen embedding matrix (see `freeze_for_training`).

    `weight` `(len(token_ids), hidden_size)` starts as a copy of the matrix's rows. Called with `input_ids` and
    `inputs_embeds`, it puts its rows at the positions of those tokens; called with `hidden_states` and `logits` (an
    output embedding tied to the matrix), it recomputes the logits of those tokens from its rows.
    """

    def __init__(self, weight: torch.Tensor, token_ids: Sequence[int]) -> None:
        super().__init__()
        self.token_id_list = [int(i) for i in token_ids]
        index = torch.tensor(self.token_id_list, dtype=torch.long, device=weight.device)
        self.weight = nn.Parameter(weight.detach()[index].clone())
        self.register_buffer("token_ids", index, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`inputs_embeds` with the rows of the new tokens replaced, or `logits` with their columns recomputed."""
        if logits is not None:
            if hidden_states is None:
                raise ValueError("Recomputing the logits of the new tokens needs the hidden_states.")
            new_bias = None if bias is None else bias[self.token_ids.to(bias.device)]
            new = F.linear(hidden_states, self.weight.to(hidden_states.dtype), new_bias)
            return logits.index_copy(-1, self.token_ids.to(logits.device), new.to(logits.dtype))
        if input_ids is None or inputs_embeds is None:
            raise ValueError("Pass input_ids and inputs_embeds (or hidden_states and logits).")
        rows = self.weight.to(inputs_embeds.dtype)
        for slot, token_id in enumerate(self.token_id_list):
            inputs_embeds = torch.where((input_ids == token_id).unsqueeze(-1), rows[slot], inputs_embeds)
        return inputs_embeds


__all__ = [
    "OpenFlamingoCausalLMOutputWithPast",
    "OpenFlamingoForConditionalGeneration",
    "OpenFlamingoImageCache",
    "OpenFlamingoMosaicGPTAttention",
    "OpenFlamingoMosaicGPTSdpaAttention",
    "OpenFlamingoMptSdpaAttention",
    "OpenFlamingoPreTrainedModel",
    "add_mpt_qk_layernorm",
    "add_mpt_sdpa_attention",
    "find_decoder_layers",
    "image_indices_from_input_ids",
]
