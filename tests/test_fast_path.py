"""The fast decoding path gives the tokens of plain `generate`: static cache, compile-friendly decoding step, and the
greedy decoder that replays one compiled step (on a GPU, as a CUDA graph; here on the CPU, without one)."""

from __future__ import annotations

import copy
import gc
import os
import threading
import types
import weakref

import pytest
import torch
import transformers
from transformers import CompileConfig

from modeling_openflamingo import decoding_kernels, fast_decoding
from modeling_openflamingo import modeling_openflamingo as modeling
from modeling_openflamingo.fast_decoding import (
    _STATIC_DECODERS,
    _StaticBeamDecoder,
    _StaticDecoder,
    _StaticGreedyDecoder,
    forget_decoders,
)
from modeling_openflamingo.modeling_openflamingo import (
    _TRACED_CROSS_ATTENTION,
    OpenFlamingoImageCache,
    _mpt_static_cache_view,
)

from .conftest import SWEEP, enable_checkpointing, is_checkpointing, needs_flex_with_static_cache
from .test_core import EOC, FLEX_FAMILIES, MEDIA, PAD, flex_text_config, mpt_attention_classes
from .test_core import inputs as cpu_inputs
from .test_core import tiny_model as cpu_tiny_model

IS_V4 = transformers.__version__.startswith("4.")
# The fast path is made for CUDA (CUDA graphs, inductor); the suite runs on the CPU. On a GPU machine,
# `OPENFLAMINGO_TEST_DEVICE=cuda python -m pytest tests/test_fast_path.py` runs the same comparisons there.
DEVICE = torch.device(os.environ.get("OPENFLAMINGO_TEST_DEVICE", "cpu"))


def tiny_model(*args, **kwargs):
    return cpu_tiny_model(*args, **kwargs).to(DEVICE)


def inputs(*args, **kwargs):
    return tuple(tensor.to(DEVICE) for tensor in cpu_inputs(*args, **kwargs))


FAMILIES = ["mpt", "mosaic_gpt", "gpt_neox", "llama"]
needs_v5 = pytest.mark.skipif(IS_V4, reason="static-cache decoding of MPT and the fast path need transformers 5")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="a CUDA-only variant (OPENFLAMINGO_TEST_DEVICE=cuda)")


@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """Let the fast path run on the CPU (it is meant for CUDA, where it replays a CUDA graph)."""
    monkeypatch.setattr(_StaticDecoder, "run_on_cpu", True)
    return monkeypatch


def padded_prompt(batch: int = 3, seq: int = 12):
    ids, pixel_values = inputs(batch=batch, seq=seq)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    ids[0, :3] = PAD
    ids[0, 3] = MEDIA
    return ids, mask, pixel_values


def generate_kwargs(ids, mask, pixel_values, **kwargs):
    return dict(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values, do_sample=False, pad_token_id=PAD, **kwargs
    )


def assert_fast_path_equals_generate(model, kw):
    """`generate` with a static cache (the fast path), twice (the decoder reused), gives plain `generate`'s output."""
    expected = model.generate(**kw)
    fast = model.generate(**kw, cache_implementation="static")
    again = model.generate(**kw, cache_implementation="static")
    assert torch.equal(fast, expected), kw
    assert torch.equal(again, expected), kw
    return fast


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generate_equals_dynamic(family):
    """`cache_implementation="static"` through GenerationMixin's own loop (extra outputs: not the fast path, on CUDA
    either). transformers 4.x's MPT cannot decode with a static cache (its 4-D mask check): refused up front, with what
    to do instead."""
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    if IS_V4 and family in ("mpt", "mosaic_gpt"):
        kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=2)
        with pytest.raises(ValueError, match=r"MPT / MosaicGPT language model needs transformers >= 5.*Leave"):
            model.generate(**kw, cache_implementation="static")
        config = copy.deepcopy(model.generation_config)
        config.cache_implementation = "static"
        with pytest.raises(ValueError, match="needs transformers >= 5"):
            model.generate(**kw, generation_config=config)
        assert model.generate(**kw).shape == (ids.shape[0], ids.shape[1] + 2)  # the dynamic cache decodes
        # no cache at all: nothing to refuse, the static request has no effect
        no_cache = model.generate(**kw, use_cache=False)
        assert torch.equal(model.generate(**kw, use_cache=False, cache_implementation="static"), no_cache)
        config.use_cache = False
        assert torch.equal(model.generate(**kw, generation_config=config), no_cache)
        # a static cache object given is still one: refused with use_cache=False too
        static = transformers.StaticCache(config=model.config.text_config, max_cache_len=32)
        with pytest.raises(ValueError, match="a compileable cache object"):
            model.generate(**kw, use_cache=False, past_key_values=static)
        return
    for extra in ({"num_beams": 2}, {}):
        extra = {**extra, "output_scores": True, "return_dict_in_generate": True}
        kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6, **extra)
        dynamic, static = model.generate(**kw), model.generate(**kw, cache_implementation="static")
        assert torch.equal(dynamic.sequences, static.sequences)
    assert model not in _STATIC_DECODERS


@needs_v5
@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_static_cache_with_mpts_own_attention(family):
    """With `attn_implementation="eager"` MPT keeps transformers' `MptAttention`, which decodes with a static cache
    through the cache view of `add_mpt_static_cache_support`: the tokens of the dynamic cache, and those of SDPA."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    from modeling_openflamingo import OpenFlamingoForConditionalGeneration

    model = tiny_model(family)
    eager = OpenFlamingoForConditionalGeneration._from_config(model.config, attn_implementation="eager").to(DEVICE)
    eager.load_state_dict(model.state_dict())
    eager.eval()
    assert {type(m) for m in eager.modules() if isinstance(m, MptAttention)} == {mpt_attention_classes(family)["eager"]}

    def views(m):  # the attentions that get the static cache's view
        return [a for a in m.modules() if _mpt_static_cache_view in a._forward_pre_hooks.values()]

    assert len(views(eager)) == model.config.text_config.n_layers and not views(model)
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=2)
    static = eager.generate(**kw, cache_implementation="static")
    assert torch.equal(static, eager.generate(**kw))
    assert torch.equal(static, model.generate(**kw, cache_implementation="static"))


@needs_v5
@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_set_attn_implementation_switches_mpts_attention(family):
    """`set_attn_implementation("eager")` on a built model switches to `MptAttention` (attention weights, the static
    cache's view), and back with "sdpa": the same tokens either way, with the dynamic and the static cache. The
    model's config says which, and transformers' "cannot switch" warnings about MPT (whose switch is ours) stay away."""
    from transformers.models.mpt.modeling_mpt import MptAttention
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=2)
    expected = model.generate(**kw)
    classes = mpt_attention_classes(family)
    for implementation, attention, hooked in (("eager", classes["eager"], True), ("sdpa", classes["sdpa"], False)):
        with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
            model.set_attn_implementation(implementation)
        assert "does not support setting its attention implementation" not in captured.out, captured.out
        assert "without finding the associated sub-model" not in captured.out, captured.out
        assert model.config._attn_implementation == implementation
        assert model.config.vision_config._attn_implementation == implementation
        attentions = [m for m in model.modules() if isinstance(m, MptAttention)]
        assert {type(m) for m in attentions} == {attention}
        assert all((_mpt_static_cache_view in m._forward_pre_hooks.values()) == hooked for m in attentions)
        assert torch.equal(model.generate(**kw), expected)
        assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, output_attentions=True)
        assert (out.attentions[0] is not None) == hooked


@needs_v5
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_step_compiles_without_graph_breaks(family):
    """One decoding step into a static cache traces as a single graph (`fullgraph=True`) and gives eager's logits."""
    from transformers import StaticCache

    torch._dynamo.reset()
    model = tiny_model(family)
    ids, pixel_values = inputs()
    text_config = model.config.text_config
    results = []
    for compiled in (False, True):
        cache = StaticCache(config=text_config, max_cache_len=16)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values, cache=cache)
            step = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
            nxt = step(
                input_ids=out.logits[:, -1:].argmax(-1),
                attention_mask=torch.ones(2, 16, dtype=torch.long, device=DEVICE),
                image_cache=out.image_cache,
                image_indices=out.image_cache.last_image_index[:, None],
                cache=cache,
            )
        results.append(nxt.logits)
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
    assert not _TRACED_CROSS_ATTENTION  # the traced forward's state is gone with it


@needs_v5
@pytest.mark.parametrize("pdl", [False, pytest.param(True, marks=needs_cuda)], ids=["", "pdl"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_greedy_path_equals_generate(family, pdl, fast_path_on_cpu):
    # pdl: the compiled step's kernels launched with programmatic dependent launch (on GPUs that have it)
    fast_path_on_cpu.setattr(decoding_kernels, "PROGRAMMATIC_DEPENDENT_LAUNCH", pdl)
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    cases = [
        {"max_new_tokens": 8, "min_new_tokens": 8},  # forced length, as the benchmark
        # many end-of-sequence ids: rows end at different steps, later tokens are padding, generation stops early
        {"max_new_tokens": 8, "eos_token_id": [EOC, *range(5, 300, 2)]},
        {"max_new_tokens": 8, "min_new_tokens": 3, "eos_token_id": [EOC, *range(5, 300, 2)]},
    ]
    for case in cases:
        assert_fast_path_equals_generate(model, generate_kwargs(ids, mask, pixel_values, **case))
    assert len(_STATIC_DECODERS[model]) == 2  # one per (batch, cache length, images, eos ids)
    # one row: on CUDA the compiled step's products then go through `decoding_kernels.small_batch_linear`
    kw = generate_kwargs(ids[1:2], mask[1:2], pixel_values[1:2], max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))
    text_only = {"input_ids": torch.randint(0, 400, (2, 7), device=DEVICE), "max_new_tokens": 5, "pad_token_id": PAD}
    assert torch.equal(model.generate(**text_only), model.generate(**text_only, cache_implementation="static"))


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_path_without_attention_mask_infers_it_from_the_pad_token(num_beams, fast_path_on_cpu):
    """As `GenerationMixin`: no `attention_mask`, a left-padded prompt (pad id != eos) -> padding is masked."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, num_beams=num_beams)
    with_mask = model.generate(**kw)
    del kw["attention_mask"]
    assert torch.equal(assert_fast_path_equals_generate(model, kw), with_mask)


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_path_from_the_generation_config_and_across_inference_mode(num_beams, fast_path_on_cpu):
    """`model.generation_config.cache_implementation = "static"` (transformers' way to ask for a static cache) takes
    the fast path as the argument does, and the argument still wins. A decoder first made inside
    `torch.inference_mode()` (an evaluation loop's) serves calls outside it, and the other way round (its static cache
    and inputs were inference tensors, which later calls could not update)."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=5, num_beams=num_beams)
    expected = model.generate(**kw)
    model.generation_config.cache_implementation = "static"
    with torch.inference_mode():  # the inputs as inference tensors too
        inner = {k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}
        assert torch.equal(model.generate(**inner), expected)
    assert len(_STATIC_DECODERS[model]) == 1
    for _ in range(2):
        assert torch.equal(model.generate(**kw), expected)
        with torch.inference_mode():
            assert torch.equal(model.generate(**kw), expected)
    assert len(_STATIC_DECODERS[model]) == 1
    forget_decoders(model)
    assert torch.equal(model.generate(**kw, cache_implementation=None), expected)  # the dynamic cache
    assert model not in _STATIC_DECODERS


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 2])
def test_fast_path_with_end_ids_outside_the_vocabulary(num_beams, fast_path_on_cpu):
    """An `eos_token_id` outside the vocabulary (negative, or past the LM head's 403 ids): `generate` warns that it
    never matches and stops at the others; the fast path too (its `min_new_tokens` masking indexed the scores with
    it, an out-of-bounds error)."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    ends = model.generate(**generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, eos_token_id=None))
    ended = int(ends[1, ids.shape[1] + 1])  # a token that row 1 generates: calls below end there
    for eos in (-1, 1000, [ended, -1], [-1, ended], [ended, 403]):
        for extra in ({}, {"min_new_tokens": 3}, {"pad_token_id": 0}):
            kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, num_beams=num_beams, eos_token_id=eos)
            assert_fast_path_equals_generate(model, {**kw, **extra})
    assert model in _STATIC_DECODERS


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_row_of_padding_only_is_refused_with_the_mask_inferred_too(num_beams, fast_path_on_cpu):
    """Without `attention_mask`, `generate` infers it from the pad token (`GenerationMixin`'s rule); a row that is
    padding only by that mask is refused as with the mask given, by the fast path and `GenerationMixin` alike (with
    `pad_token_id` the <image> token, such a row's tokens differed between the two)."""
    model = tiny_model("mpt")
    ids, pixel_values = inputs(batch=2, seq=3, images=3)
    ids[1] = MEDIA
    kw = dict(input_ids=ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False, eos_token_id=None)
    kw["num_beams"] = num_beams
    for static in ({}, {"cache_implementation": "static"}):
        with pytest.raises(ValueError, match=r"inferred from pad_token_id.*attention_mask row\(s\) \[1\]"):
            model.generate(**kw, **static, pad_token_id=MEDIA)
        text = {**kw, "input_ids": torch.tensor([[5, 6, 7], [PAD] * 3], device=DEVICE), "pixel_values": None}
        with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1\] hold padding only"):
            model.generate(**text, **static, pad_token_id=PAD)
        # no mask is inferred where the pad id is an end id (`GenerationMixin`'s rule): nothing to refuse
        assert model.generate(**{**text, "eos_token_id": PAD}, **static, pad_token_id=PAD).shape[0] == 2


@needs_v5
@pytest.mark.parametrize("family", ["mosaic_gpt", "llama"])
def test_fast_greedy_path_compiled_step(family, fast_path_on_cpu):
    """The decoding step as the GPU runs it: compiled with `fullgraph=True` (backend "eager" here, for speed)."""
    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", "eager")
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    for case in ({"max_new_tokens": 6, "min_new_tokens": 6}, {"max_new_tokens": 6, "eos_token_id": [*range(5, 300)]}):
        kw = generate_kwargs(ids, mask, pixel_values, **case)
        assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw)), case


@needs_v5
def test_fast_path_only_for_plain_greedy_and_beam_search_calls(fast_path_on_cpu):
    model = tiny_model("mosaic_gpt")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, cache_implementation="static")
    model.generate(**{**kw, "do_sample": True}, num_beams=2)
    model.generate(**kw, output_scores=True, return_dict_in_generate=True)
    model.generate(**kw, num_beams=2, output_scores=True, return_dict_in_generate=True)
    model.generate(**kw, repetition_penalty=1.3)
    model.generate(**kw, num_beams=2, no_repeat_ngram_size=2)
    model.generate(**kw, length_penalty=0.5)  # greedy: GenerationMixin warns that the flag is unused
    # compilation settings of the caller's: GenerationMixin's loop compiles with them (the fast path has its own)
    model.generate(**kw, compile_config=CompileConfig(backend="eager", fullgraph=False))
    with pytest.raises(ValueError, match="num_return_sequences"):  # GenerationMixin's own check
        model.generate(**kw, num_beams=2, num_return_sequences=3)
    assert model not in _STATIC_DECODERS
    model.generate(**kw, length_penalty=1.0, num_return_sequences=1)  # greedy with the defaults spelled out
    assert {type(d) for d in _STATIC_DECODERS[model].values()} == {_StaticGreedyDecoder}
    forget_decoders(model)
    model.generate(**kw, compile_config=CompileConfig())  # no settings of the caller's (as the benchmark passes it)
    assert {type(d) for d in _STATIC_DECODERS[model].values()} == {_StaticGreedyDecoder}
    forget_decoders(model)
    # ids and a generation config by position (before: the fast path took keywords only)
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = 4
    positional = model.generate(ids, config, attention_mask=mask, pixel_values=pixel_values, do_sample=False,
                                pad_token_id=PAD, cache_implementation="static")  # fmt: skip
    assert model not in _STATIC_DECODERS  # a `generation_config` given: GenerationMixin's loop
    assert torch.equal(model.generate(ids, **{k: v for k, v in kw.items() if k != "input_ids"}), positional)
    assert {type(d) for d in _STATIC_DECODERS[model].values()} == {_StaticGreedyDecoder}
    model.generate(**kw)
    model.generate(**kw, num_beams=2)
    assert {type(d) for d in _STATIC_DECODERS[model].values()} == {_StaticGreedyDecoder, _StaticBeamDecoder}


@needs_v5
@pytest.mark.parametrize(
    "settings",
    [{}, {"max_length": 40, "num_beams": 3}, {"repetition_penalty": 1.3}, {"do_sample": True, "top_k": 5}],
)
def test_generation_config_differences_are_to_diff_dicts(settings, fast_path_on_cpu):
    """The fast path reads the model's generation config's differences from `GenerationConfig()` without
    `to_diff_dict`'s deep copies: the same fields (its `transformers_version` aside, which it always adds), and a
    setting outside plain greedy / beam search in the model's config leaves the call to `GenerationMixin`."""
    model = tiny_model("mosaic_gpt")
    for name, value in settings.items():
        setattr(model.generation_config, name, value)
    config = model.generation_config
    config._commit_hash = "abc"  # (what `to_dict` leaves out)
    expected = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    differences = dict(fast_decoding._config_differences(config))
    assert {k: v for k, v in differences.items() if k != "transformers_version"} == expected
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=2)
    kw.pop("do_sample")  # the model's config says

    def seeded_generate(**extra):
        torch.manual_seed(0)  # (the sampling case)
        return model.generate(**kw, **extra)

    assert torch.equal(seeded_generate(cache_implementation="static"), seeded_generate())
    plain = not {"repetition_penalty", "do_sample"} & set(settings)
    assert (model in _STATIC_DECODERS) == plain


MANY_ENDS = [EOC, *range(5, 300, 2)]
BEAM_CASES = [
    {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 8},  # forced length, as the benchmark
    # hypotheses end at different steps; the early-stopping heuristic ends generation before max_new_tokens
    {"num_beams": 3, "max_new_tokens": 8, "eos_token_id": MANY_ENDS},
    {"num_beams": 3, "max_new_tokens": 8, "min_new_tokens": 3, "eos_token_id": MANY_ENDS, "length_penalty": 0.0},
    {"num_beams": 2, "max_new_tokens": 7, "eos_token_id": MANY_ENDS, "early_stopping": True, "length_penalty": -1.5},
    {
        "num_beams": 4,
        "max_new_tokens": 9,
        "eos_token_id": MANY_ENDS,
        "early_stopping": "never",
        "length_penalty": 2.0,
        "num_return_sequences": 3,
    },
    {"num_beams": 2, "max_new_tokens": 1},  # the prompt step alone
    # every beam returned; a pad id of 0 (`generate` then pads with the first end id); no end ids at all
    {"num_beams": 3, "max_new_tokens": 6, "eos_token_id": MANY_ENDS, "num_return_sequences": 3, "pad_token_id": 0},
    {"num_beams": 3, "max_new_tokens": 5, "eos_token_id": None},
]


@needs_v5
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_beam_search_equals_generate(family, fast_path_on_cpu):
    """Beam search with a static cache ([`_StaticBeamDecoder`]) gives `GenerationMixin`'s beam search's sequences:
    scores, length penalty, early stopping (False, True, "never"), several returned sequences, `min_new_tokens`."""
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    stopped_early = []
    for case in BEAM_CASES:
        fast = assert_fast_path_equals_generate(model, generate_kwargs(ids, mask, pixel_values) | case)
        assert fast.shape[0] == ids.shape[0] * case.get("num_return_sequences", 1)
        stopped_early.append(fast.shape[1] - ids.shape[1] < case["max_new_tokens"])
    assert any(stopped_early) and not all(stopped_early)  # some calls stopped early, some ran to max_new_tokens
    assert all(isinstance(d, _StaticBeamDecoder) for d in _STATIC_DECODERS[model].values())
    # encoded images (expanded to the beams after encoding, as `generate` expands them)
    with torch.no_grad():
        hidden = model.get_image_features(pixel_values)
    kw = {**generate_kwargs(ids, mask, None, **BEAM_CASES[1]), "image_hidden_states": hidden}
    assert_fast_path_equals_generate(model, kw)
    # one prompt, and a text-only batch
    kw = generate_kwargs(ids[1:2], mask[1:2], pixel_values[1:2], **BEAM_CASES[1])
    assert_fast_path_equals_generate(model, kw)
    text_only = {"input_ids": torch.randint(0, 400, (2, 7), device=DEVICE), "pad_token_id": PAD, **BEAM_CASES[0]}
    assert_fast_path_equals_generate(model, text_only)


@needs_v5
@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
def test_fast_beam_search_compiled_step(family, fast_path_on_cpu):
    """The beam search step as the GPU runs it: compiled with `fullgraph=True` (backend "eager" here, for speed),
    the KV cache rows gathered in the graph."""
    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", "eager")
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    for case in BEAM_CASES[:2]:
        kw = generate_kwargs(ids, mask, pixel_values, **case)
        assert_fast_path_equals_generate(model, kw)


@needs_v5
def test_decoders_made_over_time_do_not_reach_dynamos_recompile_limit(fast_path_on_cpu):
    """dynamo counts compiled versions per code object: had every decoder compiled the same `_decode_step`, a process
    would fail (`fullgraph=True`) at its 65th decoder (every batch size, cache length and model it meets; four kept
    per model). Each decoder's step has a code object of its own: here, with a limit of 1, four decoders."""
    from modeling_openflamingo.modeling_openflamingo import _RECOMPILE_LIMIT

    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", "eager")  # traced by dynamo, as on the GPU
    fast_path_on_cpu.setattr(_StaticDecoder, "recompile_limit", 1)
    model = tiny_model("gpt_neox")
    ids, mask, pixel_values = padded_prompt()
    made = []
    modules = (fast_decoding, modeling)

    def compiled_functions() -> list[str]:
        return [name for module in modules for name in vars(module) if name.startswith("__compiled_fn")]

    compiled_before = compiled_functions()
    with torch._dynamo.config.patch(**{_RECOMPILE_LIMIT: 1}):  # (not monkeypatch: its undo deletes the option)
        for batch in (1, 2, 1, 2):
            kw = generate_kwargs(ids[:batch], mask[:batch], pixel_values[:batch], max_new_tokens=3, min_new_tokens=3)
            assert_fast_path_equals_generate(model, kw)
            made += [d for d in _STATIC_DECODERS[model].values() if all(d is not m for m in made)]
            if batch == 2:
                _STATIC_DECODERS[model].clear()  # made again: more decoders than shapes
    assert len(made) == 4
    # the compiled functions dynamo adds to the step's globals are the copy's own: none added to the modules'
    assert compiled_functions() == compiled_before


@needs_v5
def test_decoders_do_not_keep_the_model_alive_and_copies_work(fast_path_on_cpu):
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, cache_implementation="static")
    out = model.generate(**kw)
    twin = copy.deepcopy(model)  # no decoder (nor CUDA graph) on the model itself
    assert torch.equal(twin.generate(**kw), out)
    refs = [weakref.ref(model), weakref.ref(twin)]
    assert all(r() in _STATIC_DECODERS for r in refs)
    del model, twin
    gc.collect()
    assert all(r() is None for r in refs)  # the decoders' compiled steps and caches went with them


@needs_v5
def test_threads_generating_with_one_model_take_its_decoders_in_turn(fast_path_on_cpu):
    """A model's decoders (static cache, inputs, graphs) are the model's: two threads' `generate` calls run them one at
    a time, each with its own tokens. Each call waits in its decoder for the other to come in (it would, without the
    model's lock, and write into the same cache) and gives up after a while."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kws = [
        generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6),
        generate_kwargs(ids.flip(0), mask.flip(0), pixel_values.flip(0), max_new_tokens=6, min_new_tokens=6),
    ]
    expected = [model.generate(**kw) for kw in kws]
    assert not torch.equal(expected[0], expected[1])
    inside, most_inside, entered, lock = [0], [0], threading.Event(), threading.Lock()
    real_generate = _StaticGreedyDecoder.generate

    def waiting_generate(self, *args, **kwargs):
        with lock:
            inside[0] += 1
            most_inside[0] = max(most_inside[0], inside[0])
        if entered.is_set():
            entered.clear()
        else:
            entered.set()
            entered.wait(0.5)  # (the other call, if it could come in)
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    fast_path_on_cpu.setattr(_StaticGreedyDecoder, "generate", waiting_generate)
    results: dict[int, torch.Tensor] = {}

    def run(index: int) -> None:
        results[index] = model.generate(**kws[index], cache_implementation="static")

    threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most_inside[0] == 1
    for index in (0, 1):
        assert torch.equal(results[index], expected[index])


@needs_v5
# the <image> row of the output layer scaled so that <image> is generated at some steps, and the tokens after it
# differ from those that the prompt's last image would give
@pytest.mark.parametrize(("num_beams", "scale"), [(1, -4.0), (3, -6.0)])
@pytest.mark.parametrize("conditioning", ["sequence", "original_kv_cache"])
def test_fast_path_counts_a_generated_image_token_as_generate_does(num_beams, scale, conditioning, fast_path_on_cpu):
    """A generated `<image>` conditions the tokens after it on the fast path as in `generate`: `"sequence"`, it
    starts the next image (here beyond the images given: the average of every latent), beams reordered with their
    image counts; `"original_kv_cache"`, every row is conditioned on that step's tokens, by row position."""
    model = tiny_model("llama")  # an output layer of its own: the <image> row can be scaled alone
    model.config.generated_image_conditioning = conditioning
    with torch.no_grad():
        model.get_output_embeddings().weight[MEDIA] *= scale
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=8, min_new_tokens=8, num_beams=num_beams)
    expected = model.generate(**kw)
    generated = expected[:, ids.shape[1] : -1] == MEDIA
    assert generated.any() and not generated.all()
    assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)


@needs_v5
@pytest.mark.parametrize(
    "family", ["tiny-neox-s11-n1-generates-image", "tiny-llama-s4-n1-beam-generates-image", *SWEEP]
)
def test_fast_path_gives_the_originals_ids(family, loaded, reference, fast_path_on_cpu):
    """The fixtures where the original's cached generation feeds back `<image>` (greedy, or a beam later dropped), and
    those of the sweep against the original: the fast path gives the original's ids, greedy and beam search."""
    from .test_generation import reference_inputs

    model, _ = loaded(family)
    spec, ref = reference(family)
    inputs = {k: v.to(DEVICE) for k, v in reference_inputs(ref).items()}
    model.to(DEVICE)
    for name in ("greedy", "beam3"):
        settings = {k: spec[name][k] for k in ("max_new_tokens", "min_new_tokens", "num_beams")}
        fast = model.generate(**inputs, **settings, cache_implementation="static")
        assert torch.equal(fast.cpu(), ref[name]), name
    assert len(_STATIC_DECODERS[model]) == 2
    model.cpu()


@needs_v5
@needs_flex_with_static_cache
@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_fast_path_leaves_flex_attention_to_generate(fast_path_on_cpu, family):
    """transformers makes flex attention's `BlockMask` after checking whether the 2-D mask has padding, a branch on
    its values that the compiled decoding step cannot trace (it failed to compile on an H100): such a call runs
    through `GenerationMixin`'s loop, as an attention implementation other than SDPA and eager does."""
    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", "eager")  # traced by dynamo, as on the GPU
    model = tiny_model(family, text_config=flex_text_config(family), attn_implementation="flex_attention")
    ids, mask, pixel_values = padded_prompt()
    out = model.generate(**generate_kwargs(ids, mask, pixel_values, max_new_tokens=3), cache_implementation="static")
    assert out.shape == (ids.shape[0], ids.shape[1] + 3) and not _STATIC_DECODERS.get(model)
    model.set_attn_implementation("sdpa")  # the same model through the fast path
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=3)
    assert_fast_path_equals_generate(model, kw)
    assert len(_STATIC_DECODERS[model]) == 1


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 2])
def test_calls_under_autocast_are_left_to_generate(num_beams, fast_path_on_cpu):
    """Under `torch.autocast` the fast path makes no decoder and leaves the call to `GenerationMixin`: a decoder's
    static cache (and on CUDA its graphs) holds one precision's dtypes and computation. Before, a decoder made under
    autocast failed a later call outside it (`index_copy_(): self and source expected to have the same dtype`), and
    the other way round; on transformers 5.18 a call under autocast failed at once."""
    from modeling_openflamingo.fast_decoding import generate_static

    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, num_beams=num_beams)
    expected = model.generate(**kw)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert generate_static(model, {**kw, "cache_implementation": "static"}) is None
    assert model not in _STATIC_DECODERS
    assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)  # a decoder of its own
    assert len(_STATIC_DECODERS[model]) == 1
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert generate_static(model, {**kw, "cache_implementation": "static"}) is None  # the decoder is not used
    assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)


@needs_v5
def test_fast_path_leaves_generation_settings_on_the_model_config_to_generate(fast_path_on_cpu):
    """Generation settings on `model.config` (the legacy place): `GenerationMixin` refuses them, where the fast path
    decoded without them (here without the repetition penalty)."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4)
    model.config.repetition_penalty = 5.0
    for static in ({}, {"cache_implementation": "static"}):
        with pytest.raises(ValueError, match="modified the pretrained model configuration to control generation"):
            model.generate(**kw, **static)
    assert model not in _STATIC_DECODERS


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 2])
def test_fast_path_reads_token_ids_and_lengths_as_generate_does(num_beams, fast_path_on_cpu):
    """End and pad ids as numpy integers (`generate` takes them; the fast path failed: "'numpy.int64' object is not
    iterable") decode on the fast path; ids or lengths of other kinds are `GenerationMixin`'s to judge (it refuses a
    string id and a fractional `min_new_tokens`, which the fast path took)."""
    np = pytest.importorskip("numpy")
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, num_beams=num_beams)
    ended = int(model.generate(**kw, eos_token_id=None)[1, ids.shape[1] + 1])  # a token that row 1 generates
    for ends in (np.int64(ended), [np.int64(EOC), np.int64(ended)]):
        assert_fast_path_equals_generate(model, {**kw, "eos_token_id": ends, "pad_token_id": np.int64(PAD)})
    assert model in _STATIC_DECODERS
    forget_decoders(model)
    for wrong in ({"eos_token_id": str(ended)}, {"min_new_tokens": 2.5}):
        with pytest.raises((TypeError, ValueError)) as eager:
            model.generate(**kw, **wrong)
        with pytest.raises(type(eager.value)):
            model.generate(**kw, **wrong, cache_implementation="static")
    assert model not in _STATIC_DECODERS


@needs_v5
@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("method", ["_get_logits_processor", "prepare_inputs_for_generation"])
def test_fast_path_leaves_a_subclasss_generation_methods_to_generate(method, num_beams, fast_path_on_cpu):
    """A subclass with its own version of a `GenerationMixin` method that `generate` runs (here a logits processor
    added in `_get_logits_processor`, or inputs changed in `prepare_inputs_for_generation`): the call goes through
    `GenerationMixin`, which runs it; the fast path skipped it (other tokens). A subclass's own `generate` (calling
    on through `super()`) keeps the fast path."""
    from transformers import LogitsProcessor

    from modeling_openflamingo import OpenFlamingoForConditionalGeneration

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(-1, torch.arange(0, 400, 2, device=scores.device), float("-inf"))

    def get_logits_processor(self, *args, **kwargs):
        processors = OpenFlamingoForConditionalGeneration._get_logits_processor(self, *args, **kwargs)
        processors.append(Ban())
        return processors

    def prepare_inputs_for_generation(self, *args, **kwargs):
        model_inputs = OpenFlamingoForConditionalGeneration.prepare_inputs_for_generation(self, *args, **kwargs)
        model_inputs["input_ids"] = model_inputs["input_ids"] // 2 * 2  # (even ids)
        return model_inputs

    own = {
        "_get_logits_processor": get_logits_processor,
        "prepare_inputs_for_generation": prepare_inputs_for_generation,
    }
    subclass = type("Subclass", (OpenFlamingoForConditionalGeneration,), {method: own[method]})
    source = tiny_model("llama")
    model = subclass(source.config).to(DEVICE).eval()
    model.load_state_dict(source.state_dict())
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, num_beams=num_beams)
    expected = model.generate(**kw)
    assert not torch.equal(expected, source.generate(**kw))  # the subclass's method changes the tokens
    assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)
    assert model not in _STATIC_DECODERS
    # the same method put on an instance of the class itself
    model = tiny_model("llama")
    setattr(model, method, types.MethodType(own[method], model))
    assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)
    assert model not in _STATIC_DECODERS
    wrapper = type(
        "Wrapper",
        (OpenFlamingoForConditionalGeneration,),
        {"generate": lambda self, **k: super(wrapper, self).generate(**k)},
    )
    model = wrapper(source.config).to(DEVICE).eval()
    model.load_state_dict(source.state_dict())
    assert_fast_path_equals_generate(model, kw)
    assert model in _STATIC_DECODERS


@needs_v5
def test_fast_path_leaves_a_wrappers_prepare_inputs_to_generate(fast_path_on_cpu):
    """A wrapper that puts its own `prepare_inputs_for_generation` on the model for the call (PEFT's prompt learning,
    to add a prefix or virtual tokens) is run by `GenerationMixin`'s loop: the fast path, whose decoders never call
    it, leaves such a call alone (it dropped what the wrapper adds)."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, min_new_tokens=4)
    own, calls = model.prepare_inputs_for_generation, []

    def wrapped(*args, **kwargs):
        calls.append(len(calls))
        return own(*args, **kwargs)

    model.prepare_inputs_for_generation = wrapped
    out = model.generate(**kw, cache_implementation="static")
    assert len(calls) == 4 and not _STATIC_DECODERS.get(model)
    del model.prepare_inputs_for_generation
    assert torch.equal(out, model.generate(**kw))

    # PEFT: prompt learning puts its own there for the call and the model's own back afterwards (then the fast path
    # runs); LoRA never replaces it (the fast path runs)
    peft = pytest.importorskip("peft")
    prefixed = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prefixed.generate(**kw)
    assert_fast_path_equals_generate(model, kw)
    assert len(_STATIC_DECODERS[model]) == 1
    model = tiny_model("llama")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert_fast_path_equals_generate(adapted, kw)
    assert len(_STATIC_DECODERS[model]) == 1


@needs_v5
def test_fast_path_with_int8_cross_attention_weights(fast_path_on_cpu):
    """Gated blocks quantized as bitsandbytes' 8-bit layers (an int8 `to_kv.weight`): the decoder's cross-attention
    keys/values take the images' dtype, not the weight's (SDPA refused int8 keys; helper-67), and the fast path gives
    plain `generate`'s tokens."""
    from .test_core import quantized_int8

    model = quantized_int8(cpu_tiny_model("llama"))[0].to(DEVICE)
    ids, mask, pixel_values = padded_prompt()
    for num_beams in (1, 3):
        kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=num_beams)
        assert_fast_path_equals_generate(model, kw)
    assert len(_STATIC_DECODERS[model]) == 2  # the fast path ran (greedy, beams)


@needs_v5
def test_decoders_are_remade_when_the_weights_move(fast_path_on_cpu):
    """`model.to(dtype)` or tensors loaded with `assign=True` put the weights elsewhere: a decoder's CUDA graphs and
    buffers would read the old memory (on the CPU the old dtype made `index_copy_` fail), so the decoders go."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6)
    model.generate(**kw, cache_implementation="static")
    (first,) = _STATIC_DECODERS[model].values()
    model.generate(**kw, cache_implementation="static")
    assert list(_STATIC_DECODERS[model].values()) == [first]  # nothing changed: reused
    model.to(torch.float64)
    kw["pixel_values"] = pixel_values.double()
    assert_fast_path_equals_generate(model, kw)
    (second,) = _STATIC_DECODERS[model].values()
    assert second is not first
    state = {k: v * 0.5 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    replaced = weakref.ref(model.get_output_embeddings().weight)
    model.load_state_dict(state, assign=True)
    gc.collect()
    assert replaced() is None  # nothing of the fast path keeps replaced weights alive
    assert_fast_path_equals_generate(model, kw)
    (third,) = _STATIC_DECODERS[model].values()
    assert third is not second


@needs_v5
def test_decoders_are_remade_when_the_config_changes(fast_path_on_cpu, tmp_path):
    """A decoder's compiled steps hold config settings as constants (`only_attend_immediate_media`, ...): after
    `model.config` changes, the fast path follows the new setting, as `generate` does (its CUDA graphs replayed the
    old one: the decoders were reused)."""
    model = tiny_model("llama")
    ids, pixel_values = inputs(batch=2, seq=12, images=2)
    kw = generate_kwargs(ids, torch.ones_like(ids), pixel_values, max_new_tokens=8, min_new_tokens=8)
    outputs, made = {}, []
    for value in (True, False, True):
        model.config.only_attend_immediate_media = value
        outputs[value] = assert_fast_path_equals_generate(model, kw)
        (decoder,) = _STATIC_DECODERS[model].values()
        assert all(decoder is not other for other in made)
        made.append(decoder)
    assert not torch.equal(outputs[True], outputs[False])  # the setting matters for this prompt
    model.config.text_config._attn_implementation = "eager"  # the LM's attention, read as the step is traced
    assert_fast_path_equals_generate(model, kw)
    assert all(_STATIC_DECODERS[model][key] is not other for key in _STATIC_DECODERS[model] for other in made)
    # what `save_pretrained` writes into the config (architectures, auto_map, dtype) changes no step: kept
    (decoder,) = _STATIC_DECODERS[model].values()
    model.save_pretrained(tmp_path)
    assert_fast_path_equals_generate(model, kw)
    assert list(_STATIC_DECODERS[model].values()) == [decoder]


@needs_v5
def test_decoders_are_remade_when_adapters_change(fast_path_on_cpu):
    """A CUDA graph replays the computation it captured: LoRA layers added, disabled, rescaled or merged after a call
    (and train/eval) change the computation, so the decoders go (on a GPU a stale graph would keep the adapters on)."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6)
    plain = assert_fast_path_equals_generate(model, kw)
    seen = set(_STATIC_DECODERS[model].values())
    lora = peft.LoraConfig(r=4, target_modules=r"language_model\..*\.(q_proj|v_proj)", init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora)

    def check(expected_equal_to_plain: bool) -> None:
        fast = assert_fast_path_equals_generate(peft_model, kw)
        assert torch.equal(fast, plain) == expected_equal_to_plain
        (decoder,) = _STATIC_DECODERS[model].values()
        assert decoder not in seen
        seen.add(decoder)

    check(False)  # adapters added
    with peft_model.disable_adapter():
        check(True)
    check(False)  # enabled again
    with peft.helpers.rescale_adapter_scale(peft_model, 0.0):  # a number the graphs hold: the LoRA branch adds 0
        check(True)
    check(False)
    peft_model.merge_adapter()  # in place: same addresses, but the LoRA branch no longer runs
    check(False)
    model.train()  # the tiny models have no dropout: the same tokens, in a new mode
    check(False)
    peft_model.unload()  # the LoRA layers replaced by the layers they wrapped (which keep the merged weights)
    gc.collect()
    check(False)


@needs_v5
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_path_in_train_mode_with_gradient_checkpointing(family, num_beams, fast_path_on_cpu):
    """A model left in train mode with checkpointing on (as `Trainer` leaves it): the fast path runs (a decoder made
    for the train-mode model), gives eval mode's tokens, and leaves the model training with checkpointing on."""
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6, num_beams=num_beams)
    expected = model.generate(**kw)
    enable_checkpointing(model)
    model.train()  # the tiny models have no dropout: train mode decodes as eval mode does
    fast = assert_fast_path_equals_generate(model, kw)
    assert torch.equal(fast, expected)
    assert _STATIC_DECODERS[model]  # the fast path ran
    assert model.training and is_checkpointing(model)
    assert all(m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing"))


@needs_v5
def test_decoders_are_remade_when_hooks_change(fast_path_on_cpu):
    """A forward hook added or removed after a call changes the computation, which a CUDA graph would replay without
    it: the decoders go (on the CPU the step runs eagerly and would see the hook; the decoders are checked here)."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6)
    plain = assert_fast_path_equals_generate(model, kw)
    (first,) = _STATIC_DECODERS[model].values()
    shift = torch.randn(model.config.text_config.vocab_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, output: output + 10 * shift)
    hooked = assert_fast_path_equals_generate(model, kw)
    assert not torch.equal(hooked, plain)
    (second,) = _STATIC_DECODERS[model].values()
    assert second is not first
    handle.remove()
    assert torch.equal(assert_fast_path_equals_generate(model, kw), plain)
    (third,) = _STATIC_DECODERS[model].values()
    assert third is not second
    with torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None):
        model.generate(**kw, cache_implementation="static")
    assert third not in _STATIC_DECODERS[model].values()  # a global hook counts too


@needs_v5
def test_fast_path_with_input_require_grads_hooks(fast_path_on_cpu):
    """transformers' `enable_input_require_grads` (gradient checkpointing, PEFT) hooks `requires_grad_(True)` onto the
    input embeddings, which `torch.compile` cannot trace (the decoding step failed to compile on a GPU, torch 2.11).
    Under `no_grad` they change nothing: the fast path leaves them out while its step compiles (on the CPU, where
    every call goes through dynamo, at every call), puts them back in their order, and does not remake decoders when
    they are added or removed."""
    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", "eager")  # traced, as on the GPU
    model = tiny_model("gpt_neox")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, min_new_tokens=4)
    plain = model.generate(**kw)
    embeddings = model.get_input_embeddings()
    embeddings.register_forward_hook(lambda module, args, output: None)  # another hook, before the gradients' one
    enable_checkpointing(model, use_reentrant=True)
    embeddings.register_forward_hook(lambda module, args, output: None)  # and one after it
    hooks = {name: list(m._forward_hooks.items()) for name, m in model.named_modules() if m._forward_hooks}
    assert any(h.__name__ == "make_inputs_require_grads" for hs in hooks.values() for _, h in hs)
    assert torch.equal(assert_fast_path_equals_generate(model, kw), plain)
    assert {name: list(m._forward_hooks.items()) for name, m in model.named_modules() if m._forward_hooks} == hooks
    (decoder,) = _STATIC_DECODERS[model].values()
    model.disable_input_require_grads()
    assert torch.equal(model.generate(**kw, cache_implementation="static"), plain)
    with torch.enable_grad():  # hooks put back work: a training forward's embeddings require gradients
        model.enable_input_require_grads()
        assert model.get_input_embeddings()(ids).requires_grad
        assert torch.equal(model.generate(**kw, cache_implementation="static"), plain)
        assert model.get_input_embeddings()(ids).requires_grad
    assert list(_STATIC_DECODERS[model].values()) == [decoder]


@needs_v5
def test_decoders_stay_after_a_peft_wrapped_qk_layernorm_projection(fast_path_on_cpu):
    """MosaicGPT's QK-LayerNorm hook follows `Wqkv` when PEFT wraps it (moved at the first forward): the decoder made
    at that call is reused afterwards, not made again at the next call."""
    peft = pytest.importorskip("peft")
    model = tiny_model("mosaic_gpt")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6)
    plain = assert_fast_path_equals_generate(model, kw)
    lora = peft.LoraConfig(r=4, target_modules=r"language_model\..*\.Wqkv", init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora)
    fast = peft_model.generate(**kw, cache_implementation="static")  # the fast path's forward moves the hook
    (decoder,) = _STATIC_DECODERS[model].values()
    assert torch.equal(peft_model.generate(**kw, cache_implementation="static"), fast)
    assert list(_STATIC_DECODERS[model].values()) == [decoder]
    assert torch.equal(peft_model.generate(**kw), fast) and not torch.equal(fast, plain)


def test_image_cache_output_is_unchanged_by_the_fast_path_module():
    """The public image cache still carries per-block keys/values and the last image index."""
    model = tiny_model("gpt_neox")
    ids, pixel_values = inputs()
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    assert isinstance(out.image_cache, OpenFlamingoImageCache)
    assert len(out.image_cache.key_values) == len(model.gated_cross_attn_layers)


@needs_v5
def test_fast_path_prompt_steps_per_prompt_shape(fast_path_on_cpu):
    """One decoder serves prompts of several lengths (a prompt step each) and any image input form; every call
    gives plain `generate`'s tokens."""
    model = tiny_model("mosaic_gpt")
    ids, mask, pixel_values = padded_prompt(seq=12)
    with torch.no_grad():
        hidden = model.get_image_features(pixel_values)
    calls = [
        generate_kwargs(ids, mask, pixel_values, max_new_tokens=5),
        generate_kwargs(ids[:, 2:], mask[:, 2:], pixel_values, max_new_tokens=5),  # shorter prompt, same decoder
        generate_kwargs(ids, mask, pixel_values.unsqueeze(2), max_new_tokens=5),  # the original 6-D layout
        {**generate_kwargs(ids, mask, None, max_new_tokens=5), "image_hidden_states": hidden},
    ]
    for kw in calls:
        assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))
    (decoder,) = _STATIC_DECODERS[model].values()
    assert len(decoder.prompt_steps) == 3  # prompt lengths 12 and 10 with pixel values, 12 with latents
    if DEVICE.type == "cuda":
        assert all(prompt.graph is not None for prompt in decoder.prompt_steps.values())
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model.generate(**generate_kwargs(ids, mask, pixel_values[..., :8], max_new_tokens=5))


@needs_v5
@pytest.mark.skipif(
    DEVICE.type == "cuda",
    reason="the CPU's stand-in for a capture: on CUDA the prompt step is captured (its graph: "
    "test_fast_path_prompt_steps_per_prompt_shape), and the decoding step's compile cannot trace the refusing tensors",
)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_step_reads_no_cache_value_on_the_host(family, fast_path_on_cpu):
    """The prompt step, which CUDA captures into a graph, reads nothing of the static cache's on the host (the cache's
    length is a device tensor there; a capture does not allow reading one: when the forward compared it with 0, every
    prompt step on CUDA failed its capture and ran uncompiled, without a graph). Simulated on the CPU: while the step
    runs, `is_capturing_cuda_graph()` (and transformers' `is_cuda_stream_capturing()`) is true and the cache's length,
    and what is computed from it, refuses host reads; `generate`'s tokens."""
    from modeling_openflamingo.fast_decoding import _PromptStep

    capturing = []

    class Refusing(torch.Tensor):
        def _refuse(self) -> torch.Tensor:
            if capturing:
                raise AssertionError("a device value was read on the host while the prompt step would be captured")
            return self.as_subclass(torch.Tensor)

        def __bool__(self):
            return bool(self._refuse())

        def __int__(self):
            return int(self._refuse())

        def __index__(self):
            return self._refuse().__index__()

        def item(self):
            return self._refuse().item()

    step, layer = _PromptStep._step, transformers.cache_utils.StaticLayer
    get_seq_length = layer.get_seq_length

    def captured_step(self):
        capturing.append(True)
        try:
            step(self)
        finally:
            capturing.pop()

    def refusing_length(self, *args, **kwargs):
        length = get_seq_length(self, *args, **kwargs)
        return length.as_subclass(Refusing) if torch.is_tensor(length) else length

    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    with torch.no_grad():
        hidden = model.get_image_features(pixel_values)
    calls = [  # greedy and beam search, with pixel values and with the Perceiver's latents
        generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, min_new_tokens=4),
        generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, min_new_tokens=4, num_beams=2),
        {**generate_kwargs(ids, mask, None, max_new_tokens=4, min_new_tokens=4), "image_hidden_states": hidden},
    ]
    expected = [model.generate(**kw) for kw in calls]
    fast_path_on_cpu.setattr(modeling, "is_capturing_cuda_graph", lambda: bool(capturing))
    # (transformers' own check, through which its mask functions leave such values alone while a stream captures)
    fast_path_on_cpu.setattr(transformers.utils.import_utils, "is_cuda_stream_capturing", lambda: bool(capturing))
    fast_path_on_cpu.setattr(_PromptStep, "_step", captured_step)
    fast_path_on_cpu.setattr(layer, "get_seq_length", refusing_length)
    for kw, tokens in zip(calls, expected, strict=True):
        assert torch.equal(model.generate(**kw, cache_implementation="static"), tokens)
    assert len(_STATIC_DECODERS[model]) == 2  # (greedy and beam search: the fast path took both)


def prompt_step_after_failed_captures():
    """The prompt step of the tiny LLaMA model's fast-path `generate` (which gives `GenerationMixin`'s tokens), made
    where captures fail: they leave neither the capture stream current nor the device's generator "capturing"."""
    model = tiny_model("llama")
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(4, device=DEVICE)  # (raises "Offset increment outside graph capture" if it were)
    (decoder,) = _STATIC_DECODERS[model].values()
    (prompt,) = decoder.prompt_steps.values()
    return prompt


@needs_v5
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs: run with OPENFLAMINGO_TEST_DEVICE=cuda on a GPU")
def test_prompt_step_capture_failure_falls_back_cleanly(monkeypatch):
    """A prompt step that cannot be captured (here: a host sync inside) runs eagerly: same tokens, and the device's
    random number generator still works afterwards."""
    from modeling_openflamingo.fast_decoding import _PromptStep

    step = _PromptStep._step

    def syncing_step(self):
        step(self)
        bool(self.decoder.unfinished.any())  # a host sync: not allowed while capturing

    monkeypatch.setattr(_PromptStep, "_step", syncing_step)
    prompt = prompt_step_after_failed_captures()
    assert prompt.graph is None and prompt.eager


def compiled_versions(function) -> int:
    """How many compiled versions dynamo keeps for `function`'s code object."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__))


def prompt_block_versions(model) -> dict[type, int]:
    """Compiled versions of `model`'s prompt-step functions, by block kind ([`fast_decoding._blocks_compiled`])."""
    calls = fast_decoding._PROMPT_BLOCK_CALLS.get(model, "never compiled")
    failed = "their compilation failed"
    assert isinstance(calls, fast_decoding._PromptBlockCalls), f"the prompt step's blocks: {calls or failed}"
    return {kind: compiled_versions(function._torchdynamo_orig_callable) for kind, function in calls.by_kind.items()}


@needs_v5
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_step_runs_the_blocks_compiled_and_puts_them_back(family, fast_path_on_cpu):
    """The prompt step runs the model's repeated blocks compiled (on CUDA while its CUDA graph is captured; on the CPU,
    with a backend named, at every run): `generate`'s tokens, the blocks as before afterwards (the decoding step's
    compiled graph, which dynamo guards on them, is not recompiled), a block the caller compiled keeps its own, and
    the blocks' own functions get no compiled version (dynamo's recompile limit and dynamic-shape decisions for them,
    which the caller's `compile_repeated_blocks()` uses, stay untouched). On CUDA too (`OPENFLAMINGO_TEST_DEVICE`):
    there the backend runs while a new prompt length's step is captured, and the decoding step is inductor's."""
    runs = []

    def counting_backend(graph_module, example_inputs):
        def run(*args):
            runs.append(1)
            return graph_module.forward(*args)

        return run

    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", staticmethod(counting_backend))
    fast_path_on_cpu.setattr(_StaticDecoder, "prompt_compile_backend", staticmethod(counting_backend))
    model = tiny_model(family)
    blocks = model.repeated_blocks()
    blocks[0].compile(backend="eager")  # the caller's own compilation
    callers = blocks[0]._compiled_call_impl
    ids, mask, pixel_values = padded_prompt()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=4, min_new_tokens=4)
    expected = model.generate(**kw)  # (compiles the caller's block)
    forwards = {type(block).forward for block in blocks}
    versions = {forward: compiled_versions(forward) for forward in forwards}
    assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)
    # a one-token call on the same decoder at a new prompt length runs a new prompt step only: its blocks' compiled
    # graphs (on CUDA, as its graph is captured)
    runs.clear()
    one = generate_kwargs(ids[:, 1:], mask[:, 1:], pixel_values, max_new_tokens=1, min_new_tokens=1)
    assert torch.equal(model.generate(**one, cache_implementation="static"), model.generate(**one))
    assert len(runs) >= len(blocks) - 1  # every block but the caller's compiled one
    assert blocks[0]._compiled_call_impl is callers
    assert all("_compiled_call_impl" not in vars(block) for block in blocks[1:])
    with torch._dynamo.config.patch(error_on_recompile=True):  # the decoding step's graph still fits
        assert torch.equal(model.generate(**kw, cache_implementation="static"), expected)
    assert {forward: compiled_versions(forward) for forward in forwards} == versions
    # turned off: prompt steps made after it run the blocks as they are
    fast_path_on_cpu.setattr(fast_decoding, "COMPILE_PROMPT_BLOCKS", False)
    forget_decoders(model)
    runs.clear()
    assert torch.equal(model.generate(**one, cache_implementation="static"), model.generate(**one))
    # on the CPU, the new decoder's step, compiled by the backend and run once as it is made; on CUDA, nothing
    assert len(runs) == (DEVICE.type == "cpu")


def has_symbolic_shapes(graph_module: torch.fx.GraphModule) -> bool:
    """Whether any input of a graph that dynamo compiled has a dynamic size (or is a dynamic integer)."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    inputs = graph_module.graph.find_nodes(op="placeholder")
    return any(free_symbols(node.meta["example_value"]) for node in inputs if "example_value" in node.meta)


@needs_v5
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_step_compiles_each_block_kind_for_its_own_shapes(family, fast_path_on_cpu):
    """Each block kind of each model compiles for its own shapes: dynamo decides which input dimensions to compile
    dynamic per function name for the whole process, so one function for all kinds (or models) had the widths and
    lengths that differ between them compiled dynamic from the first prompt. Here every graph of a model's first
    prompt is static, though another model of the family ran another prompt shape first; a new prompt length
    compiles the kinds that see it (the language model's layers, the gated blocks) again, with a dynamic length, and
    the vision tower's and Perceiver's graphs stay as they were."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(has_symbolic_shapes(graph_module))
        return graph_module.forward

    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", staticmethod(recording_backend))
    fast_path_on_cpu.setattr(_StaticDecoder, "prompt_compile_backend", staticmethod(recording_backend))  # (CUDA)
    other_ids, other_pixels = inputs(batch=2, seq=9)
    other = tiny_model(family, seed=1)
    kw = generate_kwargs(other_ids, torch.ones_like(other_ids), other_pixels, max_new_tokens=2, min_new_tokens=2)
    assert torch.equal(other.generate(**kw, cache_implementation="static"), other.generate(**kw))
    model = tiny_model(family)
    ids, mask, pixel_values = padded_prompt()
    graphs.clear()
    kw = generate_kwargs(ids, mask, pixel_values, max_new_tokens=2, min_new_tokens=2)
    assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))
    first = prompt_block_versions(model)
    kinds = {type(block) for block in model.repeated_blocks()}  # (the gated decoder layers: a kind of their own)
    assert first.keys() == kinds and graphs and not any(graphs), (first, graphs)  # all static
    graphs.clear()
    kw = generate_kwargs(ids[:, 2:], mask[:, 2:], pixel_values, max_new_tokens=2, min_new_tokens=2)
    assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))
    again = prompt_block_versions(model)
    vision_kinds = {type(model.repeated_blocks()[0]), type(model.perceiver.layers[0])}
    assert {kind: again[kind] for kind in vision_kinds} == {kind: first[kind] for kind in vision_kinds}
    assert all(again[kind] > first[kind] for kind in again.keys() - vision_kinds), (first, again)
    assert any(graphs), graphs  # the new length compiled dynamic


@needs_v5
def test_prompt_step_blocks_compiled_by_inductor_give_generates_tokens_over_prompt_lengths(fast_path_on_cpu):
    """The prompt step's blocks compiled by inductor, as on the GPU (here its CPU code), over three prompt lengths:
    each `generate`'s tokens; the second length compiles them again with a dynamic length, the third reuses that.
    Other tests' prompt shapes in the same process do not matter: each model's block kinds have compiled functions
    of their own names, for which dynamo keeps its automatic-dynamic decisions (per function file, line and name)."""
    fast_path_on_cpu.setattr(_StaticDecoder, "cpu_compile_backend", "inductor")
    model = tiny_model("mosaic_gpt")
    ids, mask, pixel_values = padded_prompt(seq=12)
    versions = []
    for start in (0, 2, 1):
        kw = generate_kwargs(ids[:, start:], mask[:, start:], pixel_values, max_new_tokens=5, min_new_tokens=5)
        assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw)), start
        versions.append(sum(prompt_block_versions(model).values()))
    assert 0 < versions[0] < versions[1] == versions[2], versions


@needs_v5
@needs_cuda
def test_prompt_step_whose_blocks_do_not_compile_is_captured_with_them_as_they_are(monkeypatch):
    """A prompt step whose blocks fail to compile is captured with them as they are: a CUDA graph, `generate`'s
    tokens; the model's later prompt steps do not try again."""
    attempts = []

    def failing_backend(graph_module, example_inputs):
        attempts.append(1)
        raise RuntimeError("a backend that fails")

    monkeypatch.setattr(_StaticDecoder, "prompt_compile_backend", staticmethod(failing_backend))
    model = tiny_model("mosaic_gpt")
    ids, mask, pixel_values = padded_prompt()
    for start in (0, 2):
        kw = generate_kwargs(ids[:, start:], mask[:, start:], pixel_values, max_new_tokens=6, min_new_tokens=6)
        assert torch.equal(model.generate(**kw, cache_implementation="static"), model.generate(**kw))
    assert len(attempts) == 1
    (decoder,) = _STATIC_DECODERS[model].values()
    assert len(decoder.prompt_steps) == 2
    for prompt in decoder.prompt_steps.values():
        assert prompt.graph is not None and prompt.compile_backend is None and not prompt.eager


@needs_v5
@needs_cuda
def test_prompt_step_whose_compiled_blocks_fail_inside_the_capture_is_captured_with_them_as_they_are(monkeypatch):
    """Compiled blocks that run, but not inside a CUDA graph's capture (here: a host sync there), fail that capture:
    the prompt step is captured again with the blocks as they are (in a new memory pool: torch leaves the failed
    capture's marked as being recorded to; the caller's stream current again, the generator not left capturing), and
    gives `generate`'s tokens."""

    def syncing_backend(graph_module, example_inputs):
        def run(*args):
            if torch.cuda.is_current_stream_capturing():
                torch.zeros((), device=DEVICE).item()  # a host sync: not allowed while capturing
            return graph_module.forward(*args)

        return run

    monkeypatch.setattr(_StaticDecoder, "prompt_compile_backend", staticmethod(syncing_backend))
    prompt = prompt_step_after_failed_captures()
    assert prompt.graph is not None and prompt.compile_backend is None and not prompt.eager
