"""The fast path of `OpenFlamingoForConditionalGeneration.generate`: greedy decoding and beam search with a static KV
cache, one compiled decoding step replayed as a CUDA graph.

`generate(..., cache_implementation="static")` with plain greedy decoding or plain beam search (no sampling, logits
processors, streamers or extra outputs) on a CUDA device, by an LM with SDPA or eager attention, comes here
([`generate_static`]); every other call goes through `GenerationMixin`. The tokens are those of
`GenerationMixin.generate`. A decoder ([`_StaticGreedyDecoder`], [`_StaticBeamDecoder`]) is made per model and shape and
kept while the model stays as it was ([`_decoding_state`]): its CUDA graphs replay the computation, and read the memory,
of the modules it was captured over.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import numbers
import operator
import threading
import types
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers import CompileConfig, GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.utils import logging

from .configuration_openflamingo import _is_int
from .decoding_kernels import decoding_step_options, is_traced
from .modeling_openflamingo import (
    _CACHE_FIELD,
    _RECOMPILE_LIMIT,
    _TRANSFORMERS_MAJOR,
    INFERRED_MASK,
    OpenFlamingoImageCache,
    _check_no_empty_row,
    _fed_image_indices,
    _forward_parameters,
    _generation_setting,
    _is_integer,
    _is_peft_layer,
    _position_ids_from_mask,
    _wrapper_prepare_inputs,
)

if TYPE_CHECKING:  # annotations only
    from .modeling_openflamingo import OpenFlamingoCausalLMOutputWithPast, OpenFlamingoForConditionalGeneration

logger = logging.get_logger(__name__)


# The beam search settings that the fast path below handles, with `generate`'s defaults.
_BEAM_SEARCH_DEFAULTS = {"num_beams": 1, "length_penalty": 1.0, "early_stopping": False, "num_return_sequences": 1}
_BEAM_SEARCH_ARGUMENTS = frozenset(_BEAM_SEARCH_DEFAULTS) - {"num_beams"}
# `generate` arguments that the fast path below handles; any other one (sampling, logits processors, streamers,
# `return_dict_in_generate`, ...) leaves the call to `GenerationMixin.generate`.
_FAST_DECODE_ARGUMENTS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_hidden_states",
        "image_indices",
        "generated_image_state",  # made by `generate`; the fast path keeps the same state in its own tensors
        "max_new_tokens",
        "min_new_tokens",
        "do_sample",
        "num_beams",
        "pad_token_id",
        "eos_token_id",
        "cache_implementation",
        "compile_config",
        "use_cache",
        *_BEAM_SEARCH_ARGUMENTS,
    }
)
# Fields of the model's `generation_config` that may differ from `GenerationConfig()` (with these values) and still
# mean plain greedy decoding or plain beam search.
_FAST_DECODE_CONFIG = {
    "use_cache": lambda v: v is not False,
    "cache_implementation": lambda v: True,  # read with the call's argument first (above)
    "output_attentions": lambda v: not v,
    "output_hidden_states": lambda v: not v,
    "pad_token_id": lambda v: True,
    "eos_token_id": lambda v: True,
    "bos_token_id": lambda v: True,
    "decoder_start_token_id": lambda v: True,
    "max_length": lambda v: True,
    "num_beams": lambda v: True,
    "length_penalty": lambda v: True,
    "early_stopping": lambda v: True,
    "num_return_sequences": lambda v: True,
    "_from_model_config": lambda v: True,
    "transformers_version": lambda v: True,
}
# The prompt step's CUDA graph is captured with the model's repeated blocks compiled ([`_blocks_compiled`]). False:
# with the blocks as they are (no compilation for a new prompt shape; a slower prompt step). Read when a prompt step is
# made: `forget_decoders(model)` drops those made before.
COMPILE_PROMPT_BLOCKS = True
# model -> {shape key -> decoder}; weak, so that a model and its decoders go together. Not on the model itself, so that
# `copy.deepcopy` and `save_pretrained` never meet a CUDA graph.
_STATIC_DECODERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _StaticDecoder]] = weakref.WeakKeyDictionary()
# model -> what its decoders were made over ([`_decoding_state`])
_DECODED_STATE: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
# model -> the lock that a call holds while it makes or runs the model's decoders: their static cache, inputs and
# graphs are the model's, not the call's, so two threads generating with one model would write into each other's
_DECODER_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_DECODER_LOCKS_LOCK = threading.Lock()


def _decoder_lock(model: nn.Module) -> threading.RLock:
    with _DECODER_LOCKS_LOCK:
        return _DECODER_LOCKS.setdefault(model, threading.RLock())


# The LM attention implementations the decoders are tested with (`tests/test_fast_path.py`); with any other, `generate`
# runs through `GenerationMixin`
_FAST_DECODE_ATTENTION = ("sdpa", "eager")


def generate_static(model: OpenFlamingoForConditionalGeneration, kwargs: dict[str, Any]) -> torch.LongTensor | None:
    """`generate(cache_implementation="static")` (or the model's `generation_config.cache_implementation = "static"`)
    for plain greedy decoding or plain beam search on a CUDA device, through [`_StaticGreedyDecoder`] or
    [`_StaticBeamDecoder`] (one compiled step replayed as a CUDA graph). None when the call asks for anything else
    (sampling, logits processors, streamers, extra outputs, transformers 4.x, a subclass's own generation methods):
    `GenerationMixin`'s loop then runs it.
    """
    config = model.generation_config
    # the argument, else the model's generation config (as `generate` resolves it: an argument of None counts)
    if kwargs.get("cache_implementation", config.cache_implementation) != "static":
        return None
    if not set(kwargs) <= _FAST_DECODE_ARGUMENTS:
        return None
    if _wrapper_prepare_inputs(model) is not None:
        return None  # `GenerationMixin`'s loop calls a wrapper's `prepare_inputs_for_generation`; the decoders never do
    if _overrides_generation_methods(type(model)) or _patched_generation_methods(model):
        return None  # a subclass's or the instance's own inputs, logits processors or loop: `GenerationMixin`'s
    if kwargs.get("compile_config") not in (None, CompileConfig()):
        return None  # compilation settings of the caller's: `GenerationMixin`'s loop compiles with them
    if _TRANSFORMERS_MAJOR < 5:  # 4.x's static cache needs `cache_position` host-side
        return None
    if model.config._get_generation_parameters():
        return None  # generation settings on the model's config (legacy): `GenerationMixin` refuses them
    if torch.is_autocast_enabled(model.device.type):
        # a decoder's static cache (and on CUDA its graphs) holds the dtypes and computation of one precision: one made
        # under autocast failed a later call outside it and the other way round, and on transformers 5.18 a call under
        # autocast failed at once (fp32 and bf16 keys in one static cache)
        return None
    if model.config.text_config._attn_implementation not in _FAST_DECODE_ATTENTION:
        return None  # flex attention: its mask's making branches on the mask's values, which the step cannot trace
    if kwargs.get("do_sample") or kwargs.get("use_cache") is False:
        return None
    if any(not _FAST_DECODE_CONFIG.get(k, lambda v: False)(v) for k, v in _config_differences(config)):
        return None
    # the beam search settings, as `generate` resolves them
    num_beams, length_penalty, early_stopping, num_return_sequences = (
        _generation_setting(kwargs, config, name, default) for name, default in _BEAM_SEARCH_DEFAULTS.items()
    )
    if num_beams == 1:
        # beam settings other than the defaults mean nothing here: `GenerationMixin` warns about them (or rejects
        # several sequences)
        if num_return_sequences != 1 or any(
            kwargs.get(name) not in (None, _BEAM_SEARCH_DEFAULTS[name]) for name in _BEAM_SEARCH_ARGUMENTS
        ):
            return None
    elif (
        not isinstance(num_beams, int)
        or num_beams < 1
        or not isinstance(num_return_sequences, int)
        or not 1 <= num_return_sequences <= num_beams  # `GenerationMixin` raises
        or not isinstance(length_penalty, (int, float))
        or early_stopping not in (True, False, "never")
    ):
        return None
    input_ids, max_new_tokens = kwargs.get("input_ids"), kwargs.get("max_new_tokens")
    pixel_values, image_hidden_states = kwargs.get("pixel_values"), kwargs.get("image_hidden_states")
    image_indices = kwargs.get("image_indices")
    if (
        not torch.is_tensor(input_ids)
        or input_ids.ndim != 2
        or input_ids.is_floating_point()
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
        or image_indices is None
        or (model.device.type != "cuda" and not _StaticDecoder.run_on_cpu)
    ):
        return None
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    eos = () if eos is None else _token_ids(eos)
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    if pad is None:  # as `GenerationMixin`: the first end id
        pad = eos[:1] if eos else None
    else:  # one id (a list of them is for `GenerationMixin` to judge)
        pad = None if isinstance(pad, (list, tuple)) else _token_ids(pad)
    min_new_tokens = kwargs.get("min_new_tokens")
    if eos is None or not pad or len(pad) != 1 or not (min_new_tokens is None or _is_int(min_new_tokens)):
        return None  # no pad id, or ids or a length of a kind that `GenerationMixin` judges (floats, strings, ...)
    (pad,) = pad
    images = None
    if pixel_values is not None:
        images = _PromptImages("pixel_values", model._check_pixel_values(pixel_values))
    elif image_hidden_states is not None:
        images = _PromptImages("image_hidden_states", image_hidden_states)
    batch_size, prompt_len = input_ids.shape
    needed = prompt_len + max_new_tokens
    # the cache length in steps of 64 (fewer distinct shapes to compile), within the LM's positions
    text_config = model.config.text_config
    limit = getattr(text_config, "max_seq_len", None) or getattr(text_config, "max_position_embeddings", None)
    max_len = -(-needed // 64) * 64
    max_len = needed if limit is not None and max_len > limit else max_len
    num_images = None if images is None else images.tensor.shape[1]
    key = (batch_size, max_len, num_images, eos, num_beams, model.config.generated_image_conditioning)
    attention_mask = kwargs.get("attention_mask")
    options = {}
    if num_beams > 1:
        options = {
            "length_penalty": float(length_penalty),
            "early_stopping": early_stopping,
            "num_return_sequences": num_return_sequences,
            # what `GenerationMixin._beam_search` fills unwritten positions with (a pad id of 0 counts as unset)
            "fill_value": (int(pad) or eos[0]) if eos else -1,
        }
    if attention_mask is None:  # as `GenerationMixin`: from the pad token, when it is in the prompt and no eos
        infer = pad not in eos and bool((input_ids == pad).any())
        attention_mask = input_ids.ne(pad).long() if infer else torch.ones_like(input_ids)
        _check_no_empty_row(attention_mask, INFERRED_MASK)
    # the decoders' tensors (static cache, inputs, graphs) outlive the call: made and used outside inference mode, so
    # that a first call inside `torch.inference_mode()` leaves tensors that later calls outside it can update; one
    # call at a time per model (threads: each other's tokens otherwise)
    with _decoder_lock(model), torch.inference_mode(False), torch.no_grad():
        decoders = _STATIC_DECODERS.setdefault(model, {})
        if _DECODED_STATE.get(model) != _decoding_state(model):
            # the model changed since the decoders were made (`model.to(...)`, tensors replaced, adapters added,
            # switched or merged, train/eval, hooks added or removed): their CUDA graphs would replay the old
            # computation on the old memory
            decoders.clear()
        decoder = decoders.get(key)
        made = decoder is None
        if made:
            while len(decoders) >= 4:
                decoders.pop(next(iter(decoders)))
            if num_beams == 1:
                decoder = _StaticGreedyDecoder(model, batch_size, max_len, num_images, eos)
            else:
                decoder = _StaticBeamDecoder(model, batch_size, max_len, num_images, eos, num_beams)
            decoders[key] = decoder
        sequences = decoder.generate(
            input_ids,
            attention_mask,
            images,
            image_indices,
            max_new_tokens,
            min_new_tokens or 0,
            pad,
            **options,
        )
        if made:
            # the state as the new decoder's first call left it: a first forward may move a hook to a module that
            # replaced its target (MosaicGPT's QK-LayerNorm to a PEFT-wrapped `Wqkv`,
            # `modeling_openflamingo._follow_wqkv`)
            _DECODED_STATE[model] = _decoding_state(model)
        return sequences


# The `GenerationMixin` methods that a `generate` call may run and the decoders stand in for: all but `generate` itself
# (a subclass's override calls on through `super()`) and `compute_transition_scores` (never called by `generate`)
_GENERATION_METHODS = frozenset(
    name
    for name, value in vars(GenerationMixin).items()
    if callable(value) or isinstance(value, (staticmethod, classmethod))
) - {"generate", "compute_transition_scores"}


@functools.cache
def _overrides_generation_methods(cls: type) -> bool:
    """Whether `cls`, a subclass of `OpenFlamingoForConditionalGeneration`, has its own version of a method of
    [`_GENERATION_METHODS`] (`prepare_inputs_for_generation`, `_get_logits_processor`, `_get_stopping_criteria`,
    `_sample`, `_beam_search`, ...): its inputs, logits processors or loop, which the decoders would skip."""
    from .modeling_openflamingo import OpenFlamingoForConditionalGeneration as base

    return any(
        inspect.getattr_static(cls, n, None) is not inspect.getattr_static(base, n, None) for n in _GENERATION_METHODS
    )


def _patched_generation_methods(model: nn.Module) -> bool:
    """Whether `model` has an instance attribute of its own for a method of [`_GENERATION_METHODS`] (other than its
    class's, bound); a wrapper's `prepare_inputs_for_generation` is [`_wrapper_prepare_inputs`]'s to find."""
    own = vars(model)
    if _GENERATION_METHODS.isdisjoint(own):
        return False
    return any(
        getattr(own[name], "__func__", None) is not inspect.getattr_static(type(model), name, None)
        for name in _GENERATION_METHODS.intersection(own)
        if name != "prepare_inputs_for_generation"
    )


def _token_ids(value: Any) -> tuple[int, ...] | None:
    """`eos_token_id` / `pad_token_id` as ints: an int or numpy integer, an integer tensor, or a list or tuple of ints
    or numpy integers. None for anything else (floats, strings, bools), which the call leaves to `GenerationMixin`: it
    takes float ids and refuses strings."""
    if torch.is_tensor(value):
        return tuple(value.flatten().tolist()) if _is_integer(value) else None
    values = value if isinstance(value, (list, tuple)) else (value,)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        return None
    return tuple(int(v) for v in values)


# What `GenerationConfig.to_dict` leaves out of a config's attributes
_GENERATION_CONFIG_UNSERIALIZED = frozenset({"_commit_hash", "_original_object_hash", "_mask_length"})


@functools.cache
def _default_generation_config() -> dict[str, Any]:
    return vars(GenerationConfig())


def _config_differences(config: GenerationConfig) -> list[tuple[str, Any]]:
    """The fields of `config.to_diff_dict()` (those that differ from `GenerationConfig()`), as `(name, value)`, without
    its deep copies of both configs (about half of the fast path's host work before its prompt step)."""
    default, missing = _default_generation_config(), object()
    return [
        (name, value)
        for name, value in vars(config).items()
        if name not in _GENERATION_CONFIG_UNSERIALIZED and default.get(name, missing) != value
    ]


def forget_decoders(model: nn.Module) -> None:
    """Drop `model`'s decoders (their graphs hold the computation they were captured with)."""
    _STATIC_DECODERS.pop(model, None)


# How many times any module anywhere got a submodule, parameter or buffer set (`setattr`, `register_*`: PEFT's
# injection, `load_state_dict(assign=True)`), counted by torch's global registration hooks: a model's module walk
# ([`_ModuleWalk`]) is redone only when it moved.
_registrations = 0


def _count_registration(module: nn.Module, name: str, value: Any) -> None:
    global _registrations
    # not inside a compiled function (an LM's forward may slice its `ModuleList`, which registers the layers in a new
    # one): dynamo would guard on the count and recompile at every call
    if not is_traced():
        _registrations += 1


for _register in (
    torch.nn.modules.module.register_module_module_registration_hook,
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
):
    _register(_count_registration)


@dataclass
class _ModuleWalk:
    """A model's modules, parameters and PEFT layers, as they were at `registrations`. Weak references: a hook or a
    closure in a submodule may reach the model, which must stay collectable, and parameters replaced since (loading
    with `assign=True`) must not be kept alive."""

    registrations: int
    ids: tuple[int, ...]
    modules: list[weakref.ref]
    parameters: list[weakref.ref]
    peft_layers: list[weakref.ref]

    @classmethod
    def of(cls, model: nn.Module) -> _ModuleWalk:
        modules = [model]
        for module in modules:  # breadth-first: the list grows as it is read
            modules.extend([child for child in module._modules.values() if child is not None])
        return cls(
            registrations=_registrations,
            ids=tuple(id(module) for module in modules),
            modules=[weakref.ref(module) for module in modules],
            parameters=[weakref.ref(t) for module in modules for t in module._parameters.values() if t is not None],
            peft_layers=[weakref.ref(module) for module in modules if _is_peft_layer(type(module))],
        )


_MODULE_WALKS: weakref.WeakKeyDictionary[nn.Module, _ModuleWalk] = weakref.WeakKeyDictionary()


def _walked_modules(model: nn.Module) -> tuple[_ModuleWalk, list[nn.Module]]:
    """`model`'s [`_ModuleWalk`] and its modules. The module tree is walked again only after a registration
    ([`_registrations`]; an eager forward of some LMs makes one, slicing its `ModuleList`, but the fast path's replays
    do not) or when a module of the walk is gone (`del`, which registers nothing)."""
    walk = _MODULE_WALKS.get(model)
    modules = [ref() for ref in walk.modules] if walk is not None and walk.registrations == _registrations else [None]
    if None in modules:
        walk = _MODULE_WALKS[model] = _ModuleWalk.of(model)
        modules = [ref() for ref in walk.modules]
    return walk, modules


def _function_with_own_code(function: types.FunctionType, name: str | None = None) -> types.FunctionType:
    """A copy of `function` whose code object is its own. dynamo keeps a code object's compiled versions with it and
    counts them against its recompile limit: a copy starts at none, and its versions (and the compiled functions
    dynamo puts in the function's globals) go when the copy does. Its automatic-dynamic decisions (which input
    dimensions it saw change) dynamo keeps per function file, line and name for the whole process: `name`, the code
    object's, gives the copy decisions of its own too."""
    code = function.__code__.replace(co_name=name or function.__code__.co_name)  # a new code object
    # globals of its own too (a copy of the module's): dynamo adds each compiled function to its frame's globals
    namespace = dict(function.__globals__)
    own = types.FunctionType(code, namespace, function.__name__, function.__defaults__, function.__closure__)
    own.__kwdefaults__, own.__qualname__ = function.__kwdefaults__, function.__qualname__
    return own


def _with_own_code(method: types.MethodType) -> types.MethodType:
    """`method`, bound to a copy of its function whose code object is its own ([`_function_with_own_code`]): a
    decoder's step compiled from it starts at no compiled version, and its versions go when the decoder does."""
    return types.MethodType(_function_with_own_code(method.__func__), method.__self__)


def _decoding_state(model: nn.Module) -> tuple:
    """What a decoder's CUDA graphs, captured over `model`, rely on: which modules run, with which forward hooks, in
    which mode (train/eval; for PEFT's layers, the active, disabled and merged adapters and their scales), and the
    address of each of their parameters and buffers (`model.to(...)` and loading with `assign=True` make new tensors
    while the old ones still exist, so their addresses differ), and the config's settings. Between registrations a
    call reads the modes, hooks, addresses and settings (`benchmarks/bench_state_check.py`: 0.41 ms for of3b's 955
    modules on an H200 machine's host before the settings were read, run 64; 0.44 ms with them on a 2-core CPU)."""
    walk, modules = _walked_modules(model)
    peft_layers = [ref() for ref in walk.peft_layers]
    return (
        walk.ids,
        tuple([module.training for module in modules]),
        _module_hook_ids(modules),
        tuple([t.data_ptr() if (t := ref()) is not None else -1 for ref in walk.parameters]),
        tuple([t.data_ptr() for module in modules for t in module._buffers.values() if t is not None]),
        tuple([(tuple(m.active_adapters), m.disable_adapters, tuple(m.merged_adapters)) for m in peft_layers]),
        # each adapter's scale (`set_scale`, `peft.helpers.rescale_adapter_scale`), a number the graphs hold
        tuple([_adapter_scales(m) for m in peft_layers]),
        # settings the compiled steps hold as constants (`only_attend_immediate_media`, `media_token_id`, the LM's
        # attention implementation, ...)
        _config_values(model.config),
    )


# Config entries that say where a config came from or goes, not what a step computes (`save_pretrained` writes the
# first three; a dtype change moves the parameters, which `_decoding_state` sees)
_CONFIG_BOOKKEEPING = frozenset(
    {"architectures", "auto_map", "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype"}
)


def _config_values(config: Any) -> tuple:
    """A config's settings and its sub-configs', comparable: plain values as they are, others by `repr`."""
    values = []
    for name, value in sorted(vars(config).items()):
        if name in _CONFIG_BOOKKEEPING:
            continue
        if isinstance(value, PretrainedConfig):  # a sub-config
            values.append((name, _config_values(value)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            values.append((name, value))
        else:
            values.append((name, repr(value)))
    return tuple(values)


def _adapter_scales(layer: nn.Module) -> tuple:
    """A PEFT layer's `scaling` (adapter name -> number) as a comparable tuple; a tensor by identity (the graphs read
    its current value), as any other kind of value."""

    def comparable(value: Any) -> Any:
        return value if isinstance(value, (int, float)) else id(value)

    scaling = getattr(layer, "scaling", None)
    if isinstance(scaling, Mapping):
        return tuple(sorted((name, comparable(value)) for name, value in scaling.items()))
    return () if scaling is None else (comparable(scaling),)


# The forward hooks that make the input embeddings' output require gradients: transformers'
# `enable_input_require_grads` (gradient checkpointing, PEFT) and PEFT's own when a model lacks that method. Under
# `torch.no_grad()`, as decoding runs, they change nothing.
_REQUIRES_GRAD_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


def _hook_ids(hooks: Mapping[int, Any]) -> tuple[int, ...]:
    """The ids of the hooks in a module's (or torch's global) hook dict that change what a decoding forward computes:
    all but [`_REQUIRES_GRAD_HOOK_NAMES`]."""
    return tuple([key for key, hook in hooks.items() if not _is_requires_grad_hook(hook)])


def _is_requires_grad_hook(hook: Any) -> bool:
    """Whether `hook` is one of [`_REQUIRES_GRAD_HOOK_NAMES`] (plain functions, found by name)."""
    return isinstance(hook, types.FunctionType) and hook.__name__ in _REQUIRES_GRAD_HOOK_NAMES


def _module_hook_ids(modules: Sequence[nn.Module]) -> tuple:
    """The forward (pre-)hooks of `modules` and torch's global ones that a decoding forward runs, by their handles'
    ids (never reused): one added or removed changes what a forward computes. [`_REQUIRES_GRAD_HOOK_NAMES`] do not
    count."""
    ids = [_hook_ids(_global_forward_pre_hooks), _hook_ids(_global_forward_hooks)]
    for i, module in enumerate(modules):
        if module._forward_pre_hooks or module._forward_hooks:
            module_ids = (_hook_ids(module._forward_pre_hooks), _hook_ids(module._forward_hooks))
            if module_ids != ((), ()):
                ids.append((i, module_ids))
    return tuple(ids)


@contextmanager
def _requires_grad_hooks_paused(modules: Sequence[nn.Module]) -> Iterator[None]:
    """The forward hooks of [`_REQUIRES_GRAD_HOOK_NAMES`] on `modules` left out for the block: `torch.compile` cannot
    trace their `requires_grad_()` (with gradient checkpointing or PEFT on, the fast path's decoding step failed to
    compile), and the decoding step needs nothing of them."""
    paused = []
    for module in modules:
        hooks = module._forward_hooks
        for key, hook in list(hooks.items()) if hooks else ():
            if _is_requires_grad_hook(hook):
                paused.append((hooks, key, hook))
                del hooks[key]
    try:
        yield
    finally:
        for hooks, key, hook in paused:
            hooks[key] = hook
        for hooks in {id(hooks): hooks for hooks, _, _ in paused}.values():
            ordered = sorted(hooks.items(), key=operator.itemgetter(0))  # handle ids count up: registration order
            hooks.clear()
            hooks.update(ordered)


_COMPILED_CALL = "_compiled_call_impl"  # where `nn.Module.compile` puts a module's compiled call


def _call_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's call, hooks included: what [`_blocks_compiled`] compiles (a copy of its own per model and kind)."""
    return block._call_impl(*args, **kwargs)


@dataclass
class _PromptBlockCalls:
    """A model's prompt-step compilations of [`_call_block`], one per block kind ([`_blocks_compiled`])."""

    backend: Any
    serial: int  # the model's, in the names of its copies of `_call_block`
    by_kind: dict[type, Any] = field(default_factory=dict)

    def of(self, block: nn.Module) -> Any:
        """The compiled call for `block`'s kind, made at its first use."""
        kind = type(block)
        if kind not in self.by_kind:  # (kinds may share a class name: the gated decoder layers keep their LM's)
            name = f"{_call_block.__name__}_{self.serial}_{len(self.by_kind)}_{kind.__name__}"
            self.by_kind[kind] = torch.compile(_function_with_own_code(_call_block, name), backend=self.backend)
        return self.by_kind[kind]


# model -> its prompt steps' compilations of [`_call_block`]; None after they failed (a prompt step whose blocks did
# not compile): later prompt steps of that model run their blocks as they are.
_PROMPT_BLOCK_CALLS: weakref.WeakKeyDictionary[nn.Module, _PromptBlockCalls | None] = weakref.WeakKeyDictionary()
_PROMPT_BLOCK_MODELS = itertools.count()


@contextmanager
def _blocks_compiled(model: OpenFlamingoForConditionalGeneration, backend: Any) -> Iterator[None]:
    """Inside: the model's repeated blocks ([`OpenFlamingoForConditionalGeneration.repeated_blocks`]: the vision
    tower's layers, the Perceiver's, the language model's decoder layers, the gated cross-attention blocks) run
    compiled by `backend`; after it, as they were (blocks that the caller compiled keep their own compilation
    throughout). For the prompt step, whose CUDA graph is captured inside: its LayerNorms, activations, residual sums,
    masks and casts fuse into far fewer kernels than eager mode runs (of3b at batch 8, 3 images and 96 tokens, on an
    H200: 21.9 -> 17.5 ms, run 116).

    Each block kind of each model runs through a compiled function of its own ([`_PromptBlockCalls`]), a copy of
    [`_call_block`] with its own code object and name ([`_function_with_own_code`]). dynamo keeps compiled versions,
    and counts them against its recompile limit, per code object, so those are not shared with other models or with
    the caller's own compilation of the same blocks (transformers' blocks all enter through one function,
    `forward_with_checkpointing`); and it decides which input dimensions to compile dynamic (those it saw change) per
    function file, line and name for the whole process, so the name keeps one kind's shapes (the vision tower's
    width and length, say) from making another kind's dynamic, or another model's. Each kind compiles for the first
    prompt shape (the language model's decoder layers once per layer: dynamo guards on each layer's index, through
    the static cache); a new prompt length compiles the kinds that see it (the language model's layers and the gated
    blocks) again with a dynamic length, a new batch size every kind with a dynamic batch size, after which new
    shapes reuse them."""
    calls = _PROMPT_BLOCK_CALLS.get(model)
    if calls is None or calls.backend != backend:
        calls = _PROMPT_BLOCK_CALLS[model] = _PromptBlockCalls(backend, next(_PROMPT_BLOCK_MODELS))
    blocks = [block for block in model.repeated_blocks() if block._compiled_call_impl is None]
    # versions of a kind: one per layer, for a first shape, a dynamic prompt length and a dynamic batch size, with room
    limit = max(4 * len(blocks), getattr(torch._dynamo.config, _RECOMPILE_LIMIT))
    # the instance attribute `_compiled_call_impl` is put back as it was (the class's None where the instance had
    # none), or the decoding step's compiled graph, which dynamo guards on it, would recompile
    own = [_COMPILED_CALL in vars(block) for block in blocks]
    try:
        for block in blocks:
            setattr(block, _COMPILED_CALL, functools.partial(calls.of(block), block))
        with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: limit}):
            with _requires_grad_hooks_paused(_walked_modules(model)[1]):
                yield
    finally:
        for block, had_own in zip(blocks, own, strict=True):
            if had_own:
                setattr(block, _COMPILED_CALL, None)
            else:
                vars(block).pop(_COMPILED_CALL, None)


@dataclass
class _PromptImages:
    """The images of a fast-path prompt: `pixel_values` (encoded inside the prompt step) or `image_hidden_states`."""

    kind: str
    tensor: torch.Tensor


def _capture_cuda_graph(
    function: Any, before_each_run: Any, pool: Any = None, warm_up_runs: int = 1
) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `function()`, after `warm_up_runs` runs on a side stream (which compile, and set up cuBLAS
    workspaces, autotuning and lazily made tensors). `before_each_run()` puts the state that `function` reads back in
    place. `pool`: a memory pool shared with other graphs that are never replayed at the same time; after a capture
    that failed, it takes no other capture (torch leaves it marked as being recorded to): pass a new one then."""
    device = torch.cuda.current_device()
    caller_stream = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(caller_stream)
    with torch.cuda.stream(stream):
        for _ in range(warm_up_runs):
            before_each_run()
            function()
    caller_stream.wait_stream(stream)
    before_each_run()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            function()
    except Exception:
        _clean_up_failed_capture(caller_stream)
        raise
    return graph


def _clean_up_failed_capture(caller_stream: torch.cuda.Stream) -> None:
    """Undo what a capture that failed inside (a host sync, an op that CUDA graphs do not allow) leaves behind, as
    `torch.cuda.graph`'s end stops at the error: the capture stream stays the current one (put `caller_stream` back),
    and the CUDA generator stays marked as capturing (every later random op on the device raises "Offset increment
    outside graph capture"; a small capture that ends normally marks it free again)."""
    torch.cuda.set_stream(caller_stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.empty(1, device=caller_stream.device).fill_(0)


def _key_value_dtype(model: nn.Module, block: nn.Module) -> torch.dtype:
    """The dtype of `block.attn.key_values(...)`, by its own rule: its `to_kv` weight's when floating (the images are
    cast to it; a tensor subclass of torchao's or bitsandbytes' 4-bit weights stored in bf16 included), else (packed
    integers, as bitsandbytes' `Int8Params` / `Params4bit`) that of the images it is given, the Perceiver's."""
    weight = block.attn.to_kv.weight
    return weight.dtype if weight.is_floating_point() else model.perceiver.latents.dtype


class _StaticDecoder:
    """Decoding of `rows` sequences into a static KV cache of `max_len` positions. The subclasses choose the tokens:
    [`_StaticGreedyDecoder`] (greedy) and [`_StaticBeamDecoder`] (beam search, `num_beams` rows per prompt).

    Two steps, each over tensors that keep their addresses from call to call and, on CUDA, replayed as a CUDA graph:

    - the prompt step ([`_PromptStep`], one per prompt length and image shape): the vision tower and the Perceiver
      (for `pixel_values`), the cross-attention keys/values over the latents, the forward over the prompt into the
      static cache, and the first tokens. Captured as it runs, with the model's repeated blocks compiled
      ([`_blocks_compiled`]; once for the first prompt shape, once more with a dynamic length or batch size), so that
      later prompt lengths cost a capture, not a compilation;
    - the decoding step (the forward of one token per row, the choice of the next tokens, the end-of-sequence
      bookkeeping): one `torch.compile`d function (`fullgraph=True`: no graph break, no host sync), captured once.

    Outputs are those of `GenerationMixin.generate` (`min_new_tokens`, `eos_token_id`, `pad_token_id`).
    """

    # Prompt rows are repeated this many times (the beams of each prompt).
    rows_per_prompt = 1
    # Tests only: also take the fast path on a CPU (no CUDA graph there).
    run_on_cpu = False
    # On a CPU (tests), the step runs uncompiled unless a backend is named here (e.g. "eager" to check the tracing);
    # the prompt step then runs its blocks compiled by it too.
    cpu_compile_backend: str | None = None
    # On CUDA, the backend that compiles the prompt step's blocks ([`_blocks_compiled`]).
    prompt_compile_backend: Any = "inductor"
    # Prompt steps kept per decoder (one per prompt length and image shape), the oldest dropped first.
    max_prompt_steps = 8
    # Compiled versions of one decoder's step that dynamo allows (a CPU call may recompile; CUDA compiles once).
    recompile_limit = 64

    def __init__(
        self,
        model: OpenFlamingoForConditionalGeneration,
        rows: int,
        max_len: int,
        num_images: int | None,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.model_ref = weakref.ref(model)
        device = model.device
        lm_parameters = _forward_parameters(type(model.language_model))
        self.pass_position_ids = "position_ids" in lm_parameters
        long = {"dtype": torch.long, "device": device}
        self.token = torch.zeros(rows, 1, **long)
        self.position_ids = torch.zeros(rows, 1, **long)
        self.attention_mask = torch.ones(rows, max_len, **long)
        self.image_indices = torch.zeros(rows, 1, **long)  # the image of each row's next input token
        self.media_token_id = model.config.media_token_id
        self.image_conditioning = model.config.generated_image_conditioning
        self.key_values = None
        if num_images is not None:  # (rows, heads, images * latents, dim_head) per block, as `key_values` makes them
            config = model.config
            shape = (rows, config.cross_attn_heads, num_images * config.perceiver_num_latents)
            self.key_values = tuple(
                tuple(
                    torch.zeros(*shape, config.cross_attn_dim_head, dtype=_key_value_dtype(model, block), device=device)
                    for _ in range(2)
                )
                for block in model.gated_cross_attn_layers.values()
            )
        self.step = torch.zeros((), **long)  # how many tokens each row has generated
        self.min_new_tokens = torch.zeros((), **long)
        self.eos_token_ids = torch.tensor(eos_token_ids, **long) if eos_token_ids else None
        self.cache = _new_static_cache(model.config.text_config, max_len)
        self.max_len = max_len
        self.replay: Any = None
        self.prompt_steps: dict[tuple, _PromptStep] = {}
        # One memory pool for all prompt steps' graphs (their temporaries; what they keep is written into the tensors
        # above): they never run at the same time, so prompts of many lengths cost the memory of the largest one.
        self.prompt_pool: Any = None

    @property
    def model(self) -> OpenFlamingoForConditionalGeneration:
        return self.model_ref()

    def _forward(
        self, input_ids: torch.Tensor, image_indices: torch.Tensor | None, position_ids: torch.Tensor, **kw: Any
    ) -> OpenFlamingoCausalLMOutputWithPast:
        """One forward into the static cache (logits of the last position only)."""
        if self.pass_position_ids:
            kw["position_ids"] = position_ids
        return self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            image_indices=image_indices,
            use_cache=True,
            return_dict=True,
            logits_to_keep=1,
            **{_CACHE_FIELD: self.cache},
            **kw,
        )

    def _no_early_end(self, scores: torch.Tensor) -> torch.Tensor:
        """`min_new_tokens` as `generate` applies it: no end of sequence before it (`scores`: `(rows, vocab)`). The end
        ids found in the vocabulary, as `MinNewTokensLengthLogitsProcessor` finds them: one outside it (negative, or
        past the LM head's width; `generate` warns that it never matches) is no index into `scores`."""
        if self.eos_token_ids is None:
            return scores
        is_eos = self._ends(torch.arange(scores.shape[-1], device=scores.device))  # (vocab,)
        too_early = self.step < self.min_new_tokens
        return scores.masked_fill(is_eos & too_early, float("-inf"))

    def _ends(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of `tokens` end a sequence (not `torch.isin`: with many end ids it sorts, and syncs with the host,
        which no CUDA graph could hold)."""
        return (tokens.unsqueeze(-1) == self.eos_token_ids).any(-1)

    def _select(self, logits: torch.Tensor) -> Any:
        """Choose each row's next token from `logits` `(rows, vocab)`: put it in `token`, advance `step`. What it
        returns goes to [`_commit`]."""
        raise NotImplementedError

    def _commit(self, selected: Any) -> None:
        """Eager work after [`_select`], outside the compiled step (but inside its CUDA graph)."""

    def _choose(self, logits: torch.Tensor) -> None:
        self._commit(self._select(logits))

    def _decode_step(self) -> Any:
        """The compiled part of a decoding step: the forward of each row's token and [`_select`]."""
        image_cache = None
        if self.key_values is not None:
            image_cache = OpenFlamingoImageCache(key_values=self.key_values, last_image_index=self.image_indices[:, 0])
        out = self._forward(self.token, self.image_indices, self.position_ids, image_cache=image_cache)
        selected = self._select(out.logits[:, -1])
        self.position_ids.add_(1)
        return selected

    def _prepare_replay(self) -> None:
        """Compile the step and, on CUDA, capture it as a CUDA graph. The warm-up steps write garbage into the cache
        and the buffers; `generate` resets them before the prompt."""
        device = self.token.device
        # eager: the cache allocates its tensors at its first update (not in a compiled graph)
        self._commit(self._decode_step())
        backend = "inductor" if device.type == "cuda" else self.cpu_compile_backend
        rows = self.token.shape[0]
        options = decoding_step_options(device, rows) if backend == "inductor" else None  # Triton kernels, see there
        compiled = _with_own_code(self._decode_step)
        if backend:
            compiled = torch.compile(compiled, fullgraph=True, dynamic=False, backend=backend, options=options)

        def step() -> None:
            self._commit(compiled())

        # dynamo counts compiled versions per code object, against a limit (with `fullgraph=True`, an error past it):
        # each decoder's step has a code object of its own ([`_with_own_code`]), so that the decoders a process makes
        # over its life (every batch size, cache length and model; four kept per model) do not add up to it.
        limit = max(self.recompile_limit, getattr(torch._dynamo.config, _RECOMPILE_LIMIT))

        def compiling(function: Any) -> Any:
            """`function` run as the step compiles: without the hooks that dynamo cannot trace."""
            with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: limit}):
                with _requires_grad_hooks_paused(_walked_modules(self.model)[1]):
                    return function()

        if device.type != "cuda":
            # no CUDA graph: every call goes through dynamo's guards again, under the same conditions
            self.replay = functools.partial(compiling, step)
            if backend:  # compiles now rather than in the first call
                self.replay()
            return
        # compiles, then runs with everything (cuBLAS workspaces, autotuning) in place
        self.replay = compiling(lambda: _capture_cuda_graph(step, self._reset_positions, warm_up_runs=3)).replay

    def _reset_positions(self) -> None:
        """Cache positions and the step count back to 0 (before a prompt, or a warm-up run: writes stay in bounds)."""
        self.cache.reset()
        self.step.zero_()

    def _prompt_step(self, prompt_len: int, images: _PromptImages | None) -> _PromptStep:
        key: tuple = (prompt_len,)
        if images is not None:
            key += (images.kind, tuple(images.tensor.shape), images.tensor.dtype)
        prompt = self.prompt_steps.pop(key, None)
        if prompt is None:
            while len(self.prompt_steps) >= self.max_prompt_steps:
                self.prompt_steps.pop(next(iter(self.prompt_steps)))
            prompt = _PromptStep(self, prompt_len, images)
        self.prompt_steps[key] = prompt  # most recently used last
        return prompt

    def expand(self, prompt_rows: torch.Tensor) -> torch.Tensor:
        """`(batch, ...)` -> `(rows, ...)`: each prompt row repeated `rows_per_prompt` times, as `generate` expands
        its inputs for beam search."""
        if self.rows_per_prompt == 1:
            return prompt_rows
        return prompt_rows.repeat_interleave(self.rows_per_prompt, dim=0)

    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        images: _PromptImages | None,
        image_indices: torch.LongTensor,
        max_new_tokens: int,
        min_new_tokens: int,
        pad_token_id: int,
        **options: Any,
    ) -> torch.LongTensor:
        """`(batch, prompt_len)` prompts -> their sequences, prompt included, as `GenerationMixin.generate` returns
        them. `options`: the subclass's settings (see its `_start`)."""
        # Warm-up runs and captures write garbage into the cache and the buffers: before the resets below.
        if self.replay is None:
            self._prepare_replay()
        prompt = self._prompt_step(input_ids.shape[1], images)
        prompt.load(self.expand(input_ids), self.expand(attention_mask), self.expand(image_indices), images)
        prompt.prepare()
        self._reset_positions()
        self.min_new_tokens.fill_(min_new_tokens)
        self._start(max_new_tokens, pad_token_id, **options)
        prompt.run()
        return self._finish(input_ids, max_new_tokens, min_new_tokens)

    def _start(self, max_new_tokens: int, pad_token_id: int, **options: Any) -> None:
        """Set the selection state for a new call."""
        raise NotImplementedError

    def _finish(self, input_ids: torch.LongTensor, max_new_tokens: int, min_new_tokens: int) -> torch.LongTensor:
        """Replay the decoding step until generation ends (after the prompt step); the sequences."""
        raise NotImplementedError


class _StaticGreedyDecoder(_StaticDecoder):
    """Greedy decoding of `batch_size` rows ([`_StaticDecoder`]). The host waits on the device only every
    `check_every` steps; the tokens a row gets after its end are `pad_token_id`, as from `generate`."""

    check_every = 16

    def __init__(
        self,
        model: OpenFlamingoForConditionalGeneration,
        batch_size: int,
        max_len: int,
        num_images: int | None,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        super().__init__(model, batch_size, max_len, num_images, eos_token_ids)
        device = self.token.device
        self.pad_token_id = torch.zeros((), dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.finished_at = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)

    def _select(self, logits: torch.Tensor) -> None:
        """Greedy choice of each row's next token, as `generate` makes it; appends it and advances `step`."""
        logits = self._no_early_end(logits.float())
        next_tokens = torch.where(self.unfinished, logits.argmax(dim=-1), self.pad_token_id)
        self.tokens.index_copy_(1, self.step.view(1), next_tokens.unsqueeze(1))
        if self.eos_token_ids is not None:
            ends = self._ends(next_tokens) & self.unfinished
            self.finished_at.copy_(torch.where(ends, self.step, self.finished_at))
            self.unfinished &= ~ends
        self.token.copy_(next_tokens.unsqueeze(1))
        self.image_indices.copy_(
            _fed_image_indices(self.image_indices, self.token, self.media_token_id, self.image_conditioning)
        )
        self.step.add_(1)

    def _start(self, max_new_tokens: int, pad_token_id: int) -> None:
        self.pad_token_id.fill_(pad_token_id)
        self.unfinished.fill_(True)
        self.finished_at.zero_()
        self.tokens.fill_(pad_token_id)

    def _finish(self, input_ids: torch.LongTensor, max_new_tokens: int, min_new_tokens: int) -> torch.LongTensor:
        steps = 1
        while steps < max_new_tokens:
            self.replay()
            steps += 1
            if (
                self.eos_token_ids is not None
                and steps >= min_new_tokens
                and steps % self.check_every == 0
                and not bool(self.unfinished.any())
            ):
                break
        if self.eos_token_ids is not None and not bool(self.unfinished.any()):
            steps = int(self.finished_at.max()) + 1  # `generate` stops after the step in which the last row ended
        return torch.cat((input_ids, self.tokens[:, :steps].clone()), dim=1)


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, indices[b, j], ...]` for `tensor` `(batch, beams, ...)` and `indices` `(batch, k)`."""
    return tensor.gather(1, indices.view(*indices.shape, *([1] * (tensor.ndim - 2))).expand(-1, -1, *tensor.shape[2:]))


class _StaticBeamDecoder(_StaticDecoder):
    """Beam search over `num_beams` rows per prompt ([`_StaticDecoder`]), step for step the algorithm of
    `GenerationMixin._beam_search` (transformers 5), with its state in tensors of fixed shape so that a step is one
    CUDA graph: at each step the `max(2, 1 + len(eos)) * num_beams` best continuations of a prompt's beams, the ends
    among the first `num_beams` of them kept as finished hypotheses (scores divided by `length ** length_penalty`),
    the best unfinished ones continued (their KV cache rows gathered in place), and the early-stopping heuristic.
    The host reads the stopping flag after every step: `generate` stops at once, and a step more could change its
    result. Returns the `num_return_sequences` best hypotheses of each prompt, padded as `generate` pads them.
    """

    def __init__(
        self,
        model: OpenFlamingoForConditionalGeneration,
        batch_size: int,
        max_len: int,
        num_images: int | None,
        eos_token_ids: tuple[int, ...],
        num_beams: int,
    ) -> None:
        super().__init__(model, batch_size * num_beams, max_len, num_images, eos_token_ids)
        self.rows_per_prompt = num_beams
        device = self.token.device
        long = {"dtype": torch.long, "device": device}
        self.candidates = max(2, 1 + len(eos_token_ids)) * num_beams  # as `GenerationMixin`: enough unfinished ones
        self.is_top_candidate = (torch.arange(self.candidates, device=device) < num_beams).unsqueeze(0)
        self.first_row = torch.arange(batch_size, **long).unsqueeze(-1) * num_beams
        shape = (batch_size, num_beams)
        # the running beams: tokens generated so far, the summed log-probs
        self.running_tokens = torch.zeros(*shape, max_len, **long)
        self.running_scores = torch.zeros(shape, dtype=torch.float32, device=device)
        # the finished hypotheses (the best `num_beams`): tokens, lengths (0: no hypothesis yet), scores with the
        # length penalty
        self.tokens = torch.zeros(*shape, max_len, **long)
        self.lengths = torch.zeros(shape, **long)
        self.scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.max_new_tokens = torch.zeros((), **long)
        # The length penalty: `generate` divides scores by the Python float `length ** length_penalty`, which torch
        # makes fp32; on CUDA it multiplies by that divisor's fp32 reciprocal instead (one rounding more). Here one
        # factor per length 1..max_len, made on the host, so that the step rounds as `generate` does on its device.
        self.divide_by_factor = device.type != "cuda"
        self.length_factors = torch.ones(max_len, dtype=torch.float32, device=device)
        # the length the heuristic assumes: `max_new_tokens` (early_stopping="never", length_penalty > 0) or the current
        self.heuristic_at_max_length = torch.zeros((), dtype=torch.bool, device=device)
        self.stop_when_full = torch.zeros((), dtype=torch.bool, device=device)  # early_stopping=True
        self.num_return_sequences = 1

    def _length_penalty(self, scores: torch.Tensor, length_index: torch.Tensor) -> torch.Tensor:
        """`scores / (length ** length_penalty)`, rounded as `generate` rounds it; `length_index`: length - 1, one
        element."""
        factor = self.length_factors.index_select(0, length_index.view(1))
        return scores / factor if self.divide_by_factor else scores * factor

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One step of `GenerationMixin._beam_search` from the running beams' `logits` `(batch * beams, vocab)`.

        Returns the new beam state, which [`_commit`] copies into place: the step itself never writes a state tensor
        that it gathers from (compiled, such a gather and its write could become one kernel that reads what other
        threads have already overwritten)."""
        batch_size, num_beams = self.running_scores.shape
        step = self.step.view(1)
        log_probs = self._no_early_end(F.log_softmax(logits.float(), dim=-1))
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.view(batch_size, num_beams, vocab) + self.running_scores.unsqueeze(-1)).flatten(1)
        # the best continuations of each prompt's beams
        top_scores, top_indices = torch.topk(log_probs, k=self.candidates)
        source = top_indices // vocab
        top_tokens = top_indices % vocab
        top_sequences = _gather_beams(self.running_tokens, source).index_copy(2, step, top_tokens.unsqueeze(-1))
        # the stopping criteria of each candidate: the length limit, an end-of-sequence token
        hits = (self.step + 1 >= self.max_new_tokens).expand_as(top_tokens)
        if self.eos_token_ids is not None:
            hits = hits | self._ends(top_tokens)
        # the beams that go on: the best candidates that did not stop
        continuing_scores = top_scores + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(continuing_scores, k=num_beams)[1]
        running_tokens = _gather_beams(top_sequences, keep)
        running_scores = _gather_beams(continuing_scores, keep)
        # finished hypotheses: the stopped ones among the first `num_beams` candidates, if they beat those kept so far
        just_finished = hits & self.is_top_candidate
        finished_scores = self._length_penalty(top_scores, step)
        full = self.is_finished.all(dim=-1, keepdim=True) & self.stop_when_full
        finished_scores = finished_scores + full.to(torch.float32) * -1.0e9
        finished_scores = finished_scores + (~self.can_improve).to(torch.float32) * -1.0e9
        finished_scores = finished_scores + (~just_finished) * -1.0e9
        merged_scores = torch.cat((self.scores, finished_scores), dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        tokens = _gather_beams(torch.cat((self.tokens, top_sequences), dim=1), best)
        lengths = _gather_beams(torch.cat((self.lengths, (self.step + 1).expand_as(top_tokens)), dim=1), best)
        is_finished = _gather_beams(torch.cat((self.is_finished, just_finished), dim=1), best)
        scores = _gather_beams(merged_scores, best)
        # the early-stopping heuristic: can the best running beam still beat the worst finished hypothesis?
        length = torch.where(self.heuristic_at_max_length, self.max_new_tokens - 1, self.step)
        best_possible = self._length_penalty(running_scores[:, :1], length)
        worst_finished = torch.where(is_finished, scores.min(dim=1, keepdim=True)[0], -1.0e9)
        can_improve = self.can_improve & (best_possible > worst_finished).any(dim=-1, keepdim=True)
        done = ~(can_improve.any() & ~(is_finished.all() & self.stop_when_full) & ~hits.all())
        # each continuing beam's KV cache rows are those of the beam it extends; its next input, its new token
        source_rows = (_gather_beams(source, keep) + self.first_row).flatten()
        self.token.copy_(running_tokens.index_select(2, step).view(-1, 1))
        previous = self.image_indices
        if self.image_conditioning == "sequence":  # the image counts of the beams they extend
            previous = previous.index_select(0, source_rows)
        image_indices = _fed_image_indices(previous, self.token, self.media_token_id, self.image_conditioning)
        self.step.add_(1)
        new_state = (running_tokens, running_scores, tokens, lengths, is_finished, scores, can_improve, image_indices)
        return (*new_state, done, source_rows)

    def _commit(self, selected: tuple[torch.Tensor, ...]) -> None:
        """The beam state from [`_select`] into place, and the KV cache rows gathered for the continuing beams."""
        *new_state, done, source_rows = selected
        state = (
            self.running_tokens,
            self.running_scores,
            self.tokens,
            self.lengths,
            self.is_finished,
            self.scores,
            self.can_improve,
            self.image_indices,
        )
        for tensor, new in zip(state, new_state, strict=True):
            tensor.copy_(new)
        self.done.copy_(done)
        # in place: the cache's own `reorder_cache` binds new tensors, which the captured step would never see
        for layer in self.cache.layers:
            layer.keys.copy_(layer.keys.index_select(0, source_rows))
            layer.values.copy_(layer.values.index_select(0, source_rows))

    def _start(
        self,
        max_new_tokens: int,
        pad_token_id: int,
        length_penalty: float,
        early_stopping: bool | str,
        num_return_sequences: int,
        fill_value: int,
    ) -> None:
        self.num_return_sequences = num_return_sequences
        self.max_new_tokens.fill_(max_new_tokens)
        divisors = torch.tensor([n**length_penalty for n in range(1, self.max_len + 1)]).to(torch.float32)
        self.length_factors.copy_(divisors if self.divide_by_factor else 1.0 / divisors)  # IEEE division on the host
        self.heuristic_at_max_length.fill_(early_stopping == "never" and length_penalty > 0.0)
        self.stop_when_full.fill_(early_stopping is True)
        for tokens in (self.running_tokens, self.tokens):
            tokens.fill_(fill_value)
        self.lengths.zero_()
        self.running_scores.zero_()
        self.running_scores[:, 1:] = -1.0e9  # the first step extends the first beam only (all beams are the prompt)
        self.scores.fill_(-1.0e9)
        self.is_finished.zero_()
        self.can_improve.fill_(True)
        self.done.zero_()

    def _finish(self, input_ids: torch.LongTensor, max_new_tokens: int, min_new_tokens: int) -> torch.LongTensor:
        steps = 1
        while steps < max_new_tokens and not bool(self.done):
            self.replay()
            steps += 1
        count = self.num_return_sequences
        tokens = self.tokens[:, :count].flatten(0, 1)
        generated = int(self.lengths[:, :count].max())  # the longest hypothesis returned
        prompts = input_ids.repeat_interleave(count, dim=0)
        return torch.cat((prompts, tokens[:, :generated]), dim=1)


class _PromptStep:
    """The first step of a [`_StaticDecoder`] for one prompt length and image shape: images encoded (from
    `pixel_values`), cross-attention keys/values written into the decoder's, the prompt's forward into its static
    cache, the first token chosen. Inputs are copied into tensors of its own first ([`load`]), so that on CUDA the
    step is a CUDA graph replayed, captured at its first use with the model's blocks compiled ([`_blocks_compiled`]);
    with the blocks as they are if that fails, eager if the capture fails too (each with a warning).
    """

    def __init__(self, decoder: _StaticDecoder, prompt_len: int, images: _PromptImages | None) -> None:
        self.decoder = decoder
        batch_size = decoder.token.shape[0]
        long = {"dtype": torch.long, "device": decoder.token.device}
        self.input_ids = torch.zeros(batch_size, prompt_len, **long)
        self.image_indices = torch.zeros(batch_size, prompt_len, **long)
        self.images = None if images is None else _PromptImages(images.kind, torch.zeros_like(images.tensor))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = decoder.token.device.type != "cuda"
        # the backend that compiles the model's blocks for this step (None: they run as they are), until that fails
        backend = decoder.cpu_compile_backend if self.eager else decoder.prompt_compile_backend
        failed = _PROMPT_BLOCK_CALLS.get(decoder.model, ()) is None  # (None: marked failed; absent: not tried)
        self.compile_backend = backend if COMPILE_PROMPT_BLOCKS and not failed else None

    def load(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_indices: torch.Tensor,
        images: _PromptImages | None,
    ) -> None:
        decoder, prompt_len = self.decoder, self.input_ids.shape[1]
        self.input_ids.copy_(input_ids)
        self.image_indices.copy_(image_indices)
        decoder.attention_mask.fill_(1)
        decoder.attention_mask[:, :prompt_len].copy_(attention_mask)
        if images is not None:
            self.images.tensor.copy_(images.tensor)

    def prepare(self) -> None:
        if self.graph is not None or self.eager:
            return
        decoder = self.decoder
        if decoder.prompt_pool is None:
            decoder.prompt_pool = torch.cuda.graph_pool_handle()
        while self.graph is None and not self.eager:
            compiled = self.compile_backend is not None
            try:
                self.graph = _capture_cuda_graph(
                    self._compiled_step if compiled else self._step,
                    decoder._reset_positions,
                    decoder.prompt_pool,
                    warm_up_runs=2 if compiled else 1,
                )
            except Exception as error:
                decoder.prompt_pool = torch.cuda.graph_pool_handle()  # (a failed capture's pool takes no other)
                if not (compiled or isinstance(error, RuntimeError)):
                    raise
                # what failed inside the capture (not the capture's own end); e.g. a host sync in some LM's code
                cause = error.__context__ or error
                if compiled:  # a block that does not compile: the blocks as they are, here and in later prompt steps
                    logger.warning_once(
                        "The prompt step of fast decoding runs with its blocks uncompiled: "
                        f"{type(cause).__name__}: {cause}"
                    )
                    self.compile_backend = None
                    _PROMPT_BLOCK_CALLS[decoder.model] = None
                else:  # such a prompt runs eagerly
                    logger.warning_once(
                        f"The prompt step of fast decoding runs without a CUDA graph: {type(cause).__name__}: {cause}"
                    )
                    self.eager = True

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.compile_backend is not None:  # a CPU (tests)
            self._compiled_step()
        else:
            self._step()

    def _compiled_step(self) -> None:
        """[`_step`] with the model's repeated blocks compiled ([`_blocks_compiled`])."""
        with _blocks_compiled(self.decoder.model, self.compile_backend):
            self._step()

    def _step(self) -> None:
        decoder = self.decoder
        mask = decoder.attention_mask[:, : self.input_ids.shape[1]]
        positions = _position_ids_from_mask(mask)
        if self.images is None:  # text only; `image_indices` (zeros) spare the forward its host-side <image> check
            out = decoder._forward(self.input_ids, self.image_indices, positions)
        else:
            model = decoder.model
            if self.images.kind == "pixel_values":
                image_hidden_states = model.get_image_features(self.images.tensor)
            else:
                image_hidden_states = self.images.tensor
            image_hidden_states = decoder.expand(image_hidden_states)  # the rows of each prompt's beams
            out = decoder._forward(
                self.input_ids, self.image_indices, positions, image_hidden_states=image_hidden_states
            )
            for (k, v), (new_k, new_v) in zip(decoder.key_values, out.image_cache.key_values, strict=True):
                k.copy_(new_k)
                v.copy_(new_v)
        decoder.image_indices.copy_(self.image_indices[:, -1:])
        decoder.position_ids.copy_(positions[:, -1:] + 1)
        decoder._choose(out.logits[:, -1])


def _new_static_cache(text_config: Any, max_len: int) -> Any:
    from transformers import StaticCache

    return StaticCache(config=text_config, max_cache_len=max_len)
