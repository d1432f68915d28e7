"""Generation, streaming, scoring, pipeline and examples (issue 4), on the four tiny reference families."""

from __future__ import annotations

import copy
import os
import re
import runpy
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from modeling_openflamingo import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration
from modeling_openflamingo.modeling_openflamingo import image_indices_from_input_ids

from .conftest import (
    FAMILIES,
    ROOT,
    SWEEP,
    byte_level_processor,
    enable_checkpointing,
    is_checkpointing,
    lm_cache_of,
    needs_flex_with_static_cache,
)
from .test_core import FLEX_FAMILIES

CAPTION_PROMPT = (
    "<image>Output:A photo of two cats.<|endofchunk|><image>Output:A bathroom sink.<|endofchunk|><image>Output:"
)


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` makes them from a left-padded mask (padding positions do not matter)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reference_inputs(ref) -> dict:
    return {
        "input_ids": ref["input_ids_left"],
        "attention_mask": ref["attention_mask_left"],
        "pixel_values": ref["vision_x"],
    }


class ForceTokenAt(LogitsProcessor):
    """Forces `token_id` as the `step`-th new token (0-based) of every row."""

    def __init__(self, token_id: int, step: int, prompt_len: int) -> None:
        self.token_id, self.step, self.prompt_len = token_id, step, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[-1] == self.prompt_len + self.step:
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.token_id] = 0.0
            return forced
        return scores


class CallCounter:
    """Counts forward calls of modules (forward pre-hooks) and remembers their first argument's shape."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self.shapes: dict[str, list] = {name: [] for name in modules}
        self.handles = [
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, module in modules.items()
        ]

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.calls[name] += 1
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            if tensors:
                self.shapes[name].append(tuple(tensors[0].shape))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_row_batch(tiny_images):
    """Rows with 3, 1, 0 and 2 images (zero-padded pixel values, left padding; one text-only row)."""
    rows = [
        (CAPTION_PROMPT, tiny_images[:3]),
        ("<image>Question: What is it? Short answer:", [tiny_images[3]]),
        ("A text-only row about cats and", []),
        ("<image>Output:A dog.<|endofchunk|><image>Output:", tiny_images[4:6]),
    ]
    return rows


# --------------------------------------------------------------------------------------------------------------------
# exactness against the original
# --------------------------------------------------------------------------------------------------------------------


# Made like the four (open_flamingo 2.0.1, transformers 4.33.3, open-clip-torch 2.20.0), with outputs where a
# generated <image> is fed back:
# - MPT, seed 6, N=2, images of modes RGBA, P with alpha, LA, L: its greedy output generates <image>, after which the
#   original (MPT: no KV cache, one forward over the whole sequence per step) attends to every latent equally;
# - GPT-NeoX, seed 11, N=1: row 1's greedy output starts with <image>; the original's generation with a KV cache then
#   conditions every row on that step's tokens alone (row 1 on its first image, row 0 on none);
# - LLaMA, seed 4, N=1: in beam search a beam that is later dropped is fed <image> at steps 2 and 4, which conditions
#   every beam of both rows anew in the original; no <image> is in the output.
GENERATES_IMAGE = {
    "tiny-mpt-s6-n2-generates-image": "sequence",
    "tiny-neox-s11-n1-generates-image": "original_kv_cache",
    "tiny-llama-s4-n1-beam-generates-image": "original_kv_cache",
}


@pytest.mark.parametrize("family", [*FAMILIES, *GENERATES_IMAGE, *SWEEP])
def test_greedy_and_beam_search_match_reference(family, loaded, reference):
    """Token ids of the original's `generate` (greedy, and beam search with 3 beams), exactly.

    The fixture settings are passed as the original was called: min_new_tokens = max_new_tokens, eos and pad from the
    converted generation config (<|endofchunk|> and <PAD>), everything else at transformers' defaults (length_penalty
    1.0, early_stopping False, do_sample False).
    """
    model, _ = loaded(family)
    spec, ref = reference(family)
    assert model.generation_config.eos_token_id == spec["eoc_token_id"]
    assert model.generation_config.pad_token_id == spec["pad_token_id"]
    for name in ("greedy", "beam3"):
        settings = spec[name]
        out = model.generate(
            **reference_inputs(ref),
            max_new_tokens=settings["max_new_tokens"],
            min_new_tokens=settings["min_new_tokens"],
            num_beams=settings["num_beams"],
        )
        assert torch.equal(out, ref[name]), (name, out[:, -settings["max_new_tokens"] :], ref[name][:, -8:])
    if family in GENERATES_IMAGE and "beam" not in family:
        prompt_len = ref["input_ids_left"].shape[1]
        assert (ref["greedy"][:, prompt_len:-1] == spec["media_token_id"]).any()


@pytest.mark.parametrize("family", [name for name, kind in GENERATES_IMAGE.items() if kind == "original_kv_cache"])
def test_generated_image_conditioning_follows_the_original(family, loaded, reference):
    """The conversion sets `generated_image_conditioning` from the LM config's `use_cache` (how the original
    generated): these fixtures need the original's cached conditioning; as one forward over the sequence counts
    images (`"sequence"`, `use_cache=False` in the original) their ids differ, and `use_cache=False` gives those."""
    model, _ = loaded(family)
    spec, ref = reference(family)
    assert model.config.generated_image_conditioning == GENERATES_IMAGE[family]
    name = "beam3" if "beam" in family else "greedy"
    settings = {k: spec[name][k] for k in ("max_new_tokens", "min_new_tokens", "num_beams")}
    inputs = reference_inputs(ref)
    assert torch.equal(model.generate(**inputs, **settings), ref[name])
    uncached = model.generate(**inputs, **settings, use_cache=False)
    model.config.generated_image_conditioning = "sequence"
    try:
        as_sequence = model.generate(**inputs, **settings)
    finally:
        model.config.generated_image_conditioning = GENERATES_IMAGE[family]
    assert not torch.equal(as_sequence, ref[name])
    assert torch.equal(uncached, as_sequence)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_argmax_of_full_forwards(family, loaded, reference):
    model, _ = loaded(family)
    spec, ref = reference(family)
    inputs = reference_inputs(ref)
    steps = 6
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps)
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        for t in range(steps):
            ids = out[:, : prompt_len + t]
            mask = torch.cat((inputs["attention_mask"], torch.ones(ids.shape[0], t, dtype=torch.long)), dim=1)
            logits = model(
                input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], position_ids=positions(mask)
            ).logits[:, -1]
            logits[:, spec["eoc_token_id"]] = -float("inf")  # min_new_tokens
            assert torch.equal(logits.argmax(-1), out[:, prompt_len + t]), t
    uncached = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, use_cache=False)
    assert torch.equal(uncached, out)


# --------------------------------------------------------------------------------------------------------------------
# images encoded once, image state through beams and samples
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"num_beams": 1},
        {"num_beams": 3},
        {"num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "num_return_sequences": 3},
    ],
    ids=["greedy", "beam3", "beam3-return2", "sample-return3"],
)
@pytest.mark.parametrize("placed", [False, True], ids=["", "image_indices"])
def test_images_and_cross_attention_keys_values_are_computed_once_per_generate(settings, placed, loaded, reference):
    """Also with `image_indices` given (as a collator's batches carry them, e.g. to `Seq2SeqTrainer`'s generate)."""
    model, _ = loaded("tiny-neox")  # cross-attention every 2 layers: 2 blocks
    _, ref = reference("tiny-neox")
    inputs = reference_inputs(ref)
    if placed:
        inputs["image_indices"] = model._image_indices(inputs["input_ids"], inputs["pixel_values"].shape[1])
    torch.manual_seed(0)
    expected = model.generate(**reference_inputs(ref), max_new_tokens=5, min_new_tokens=5, **settings)
    counter = CallCounter(
        vision=model.vision_model,
        perceiver=model.perceiver,
        **{f"to_kv_{name}": block.attn.to_kv for name, block in model.gated_cross_attn_layers.items()},
    )
    try:
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **settings)
    finally:
        counter.remove()
    assert out.shape[0] == 2 * settings.get("num_return_sequences", 1)
    assert torch.equal(out, expected)
    assert len(model.gated_cross_attn_layers) == 2
    assert counter.calls == dict.fromkeys(counter.calls, 1), counter.calls
    # the vision tower sees the batch's 2 x 3 images once, not once per beam or sample
    assert counter.shapes["vision"] == [(6, 3, 32, 32)]
    assert counter.shapes["perceiver"] == [(2, 3, 16, 32)]


@pytest.mark.parametrize("settings", [{"num_beams": 3}, {"do_sample": True, "top_k": 1, "num_return_sequences": 2}])
def test_generate_from_an_image_cache_expands_it(settings, loaded, reference):
    """`image_cache` of an earlier forward in place of the images: repeated for beams and several sequences too; the
    prompt's image for each token found from its <image> tokens when `image_indices` are not given."""
    model, _ = loaded("tiny-llama")
    _, ref = reference("tiny-llama")
    inputs = reference_inputs(ref)
    expected = model.generate(**inputs, max_new_tokens=5, **settings)
    image_cache = model(**inputs).image_cache
    image_indices = model._image_indices(inputs["input_ids"], inputs["pixel_values"].shape[1])
    for given in ({"image_indices": image_indices}, {}):  # without them: from the prompt's <image> tokens
        got = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_cache=image_cache,
            max_new_tokens=5,
            **given,
            **settings,
        )
        assert torch.equal(got, expected), given
    text_only = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.media_token_id, 5)
    with pytest.raises(ValueError, match=r"Images were given \(image_cache\) but input_ids contain no <image>"):
        model.generate(input_ids=text_only, image_cache=image_cache, max_new_tokens=2)


def test_generate_from_inputs_embeds(loaded, reference):
    model, _ = loaded("tiny-llama")
    _, ref = reference("tiny-llama")
    inputs = reference_inputs(ref)
    expected = model.generate(**inputs, max_new_tokens=5)
    image_indices = model._image_indices(inputs["input_ids"], inputs["pixel_values"].shape[1])
    got = model.generate(
        inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        image_indices=image_indices,
        max_new_tokens=5,
    )
    assert torch.equal(got, expected[:, inputs["input_ids"].shape[1] :])  # only the new tokens, as for any LM


def test_image_features_in_another_dtype_are_cast(loaded, reference):
    model, _ = loaded("tiny-llama")
    _, ref = reference("tiny-llama")
    inputs = reference_inputs(ref)
    features = model.get_image_features(inputs.pop("pixel_values"))
    expected = model(**inputs, image_hidden_states=features).logits
    got = model(**inputs, image_hidden_states=features.bfloat16()).logits
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0)  # the features rounded to bf16, computed in fp32
    assert got.dtype == torch.float32


def test_sampling_expands_each_rows_images(loaded, reference):
    """Sampled sequences of a row see that row's images: top_k=1 sampling equals greedy for every returned copy."""
    model, _ = loaded("tiny-llama")
    _, ref = reference("tiny-llama")
    greedy = model.generate(**reference_inputs(ref), max_new_tokens=6, min_new_tokens=6)
    sampled = model.generate(
        **reference_inputs(ref), max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3
    )
    assert torch.equal(sampled, greedy.repeat_interleave(3, dim=0))
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(model.generate(**reference_inputs(ref), max_new_tokens=6, do_sample=True, temperature=1.5))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family", ["tiny-mpt-1b-redpajama-200b", "tiny-llama"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_equals_one_row_at_a_time(family, num_beams, loaded, tiny_images):
    """Left padding, rows with 3, 1, 0 (text-only) and 2 images (zero-padded pixel values) in one batch."""
    model, processor = loaded(family)
    rows = make_row_batch(tiny_images)
    steps = 6
    batch = processor(images=[images for _, images in rows], text=[text for text, _ in rows])
    assert batch["pixel_values"].shape[:2] == (4, 3)
    assert batch["attention_mask"][:, 0].tolist().count(0) >= 1  # left padding is exercised
    out = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, num_beams=num_beams)
    for i, (text, images) in enumerate(rows):
        single = processor(images=[images], text=[text])
        one = model.generate(**single, max_new_tokens=steps, min_new_tokens=steps, num_beams=num_beams)
        assert "pixel_values" in single or not images
        assert torch.equal(out[i, -steps:], one[0, -steps:]), (i, out[i, -steps:], one[0, -steps:])


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompts_without_pixel_values(family, loaded):
    model, processor = loaded(family)
    texts = ["The cat sat on the", "A short text-only prompt about"]
    batch = processor(text=texts)
    assert "pixel_values" not in batch
    out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5)
    for i, text in enumerate(texts):
        one = model.generate(**processor(text=[text]), max_new_tokens=5, min_new_tokens=5)
        assert torch.equal(out[i, -5:], one[0, -5:])
    beams = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, num_beams=3)
    assert beams.shape == out.shape
    # an empty text is no tokens (no BOS): a clear error, not an index / reshape error inside the LM
    with pytest.raises(ValueError, match="generate needs a prompt of at least one token"):
        model.generate(**processor(text=[""]), max_new_tokens=3)
    # ... in a batch too (a row of padding only), as alone, not tokens made from padding
    with pytest.raises(ValueError, match=r"at least one token in every row; attention_mask row\(s\) \[0\]"):
        model.generate(**processor(text=["", texts[0]]), max_new_tokens=3)


def test_prompt_lookup_decoding_equals_greedy(loaded, reference):
    """Several tokens per step, and cache cropping on rejected candidates, keep the image state right."""
    model, _ = loaded("tiny-llama")
    _, ref = reference("tiny-llama")
    for row in range(2):
        inputs = {k: v[row : row + 1] for k, v in reference_inputs(ref).items()}
        greedy = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12)
        lookup = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, prompt_lookup_num_tokens=3)
        assert torch.equal(lookup, greedy)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_plain(family, loaded, tiny_images):
    """`prefill_chunk_size`: each chunk of the prompt sees its own tokens' images (it starts at the cache's length),
    not the last or the first tokens' of the prompt: the logits of every step are plain generation's."""
    model, processor = loaded(family)
    batch = processor(
        images=[[tiny_images[0], tiny_images[1]]], text=["<image>Output:a cat<|endofchunk|><image>Output:"]
    )
    assert batch["input_ids"].shape[1] > 8  # three chunks at least
    options = {"max_new_tokens": 4, "min_new_tokens": 4, "return_dict_in_generate": True, "output_logits": True}
    plain = model.generate(**batch, **options)
    for chunk in (3, 4):
        chunked = model.generate(**batch, **options, prefill_chunk_size=chunk)
        assert torch.equal(chunked.sequences, plain.sequences)
        for step, (got, expected) in enumerate(zip(chunked.logits, plain.logits, strict=True)):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=f"chunk {chunk}, step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_with_inputs_embeds(family, loaded, tiny_images):
    """`prefill_chunk_size` with `input_ids` and `inputs_embeds`: each chunk (and, on transformers 4.x, the prompt's
    last token, fed after the chunks) is fed its own embeddings and its own tokens' images: the logits are those of
    unchunked generation from the same embeddings (scaled here, so that the ids' own embeddings would differ).
    Without `input_ids` there is nothing to split: a clear error."""
    model, processor = loaded(family)
    batch = processor(
        images=[[tiny_images[0], tiny_images[1]]], text=["<image>Output:a cat<|endofchunk|><image>Output:"]
    )
    embeds = model.get_input_embeddings()(batch["input_ids"]) * 1.5
    options = {"max_new_tokens": 3, "min_new_tokens": 3, "return_dict_in_generate": True, "output_logits": True}
    plain = model.generate(**batch, inputs_embeds=embeds, **options)
    from_ids = model.generate(**batch, **options)
    assert not torch.allclose(from_ids.logits[0], plain.logits[0], atol=1e-3)  # the embeddings matter
    chunked = model.generate(**batch, inputs_embeds=embeds, **options, prefill_chunk_size=4)
    for step, (got, expected) in enumerate(zip(chunked.logits, plain.logits, strict=True)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=f"step {step}")
    # the same through a `GenerationConfig` given positionally (`generate(ids, config)`), which the chunking's
    # bookkeeping did not read: the chunks were fed the ids' embeddings (4.57) or failed (5.x)
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    config = GenerationConfig(**options, prefill_chunk_size=4)
    positional = model.generate(batch["input_ids"], config, **rest, inputs_embeds=embeds)
    for step, (got, expected) in enumerate(zip(positional.logits, plain.logits, strict=True)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=f"positional config, step {step}")
    without_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    image_indices = image_indices_from_input_ids(batch["input_ids"], model.config.media_token_id, 2)
    with pytest.raises(ValueError, match="prefill_chunk_size splits the prompt's input_ids.*got no input_ids"):
        model.generate(
            **without_ids, inputs_embeds=embeds, image_indices=image_indices, **options, prefill_chunk_size=4
        )
    # embeddings longer than the ids (a soft prompt before them): not split by the ids, refused
    soft = torch.cat((torch.randn(1, 3, embeds.shape[-1]), embeds), dim=1)
    with pytest.raises(ValueError, match=r"got input_ids \(1, \d+\) for inputs_embeds \(1, \d+, \d+\)"):
        model.generate(**batch, inputs_embeds=soft, **options, prefill_chunk_size=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_a_soft_prompt_before_the_ids(family, loaded, tiny_images):
    """`inputs_embeds` longer than `input_ids` (soft-prompt vectors before the prompt), with `image_indices` over the
    embeddings: the first step's logits are those of a forward over the same inputs (nothing cut to the ids)."""
    model, processor = loaded(family)
    batch = processor(images=[[tiny_images[0]]], text=["<image>Output:a cat"])
    ids = batch["input_ids"]
    embeds = torch.cat((torch.randn(1, 3, model.config.text_config.hidden_size), model.get_input_embeddings()(ids)), 1)
    image_indices = torch.cat(
        (torch.zeros(1, 3, dtype=torch.long), image_indices_from_input_ids(ids, model.config.media_token_id, 1)), 1
    )
    inputs = {"inputs_embeds": embeds, "image_indices": image_indices, "pixel_values": batch["pixel_values"]}
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        expected = model(**inputs, attention_mask=mask).logits[:, -1]
    out = model.generate(
        input_ids=ids, attention_mask=mask, **inputs, max_new_tokens=1, return_dict_in_generate=True, output_logits=True
    )
    torch.testing.assert_close(out.logits[0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["tiny-mpt-1b-redpajama-200b", "tiny-llama"])
def test_assisted_decoding_equals_greedy(family, loaded, tiny_images):
    """`assistant_model`: the assistant gets the images encoded once by its own vision tower and Perceiver, and the
    tokens generated so far with the prompt's `image_indices` (extended as generated tokens are); the sequences are
    greedy's. The assistant here is the model with other cross-attention gates, so some of its candidates are
    rejected."""
    model, processor = loaded(family)
    assistant = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in assistant.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                parameter.mul_(-3.0)
    seen, encoded = [], []

    def record(module, args, kwargs):
        seen.append(any(kwargs.get(k) is not None for k in ("pixel_values", "image_hidden_states", "image_cache")))

    hooks = [
        assistant.register_forward_pre_hook(record, with_kwargs=True),
        assistant.vision_model.register_forward_hook(lambda *args: encoded.append(1)),
    ]
    try:
        batch = processor(
            images=[[tiny_images[0], tiny_images[1]]], text=["<image>Output:a cat<|endofchunk|><image>Output:"]
        )
        greedy = model.generate(**batch, max_new_tokens=8)  # (4.57 refuses min_new_tokens with an assistant)
        assisted = model.generate(**batch, max_new_tokens=8, assistant_model=assistant)
        assert torch.equal(assisted, greedy)
        assert len(seen) > 1 and all(seen), seen  # every forward of the assistant sees the images
        assert len(encoded) == 1  # encoded once, not once per round of candidates
        text = processor(text=["A text-only prompt about"])
        assert torch.equal(
            model.generate(**text, max_new_tokens=8, assistant_model=assistant),
            model.generate(**text, max_new_tokens=8),
        )
        # a plain causal LM of the same vocabulary drafts without the images; the tokens stay greedy's
        draft = AutoModelForCausalLM.from_config(copy.deepcopy(model.config.text_config)).eval()
        for prompt in (batch, text):
            assert torch.equal(
                model.generate(**prompt, max_new_tokens=8, assistant_model=draft),
                model.generate(**prompt, max_new_tokens=8),
            )
        # an OpenFlamingo assistant of another class (PEFT-wrapped) is still given the images
        from peft import LoraConfig, get_peft_model

        seen.clear()
        wrapped = get_peft_model(assistant, LoraConfig(r=2, target_modules=["to_q"]))
        assert torch.equal(model.generate(**batch, max_new_tokens=8, assistant_model=wrapped), greedy)
        assert len(seen) > 1 and all(seen), seen
        embeds = model.get_input_embeddings()(batch["input_ids"])
        with pytest.raises(ValueError, match=r"Assisted decoding \(assistant_model\) with inputs_embeds"):
            model.generate(**batch, inputs_embeds=embeds, max_new_tokens=8, assistant_model=assistant)
    finally:
        for hook in hooks:
            hook.remove()


def test_image_indices_shorter_than_the_prompt_are_refused(loaded, tiny_images):
    """Only an assistant model extends the prompt's `image_indices` over later tokens; a caller's must cover
    `input_ids`."""
    model, processor = loaded("tiny-llama")
    batch = processor(images=[[tiny_images[0]]], text=["<image>Output:a cat"])
    image_indices = model._image_indices(batch["input_ids"], 1)
    with pytest.raises(ValueError, match="image_indices must be integers of shape"):
        model.generate(**batch, image_indices=image_indices[:, :-1], max_new_tokens=2)


# --------------------------------------------------------------------------------------------------------------------
# stopping, logits processors, generation_config
# --------------------------------------------------------------------------------------------------------------------


def test_stops_at_end_of_chunk_by_default(loaded, reference, converted):
    model, _ = loaded("tiny-mpt")
    spec, ref = reference("tiny-mpt")
    eoc, pad = spec["eoc_token_id"], spec["pad_token_id"]
    inputs = reference_inputs(ref)
    prompt_len = inputs["input_ids"].shape[1]

    class EndRowZeroAt(LogitsProcessor):  # row 0 emits <|endofchunk|> as its 3rd new token
        def __call__(self, input_ids, scores):
            if input_ids.shape[-1] == prompt_len + 2:
                scores = scores.clone()
                scores[0] = -float("inf")
                scores[0, eoc] = 0.0
            return scores

    out = model.generate(**inputs, max_new_tokens=6, logits_processor=LogitsProcessorList([EndRowZeroAt()]))
    assert out.shape[1] == prompt_len + 6  # row 1 goes on
    assert out[0, prompt_len + 2] == eoc
    assert out[0, prompt_len + 3 :].tolist() == [pad] * 3  # row 0 stopped, padded with <PAD>
    assert (out[1, prompt_len:] != pad).all()

    # A model built from a config (no generation_config.json) also stops at <|endofchunk|>, not the LM's eos.
    config = OpenFlamingoConfig.from_pretrained(converted("tiny-mpt"))
    assert config.eoc_token_id == eoc and config.text_config.eos_token_id != eoc
    built = OpenFlamingoForConditionalGeneration(config).eval()
    assert built.generation_config.eos_token_id == eoc
    assert built.generation_config.pad_token_id == pad
    out = built.generate(
        **{k: v[:1] for k, v in inputs.items()},
        max_new_tokens=6,
        logits_processor=LogitsProcessorList([ForceTokenAt(eoc, 2, prompt_len)]),
    )
    assert out.shape[1] == prompt_len + 3 and out[0, -1] == eoc


def test_a_folder_without_generation_config_stops_at_end_of_chunk(converted, tmp_path):
    """transformers then makes the generation config from config.json: its eos is <|endofchunk|>, not the LM's."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(converted("tiny-mpt"), folder)
    (folder / "generation_config.json").unlink()
    model = OpenFlamingoForConditionalGeneration.from_pretrained(folder)
    assert model.config.eos_token_id == model.config.eoc_token_id != model.config.text_config.eos_token_id
    assert model.generation_config.eos_token_id == model.config.eoc_token_id


def test_logits_processors_and_generation_config(loaded, reference):
    model, _ = loaded("tiny-llama")
    _, ref = reference("tiny-llama")
    inputs = reference_inputs(ref)
    prompt_len = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    # a GenerationConfig object
    config = GenerationConfig(max_new_tokens=4, min_new_tokens=4, eos_token_id=400, pad_token_id=402)
    assert torch.equal(model.generate(**inputs, generation_config=config), greedy)
    # a built-in processor from kwargs: ban each row's greedy first token
    banned = greedy[:, prompt_len].tolist()
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, bad_words_ids=[[t] for t in banned])
    assert all(t not in banned for t in out[:, prompt_len:].flatten().tolist())
    # a custom processor
    out = model.generate(
        **inputs,
        max_new_tokens=4,
        min_new_tokens=4,
        logits_processor=LogitsProcessorList([ForceTokenAt(7, 1, prompt_len)]),
    )
    assert out[:, prompt_len + 1].tolist() == [7, 7]
    assert torch.equal(out[:, prompt_len], greedy[:, prompt_len])


# --------------------------------------------------------------------------------------------------------------------
# a generated <image> token
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny-mpt-1b-redpajama-200b", "tiny-neox"])
def test_generated_image_token_counts_as_the_next_image_as_in_one_forward(family, loaded, reference):
    """`generated_image_conditioning="sequence"`: a generated `<image>` has no image: as in the original's forward
    over the whole sequence (its generation without a KV cache, as MPT's and MosaicGPT's configs ask), it starts image
    `num_images + 1`, which no latent belongs to, so it and the tokens after it attend to every latent equally.
    (The converted GPT-NeoX model has `"original_kv_cache"`: set to `"sequence"` here; that one is tested below.)
    """
    model, processor = loaded(family)
    converted_conditioning = model.config.generated_image_conditioning
    model.config.generated_image_conditioning = "sequence"
    try:
        check_generated_image_as_in_one_forward(model, processor, *reference(family))
    finally:
        model.config.generated_image_conditioning = converted_conditioning


def test_generated_image_token_as_the_originals_kv_cache(loaded, reference):
    """`generated_image_conditioning="original_kv_cache"` (the converted GPT-NeoX model): both rows are fed `<image>`
    at one step, so from it on each row attends to its first image: every later token is the argmax of one forward
    with those images."""
    model, _ = loaded("tiny-neox")
    spec, ref = reference("tiny-neox")
    assert model.config.generated_image_conditioning == "original_kv_cache"
    forced = ForcedImage(model, spec, ref)
    indices = (forced.out[:, :-1] == forced.media).cumsum(-1)
    indices[:, forced.prompt_len + forced.step :] = 1
    forced.assert_argmax_of_one_forward(forced.new_token_logits(indices))
    # without a cache the original (and this model) count as one forward over the sequence: other tokens
    assert not torch.equal(forced.generate(use_cache=False), forced.out)


class ForcedImage:
    """Greedy generation from the reference prompts with `<image>` forced as every row's new token at `step`, and the
    logits of one forward over the result, for `image_indices` given."""

    steps, step = 6, 1

    def __init__(self, model, spec, ref) -> None:
        self.model, self.media, self.eoc = model, spec["media_token_id"], spec["eoc_token_id"]
        self.inputs = reference_inputs(ref)
        self.prompt_len = self.inputs["input_ids"].shape[1]
        self.force = LogitsProcessorList([ForceTokenAt(self.media, self.step, self.prompt_len)])
        self.out = self.generate()
        assert (self.out[:, self.prompt_len + self.step] == self.media).all()

    def generate(self, **kwargs):
        return self.model.generate(
            **self.inputs, max_new_tokens=self.steps, min_new_tokens=self.steps, logits_processor=self.force, **kwargs
        )

    def new_token_logits(self, image_indices: torch.Tensor) -> torch.Tensor:
        """`(batch, steps, vocab)`: the logits that chose each new token, from one forward over the sequence."""
        ones = torch.ones(self.out.shape[0], self.steps - 1, dtype=torch.long)
        mask = torch.cat((self.inputs["attention_mask"], ones), dim=1)
        with torch.no_grad():
            return self.model(
                input_ids=self.out[:, :-1],
                attention_mask=mask,
                pixel_values=self.inputs["pixel_values"],
                image_indices=image_indices,
                position_ids=positions(mask),
            ).logits[:, self.prompt_len - 1 :]

    def assert_argmax_of_one_forward(self, logits: torch.Tensor) -> None:
        logits = logits.clone()
        logits[..., self.eoc] = -float("inf")  # min_new_tokens
        for t in range(self.steps):
            if t != self.step:
                assert torch.equal(logits[:, t].argmax(-1), self.out[:, self.prompt_len + t]), t


def check_generated_image_as_in_one_forward(model, processor, spec, ref) -> None:
    forced = ForcedImage(model, spec, ref)
    assert torch.equal(forced.generate(use_cache=False), forced.out)
    # every later token is the argmax of one forward over the sequence, its <image> tokens counted as the original
    # counts them (the prompt's images, then a 4th)
    num_images = forced.inputs["pixel_values"].shape[1]
    indices = (forced.out[:, :-1] == forced.media).cumsum(-1)
    assert (indices[:, forced.prompt_len + forced.step :] == num_images + 1).all()
    logits = forced.new_token_logits(indices)
    # not the prompt's last image any more: that forward's tokens differ
    logits_kept = forced.new_token_logits(indices.clamp(max=num_images))
    assert not torch.allclose(logits[:, forced.step + 1 :], logits_kept[:, forced.step + 1 :])
    forced.assert_argmax_of_one_forward(logits)
    # beam search, and a text-only prompt, do not crash either
    beams = forced.generate(num_beams=3)
    assert (beams[:, forced.prompt_len + forced.step] == forced.media).all()
    text = processor(text=["Only text, no images"])
    length = text["input_ids"].shape[1]
    force_text = LogitsProcessorList([ForceTokenAt(forced.media, forced.step, length)])
    cached = model.generate(**text, max_new_tokens=4, min_new_tokens=4, logits_processor=force_text)
    no_cache = model.generate(**text, max_new_tokens=4, min_new_tokens=4, logits_processor=force_text, use_cache=False)
    assert cached[0, length + forced.step] == forced.media
    assert torch.equal(cached, no_cache)


# --------------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------------


def test_generate_raises_the_forward_errors(loaded, reference):
    model, processor = loaded("tiny-mpt")
    _, ref = reference("tiny-mpt")
    inputs = reference_inputs(ref)
    with pytest.raises(ValueError, match="input_ids contain <image> tokens but no images were given") as from_forward:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="input_ids contain <image> tokens but no images were given") as from_generate:
        model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2)
    assert str(from_generate.value) == str(from_forward.value)

    text = processor(text=["no image token here", "nor here"])
    with pytest.raises(ValueError, match="no <image> token to place them") as from_forward:
        model(**text, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="no <image> token to place them") as from_generate:
        model.generate(**text, pixel_values=inputs["pixel_values"], max_new_tokens=2)
    assert str(from_generate.value) == str(from_forward.value)

    too_few = inputs["pixel_values"][:, :2]
    with pytest.raises(ValueError, match="Row 0 of input_ids has 3 <image> tokens but only 2 images") as from_forward:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=too_few)
    with pytest.raises(ValueError, match="Row 0 of input_ids has 3 <image> tokens but only 2 images") as from_generate:
        model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=too_few,
            max_new_tokens=2,
        )
    assert str(from_generate.value) == str(from_forward.value)


# --------------------------------------------------------------------------------------------------------------------
# bf16
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_generation_runs_and_first_tokens_agree_with_fp32(family, converted, reference):
    spec, ref = reference(family)
    model = AutoModelForImageTextToText.from_pretrained(converted(family)).eval().to(torch.bfloat16)
    inputs = reference_inputs(ref)
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    assert out.shape == (2, prompt_len + 4)
    assert torch.equal(out[:, prompt_len], ref["greedy"][:, prompt_len])
    beams = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=3)
    assert beams.shape == (2, prompt_len + 3)


# --------------------------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------------------------


def test_text_streamer_and_text_iterator_streamer(loaded, tiny_images, capsys):
    model, processor = loaded("tiny-llama")
    inputs = processor(images=[tiny_images[:3]], text=[CAPTION_PROMPT])
    prompt_len = inputs["input_ids"].shape[1]
    expected_ids = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8)
    expected = processor.decode(expected_ids[0, prompt_len:], skip_special_tokens=True)

    capsys.readouterr()
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, streamer=streamer)
    assert torch.equal(out, expected_ids)
    assert capsys.readouterr().out.rstrip("\n") == expected

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(**inputs, max_new_tokens=8, min_new_tokens=8, streamer=streamer)
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected


# --------------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------------


def brute_force_scores(model, input_ids, attention_mask, pixel_values, candidates) -> torch.Tensor:
    """log p(candidate | prompt), one full forward over prompt + candidate per candidate."""
    scores = torch.zeros(input_ids.shape[0], len(candidates))
    prompt_len = input_ids.shape[1]
    with torch.no_grad():
        for k, candidate in enumerate(candidates):
            tokens = torch.tensor(candidate).expand(input_ids.shape[0], -1)
            ids = torch.cat((input_ids, tokens), dim=1)
            mask = torch.cat((attention_mask, torch.ones_like(tokens)), dim=1)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, position_ids=positions(mask))
            logprobs = logits.logits[:, prompt_len - 1 : -1].float().log_softmax(-1)
            scores[:, k] = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    return scores


CLASS_NAMES = ["cat", "bathroom sink", "a yellow school bus", "dog", "x"]


@pytest.mark.parametrize("family", FAMILIES)
def test_score_continuations_equals_brute_force_and_runs_the_prompt_once(family, loaded, tiny_images):
    model, processor = loaded(family)
    prompts = [
        "<image>Output:cat<|endofchunk|><image>Output:dog<|endofchunk|><image>Output:",
        "<image>Output:",
    ]
    batch = processor(images=[tiny_images[:3], tiny_images[3:4]], text=prompts)
    candidates = processor.tokenizer(CLASS_NAMES, add_special_tokens=False)["input_ids"]
    lengths = [len(c) for c in candidates]
    assert min(lengths) == 1 and max(lengths) > 2

    counter = CallCounter(vision=model.vision_model, embed=model.get_input_embeddings())
    try:
        scores = model.score_continuations(**batch, continuations=candidates)
    finally:
        counter.remove()
    assert scores.shape == (2, len(CLASS_NAMES)) and scores.dtype == torch.float32
    # the prompt (and its images) ran once; the candidates' tokens once, together: not K prompt forwards
    assert counter.calls == {"vision": 1, "embed": 2}
    batch_size, prompt_len = batch["input_ids"].shape
    assert counter.shapes["embed"] == [(batch_size, prompt_len), (batch_size * len(CLASS_NAMES), max(lengths) - 1)]

    expected = brute_force_scores(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], candidates)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)

    mean = model.score_continuations(**batch, continuations=candidates, normalize_length=True)
    torch.testing.assert_close(mean, expected / torch.tensor(lengths, dtype=torch.float32), atol=1e-4, rtol=0)
    chunked = model.score_continuations(**batch, continuations=candidates, candidates_per_forward=2)
    torch.testing.assert_close(chunked, scores, atol=1e-5, rtol=0)
    # the short prompt's row, left-padded in the batch, scores as alone (the original's cached path does not: its
    # candidates attend to that padding)
    alone = processor(images=[tiny_images[3:4]], text=prompts[1:])
    torch.testing.assert_close(
        model.score_continuations(**alone, continuations=candidates)[0], scores[1], atol=1e-4, rtol=0
    )


def test_score_continuations_inputs(loaded, tiny_images):
    model, processor = loaded("tiny-llama")
    batch = processor(images=[tiny_images[:1]], text=["<image>Output:"])
    candidates = processor.tokenizer(CLASS_NAMES, add_special_tokens=False)["input_ids"]
    scores = model.score_continuations(**batch, continuations=candidates)
    right = processor(
        images=[tiny_images[:1], tiny_images[1:2]], text=["<image>Output:", "<image>a b Output:"], padding_side="right"
    )
    with pytest.raises(ValueError, match="needs left-padded prompts"):
        model.score_continuations(**right, continuations=candidates)
    empty = processor(text=["Output:", ""])
    with pytest.raises(ValueError, match=r"score_continuations needs a prompt of at least one token in every row"):
        model.score_continuations(**empty, continuations=candidates)
    with pytest.raises(ValueError, match="each a list of token ids"):  # one candidate's ids, not a list of them
        model.score_continuations(**batch, continuations=candidates[0])
    with pytest.raises(ValueError, match="negative token ids"):
        model.score_continuations(**batch, continuations=[[5], [-1]])
    with pytest.raises(ValueError, match="continuations must be a .* tensor of token ids.*torch.bool"):
        model.score_continuations(**batch, continuations=torch.tensor([[True, False]]))
    vocab = model.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match=rf"beyond the vocabulary \({vocab} tokens\)"):
        model.score_continuations(**batch, continuations=[[5], [5, vocab]])
    with pytest.raises(ValueError, match="input_ids must be a tensor of token ids.*list"):
        model.score_continuations(batch["input_ids"].tolist(), candidates, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        model.score_continuations(**{**batch, "attention_mask": batch["attention_mask"][0]}, continuations=candidates)
    for bad in (torch.tensor([[2, 2]]), torch.tensor([[1.0, 0.5]])):
        with pytest.raises(ValueError, match="continuation_mask must hold 1 for real tokens and 0 for padding"):
            model.score_continuations(**batch, continuations=torch.tensor([[5, 6]]), continuation_mask=bad)

    # a padded tensor with a mask gives the same scores
    width = max(len(c) for c in candidates)
    ids = torch.zeros(len(candidates), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(candidates):
        ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    torch.testing.assert_close(
        model.score_continuations(**batch, continuations=ids, continuation_mask=mask), scores, atol=1e-5, rtol=0
    )
    padded = ids.masked_fill(mask == 0, -100)  # whatever the padding holds
    torch.testing.assert_close(
        model.score_continuations(**batch, continuations=padded, continuation_mask=mask), scores, atol=1e-5, rtol=0
    )
    # left padding too (the processor's tokenizer pads left)
    left_ids, left_mask = torch.full_like(ids, -100), torch.zeros_like(mask)
    for i, c in enumerate(candidates):
        left_ids[i, width - len(c) :], left_mask[i, width - len(c) :] = torch.tensor(c), 1
    torch.testing.assert_close(
        model.score_continuations(**batch, continuations=left_ids, continuation_mask=left_mask),
        scores,
        atol=1e-5,
        rtol=0,
    )
    tokenized = processor.tokenizer(["a cat", "dog"], add_special_tokens=False, padding=True, return_tensors="pt")
    by_lists = processor.tokenizer(["a cat", "dog"], add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(
        model.score_continuations(
            **batch, continuations=tokenized["input_ids"], continuation_mask=tokenized["attention_mask"]
        ),
        model.score_continuations(**batch, continuations=by_lists),
        atol=1e-5,
        rtol=0,
    )
    # single-token candidates need no second forward at all
    counter = CallCounter(embed=model.get_input_embeddings())
    try:
        single = model.score_continuations(**batch, continuations=[[5], [9], [11]])
    finally:
        counter.remove()
    assert counter.calls == {"embed": 1}
    with torch.no_grad():
        last = model(**batch).logits[:, -1].log_softmax(-1)
    torch.testing.assert_close(single, last[:, [5, 9, 11]], atol=1e-5, rtol=0)
    # already encoded images
    hidden = model.get_image_features(batch["pixel_values"])
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    torch.testing.assert_close(
        model.score_continuations(**inputs, image_hidden_states=hidden, continuations=candidates),
        scores,
        atol=1e-5,
        rtol=0,
    )
    # a text-only prompt
    text = processor(text=["The animal in the picture is a"])
    expected = brute_force_scores(model, text["input_ids"], text["attention_mask"], None, candidates)
    torch.testing.assert_close(model.score_continuations(**text, continuations=candidates), expected, atol=1e-4, rtol=0)
    # errors
    with pytest.raises(ValueError, match=r"Continuations \[1\] are empty"):
        model.score_continuations(**batch, continuations=[[5], []])
    with pytest.raises(ValueError, match="continuations is empty"):
        model.score_continuations(**batch, continuations=[])
    with pytest.raises(ValueError, match="continuation_mask must be padding on one side"):
        holes = torch.tensor([[1, 0, 1]])
        model.score_continuations(**batch, continuations=torch.tensor([[5, 6, 7]]), continuation_mask=holes)
    with pytest.raises(ValueError, match="no images were given"):
        model.score_continuations(input_ids=batch["input_ids"], continuations=candidates)
    for chunk in (0, -1, 1.5):  # refused whether or not the candidates need a second forward
        with pytest.raises(ValueError, match="candidates_per_forward must be an int >= 1"):
            model.score_continuations(**batch, continuations=[[5], [9]], candidates_per_forward=chunk)
    chunked = model.score_continuations(**batch, continuations=candidates, candidates_per_forward=np.int64(1))
    torch.testing.assert_close(chunked, model.score_continuations(**batch, continuations=candidates))


# --------------------------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------------------------


def test_image_text_to_text_pipeline(converted, loaded, tiny_images):
    path = converted("tiny-llama")
    model, processor = loaded("tiny-llama")
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    prompt = "<image>Output:A cat.<|endofchunk|><image>Output:"
    result = pipe(images=tiny_images[:2], text=prompt, max_new_tokens=5, generate_kwargs={"min_new_tokens": 5})
    inputs = processor(images=[tiny_images[:2]], text=[prompt]).to(model.device)
    ids = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    new_text = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result == [{"input_text": prompt, "generated_text": prompt + new_text}]

    new_only = pipe(
        images=tiny_images[:2],
        text=prompt,
        max_new_tokens=5,
        return_full_text=False,
        generate_kwargs={"min_new_tokens": 5},
    )
    assert new_only[0]["generated_text"] == new_text
    # a batch of rows with different numbers of images, and text-only input
    batched = pipe(
        images=[tiny_images[:2], tiny_images[2:3]],
        text=[prompt, "<image>Output:"],
        max_new_tokens=3,
        return_full_text=False,
    )
    assert len(batched) == 2
    assert len(pipe(text="Just text", max_new_tokens=3)) == 1
    # batched by the pipeline itself (it pads with the tokenizer's side: left): as one at a time
    texts = ["Hi", "A much longer text-only prompt"]
    items = [{"images": tiny_images[:1], "text": "<image>Output: a cat on a sofa.<|endofchunk|>Output:"}]
    items.append({"images": tiny_images[2:3], "text": "<image>Out:"})
    options = {"return_full_text": False, "generate_kwargs": {"max_new_tokens": 4, "min_new_tokens": 4}}
    one_by_one = [pipe(text=t, **options)[0]["generated_text"] for t in texts]
    one_by_one += [pipe(images=x["images"], text=x["text"], **options)[0]["generated_text"] for x in items]
    batched = pipe(text=texts, batch_size=2, **options) + list(pipe((x for x in items), batch_size=2, **options))
    assert [(r[0] if isinstance(r, list) else r)["generated_text"] for r in batched] == one_by_one
    # stop strings as the processor's error says to pass them to a pipeline
    long = {"max_new_tokens": 12, "min_new_tokens": 12}
    plain = pipe(text=texts[1], return_full_text=False, generate_kwargs=long)[0]["generated_text"]
    word = re.search(r"[A-Za-z]{2,}", plain)
    assert word is not None and word.end() < len(plain), plain
    long.update(min_new_tokens=0, stop_strings=[word.group()], tokenizer=processor.tokenizer)
    stopped = pipe(text=texts[1], return_full_text=False, generate_kwargs=long)[0]["generated_text"]
    assert plain.startswith(stopped) and word.group() in stopped and len(stopped) < len(plain), (plain, stopped)
    # built from the folder as well
    assert pipeline("image-text-to-text", model=str(path)).processor is not None


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-neox"])  # sentencepiece-style and byte-level BPE
def test_pipeline_new_text_after_a_prompt_ending_with_a_space(converted, loaded, tiny_images, family):
    """A prompt ending with a space (a token of its own) and new text starting with punctuation: the tokenizer's
    clean-up of `" ,"` must not join them, or the pipeline cannot find the decoded prompt in the decoded sequence and
    returns the prompt in the new text. `post_process_image_text_to_text` cleans each side of a whitespace-only
    token apart; a space inside a text is still cleaned."""
    model, processor = loaded(family)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    prompt = "<image>Output:A cat.<|endofchunk|><image>Output: "
    comma = processor.tokenizer.convert_tokens_to_ids(",")
    generate_kwargs = {"max_new_tokens": 3, "sequence_bias": {(comma,): 100.0}}  # (forces "," from random weights)
    inputs = processor(images=[tiny_images[:2]], text=[prompt]).to(model.device)
    ids = model.generate(**inputs, **generate_kwargs)
    new_text = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert new_text == ",,,"
    full = pipe(images=tiny_images[:2], text=prompt, generate_kwargs=dict(generate_kwargs))
    assert full[0]["generated_text"] == prompt + new_text
    new_only = pipe(images=tiny_images[:2], text=prompt, return_full_text=False, generate_kwargs=dict(generate_kwargs))
    assert new_only[0]["generated_text"] == new_text
    # as `batch_decode` otherwise: a row gives a string, a batch a list, and the clean-up applies within a piece (the
    # tiny vocabularies have no "Ġ." token: one is added); a lone space token before punctuation is kept
    processor = AutoProcessor.from_pretrained(converted(family))
    processor.tokenizer.add_tokens([" .", " !"])
    words = processor.tokenizer("a cat . Yes !", add_special_tokens=False)["input_ids"]
    assert processor.post_process_image_text_to_text(torch.tensor(words)) == processor.decode(words) == "a cat. Yes!"
    assert processor.post_process_image_text_to_text([words, words]) == processor.batch_decode([words, words])
    assert processor.post_process_image_text_to_text([words], clean_up_tokenization_spaces=False) == ["a cat . Yes !"]


def test_pipeline_new_text_after_a_prompt_ending_with_a_newline_and_space():
    """A byte-level BPE token of several whitespace characters, such as newline + space ("\u010a\u0120", as GPT-NeoX's
    vocabulary has whitespace tokens for code), counts as whitespace only: the clean-up of `" ,"` no longer joins a
    prompt ending with it to the new text (the decoded prompt was no prefix of the decoded sequence, and the
    pipeline's new text held the whole prompt)."""
    corpus = "Question: what is it?\n Answer: a cat , a dog .\n "
    processor = byte_level_processor(corpus, vocab_size=400, clean_up_tokenization_spaces=True)
    prompt = processor.tokenizer("<image>Question: what is it?\n ")["input_ids"]
    assert processor.tokenizer.convert_ids_to_tokens(prompt)[-1] == "\u010a\u0120"
    comma = processor.tokenizer.convert_tokens_to_ids(",")
    decoded_prompt, decoded = processor.post_process_image_text_to_text([prompt, prompt + [comma, comma]])
    assert decoded_prompt == "Question: what is it?\n "
    assert decoded == decoded_prompt + ",,"
    assert processor.post_process_image_text_to_text(processor.tokenizer("a cat , a dog .")["input_ids"]) == (
        "a cat, a dog."
    )


# --------------------------------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------------------------------


EXAMPLE_RUNNER = """
import runpy, sys
model, scripts = sys.argv[1], sys.argv[2:]
for script in scripts:  # "path" or "path|--flag|..."
    print(f"=== {script}", flush=True)
    path, *flags = script.split("|")
    sys.argv = [path, "--model", model, *flags]
    runpy.run_path(path, run_name="__main__")
"""


def test_examples_run_offline(converted):
    """caption.py, vqa.py and classify.py, on the tiny converted model (one subprocess, to keep it fast); on
    transformers 5, caption.py with a static cache too (the same captions; 4.x's MPT cannot decode with one)."""
    scripts = [str(ROOT / "examples" / name) for name in ("caption.py", "vqa.py", "classify.py")]
    static_cache = not transformers.__version__.startswith("4.")
    if static_cache:
        scripts.append(scripts[0] + "|--static-cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT)])}
    model = str(converted("tiny-mpt-1b-redpajama-200b"))
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLE_RUNNER, model, *scripts],
        cwd=Path(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    sections = result.stdout.split("=== ")[1:]
    assert [section.split("\n", 1)[0] for section in sections] == scripts
    caption, vqa, classify, *caption_static_cache = (section.split("\n", 1)[1] for section in sections)
    assert caption.count("image ") == 4 and caption_static_cache == ([caption] if static_cache else [])
    assert vqa.count(" -> ") == 3
    assert classify.count("image ") == 4 and "(" in classify


def test_examples_refuse_a_device_this_torch_cannot_use(monkeypatch, capsys):
    """`--device` names a device this torch can run on, or the example stops with a usage error saying why (not
    torch's own assertion later, after the model loaded)."""
    import argparse

    demo_model = runpy.run_path(str(ROOT / "examples" / "demo_model.py"))
    parser = argparse.ArgumentParser(prog="example")
    demo_model["add_device_argument"](parser)
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused = [("cuda", "sees no CUDA device"), ("cuda:0", "sees no CUDA device"), ("gpu", "not a device")]
    refused.append(("meta", "holds no data"))  # (a device torch knows, which computes nothing: the model fails later)
    # devices of other backends, where this torch has none: refused with torch's reason, not its error after loading
    usable = {"xpu": torch.xpu.is_available(), "mps": torch.backends.mps.is_available()}
    refused += [(device, "cannot use it") for device, available in usable.items() if not available]
    for device, message in refused:
        with pytest.raises(SystemExit):
            parser.parse_args(["--device", device])
        error = capsys.readouterr().err
        assert f"argument --device: '{device}'" in error and message in error, error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cuda:2"])
    assert "torch sees 2 CUDA device(s), numbered from 0" in capsys.readouterr().err


def test_example_prompts_are_the_evaluations(monkeypatch):
    """caption.py and vqa.py build prompts as `open_flamingo/eval/evaluate.py` does: a newline after each
    demonstration; zero-shot, two demonstrations' text without their `<image>` tokens."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    caption, vqa = (runpy.run_path(str(ROOT / "examples" / name)) for name in ("caption.py", "vqa.py"))
    cats, sink = ("A photo of two cats on a couch.", "A white bathroom sink under a mirror.")
    assert caption["build_prompt"](2) == (
        f"<image>Output:{cats}<|endofchunk|>\n<image>Output:{sink}<|endofchunk|>\n<image>Output:"
    )
    assert caption["build_prompt"](1) == f"<image>Output:{cats}<|endofchunk|>\n<image>Output:"
    assert caption["build_prompt"](0) == f"Output:{cats}<|endofchunk|>\nOutput:{sink}<|endofchunk|>\n<image>Output:"
    demo = "Question:How many cats are there? Short answer:two<|endofchunk|>\n"
    assert vqa["build_prompt"]("Why?", 1) == f"<image>{demo}<image>Question:Why? Short answer:"
    assert vqa["build_prompt"]("Why?", 0) == (
        f"{demo}Question:What room is this? Short answer:bathroom<|endofchunk|>\n<image>Question:Why? Short answer:"
    )


@pytest.mark.parametrize("family", ["mpt", "gpt_neox", "llama"])
def test_generate_in_train_mode_with_gradient_checkpointing(family):
    """A model left in train mode with gradient checkpointing on (as `Trainer(gradient_checkpointing=True)` leaves it)
    generates and scores candidates as in eval mode (the tiny models have no dropout): its checkpointed layers would
    drop the KV cache (transformers 4.x's; MPT's on 5.x too) while `generate` feeds one token per step (MPT then
    failed, GPT-NeoX and LLaMA lost the prompt) and `score_continuations` found no cache. Checkpointing stays on."""
    from .test_core import inputs, tiny_model

    model = tiny_model(family).eval()
    ids, pixel_values = inputs(batch=1)
    expected = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6)
    candidates = [[5, 6, 7], [8, 9]]
    scores = model.score_continuations(ids, candidates, pixel_values=pixel_values)
    enable_checkpointing(model)
    model.train()
    got = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(got, expected)
    torch.testing.assert_close(
        model.score_continuations(ids, candidates, pixel_values=pixel_values), scores, rtol=0, atol=1e-5
    )
    assert model.training and is_checkpointing(model)


@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
def test_continuing_from_a_cache_without_the_images(family):
    """The forward of a continued call sees only the new tokens. The cache of a call with images holds them, so
    `generate` continues from it with them; a cache without them (the images of a cache-less prompt) is refused, as
    the prompt without the cache is, instead of decoding the new tokens as text only (a silent wrong answer)."""
    from .test_core import inputs, tiny_model

    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2)
    out = model.generate(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True
    )
    name, cache = lm_cache_of(out)
    continued = torch.cat((out.sequences, torch.tensor([[5], [7]])), dim=1)
    expected = model.generate(input_ids=continued, pixel_values=pixel_values, max_new_tokens=2, min_new_tokens=2)
    got = model.generate(input_ids=continued, max_new_tokens=2, min_new_tokens=2, **{name: copy.deepcopy(cache)})
    assert torch.equal(got, expected)
    # with the images again, it continues the same way (the prompt's tokens are in the cache)
    again = model.generate(
        input_ids=continued, pixel_values=pixel_values, max_new_tokens=2, min_new_tokens=2,
        **{name: copy.deepcopy(cache)},
    )  # fmt: skip
    assert torch.equal(again, expected)
    with pytest.raises(ValueError, match="<image> tokens but no images were given"):
        model.generate(input_ids=continued, max_new_tokens=2)
    bare = DynamicCache()  # the prompt's tokens without its images
    with torch.no_grad():
        model(input_ids=out.sequences, image_indices=torch.zeros_like(out.sequences), past_key_values=bare)
    with pytest.raises(ValueError, match="continuing from past_key_values, pass the images again"):
        model.generate(input_ids=continued, max_new_tokens=2, **{name: bare})


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_a_forward_loop_given_only_the_cache_goes_on_seeing_the_images(family):
    """A decoding loop as for llava or mllama: the images in the first forward, then only `past_key_values` and the
    new token. The cache holds the images (as mllama's does), so the tokens are `generate`'s; `image_indices` of
    zeros (no image) still makes a continued forward text only."""
    from .test_core import inputs, tiny_model

    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2)
    new = 4
    expected = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=new, min_new_tokens=new)
    eoc = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, past_key_values=DynamicCache(), use_cache=True)
        tokens = []
        for _ in range(new):
            logits = out.logits[:, -1]
            logits[:, eoc] = -float("inf")  # min_new_tokens
            tokens.append(logits.argmax(-1, keepdim=True))
            _, cache = lm_cache_of(out)
            out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        assert torch.equal(torch.cat(tokens, dim=1), expected[:, ids.shape[1] :])
        # image_indices given: as asked (here no image), not the cache's
        _, cache = lm_cache_of(model(input_ids=ids, pixel_values=pixel_values, past_key_values=DynamicCache()))
        step = torch.tensor([[5], [7]])
        seeing = model(input_ids=step, past_key_values=copy.deepcopy(cache)).logits[:, -1]
        blind = model(input_ids=step, past_key_values=copy.deepcopy(cache), image_indices=torch.zeros_like(step))
        whole = torch.cat((ids, step), dim=1)
        placed = image_indices_from_input_ids(whole, model.config.media_token_id, pixel_values.shape[1])
        full = model(input_ids=whole, pixel_values=pixel_values).logits[:, -1]
        placed[:, -1] = 0
        full_blind = model(input_ids=whole, pixel_values=pixel_values, image_indices=placed).logits[:, -1]
    torch.testing.assert_close(seeing, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blind.logits[:, -1], full_blind, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seeing, blind.logits[:, -1])


def test_only_a_dynamic_cache_holds_images_while_traced(monkeypatch):
    """Traced by `torch.compile`, the cache's images are stored and read on a dynamic cache only: a static cache before
    its first update reports length 0 as a Python number too (it was taken for a dynamic one and given the images,
    unchecked); a caller's `image_indices` and `torch.export` keep them off."""
    from transformers import StaticCache

    from modeling_openflamingo.modeling_openflamingo import _cache_images_apply_traced

    from .test_core import tiny_config

    static = StaticCache(config=tiny_config("llama").text_config, max_cache_len=8)
    assert static.get_seq_length() == 0 and not torch.is_tensor(static.get_seq_length())
    assert not _cache_images_apply_traced(DynamicCache(), None)  # eager: not traced
    monkeypatch.setattr(torch.compiler, "is_dynamo_compiling", lambda: True)
    assert _cache_images_apply_traced(DynamicCache(), None) and _cache_images_apply_traced(None, None)
    assert not _cache_images_apply_traced(static, None)
    assert not _cache_images_apply_traced(DynamicCache(), torch.zeros(1, 1, dtype=torch.long))
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not _cache_images_apply_traced(DynamicCache(), None)


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_a_compiled_forward_loop_given_only_the_cache_goes_on_seeing_the_images(family):
    """The loop above through `torch.compile(model)` (one graph per call): the prompt's images stay with the dynamic
    cache, as in eager code, whether the loop made the cache or the LM did; a text-only prompt in the same cache
    object after it does not see them. (The traced forward neither stored nor read them: the later tokens were
    decoded as text only, silently.)"""
    from .test_core import MEDIA, inputs, tiny_model

    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2, seq=10)
    text = ids.masked_fill(ids == MEDIA, 5)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            expected = model(input_ids=ids, pixel_values=pixel_values).logits
            expected_text = model(input_ids=text).logits
            for given in (DynamicCache(), None):
                out = compiled(input_ids=ids[:, :5], pixel_values=pixel_values, past_key_values=given, use_cache=True)
                _, cache = lm_cache_of(out)
                for t in range(5, 8):
                    step = compiled(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1]
                    torch.testing.assert_close(step, expected[:, t], rtol=1e-5, atol=1e-5)
            cache.crop(-cache.get_seq_length())  # emptied: a new sequence in the same cache object
            compiled(input_ids=text[:, :5], past_key_values=cache)
            got = compiled(input_ids=text[:, 5:], past_key_values=cache).logits
            torch.testing.assert_close(got, expected_text[:, 5:], rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_a_caches_images_are_its_own_until_it_is_reset_or_changed():
    """The images a cache holds belong to its sequence: a new prompt in the same cache object (after `reset()`) does
    not see them, and a cache changed since (cropped, rows selected) is an error, not a silent wrong image."""
    from .test_core import inputs, tiny_model

    model = tiny_model("llama")
    ids, pixel_values = inputs(batch=2)
    text = torch.tensor([[11, 12, 13], [14, 15, 16]])
    step = torch.tensor([[5], [7]])
    with torch.no_grad():
        expected = model(input_ids=torch.cat((text, step), dim=1)).logits[:, -1]
        cache = DynamicCache()
        model(input_ids=ids, pixel_values=pixel_values, past_key_values=cache)
        cache.crop(-cache.get_seq_length())  # emptied (4.57's `reset()` zeroes a dynamic cache, keeping its length)
        model(input_ids=text, past_key_values=cache)  # a text-only prompt in the same cache object
        got = model(input_ids=step, past_key_values=cache).logits[:, -1]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

        cache = DynamicCache()
        model(input_ids=ids, pixel_values=pixel_values, past_key_values=cache)
        cropped = copy.deepcopy(cache)
        cropped.crop(-2)  # (the last two positions off)
        with pytest.raises(ValueError, match="the cache was changed since"):
            model(input_ids=step, past_key_values=cropped)
        with pytest.raises(ValueError, match="the cache was changed since"):
            model(input_ids=step[:1], past_key_values=cache)  # one row of two


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_beams_and_several_return_sequences_continue_from_a_cache(family):
    """An LM cache given to `generate` is repeated with the rows for beams and `num_return_sequences` (transformers
    repeats tensors only; a plain LM fails with a shape error): continuing from it gives what the whole prompt gives,
    and the caller's cache is left as it was."""
    from .test_core import inputs, tiny_model

    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2)
    attention_mask = torch.ones_like(ids)
    with torch.no_grad():
        first = model(input_ids=ids[:, :-2], pixel_values=pixel_values, past_key_values=DynamicCache(), use_cache=True)
    name, cache = lm_cache_of(first)
    length = cache.get_seq_length()
    settings = {
        "beams": dict(num_beams=3, num_return_sequences=2, max_new_tokens=4, min_new_tokens=4),
        "samples": dict(do_sample=True, top_k=5, num_return_sequences=3, max_new_tokens=4, min_new_tokens=4),
    }
    for what, kwargs in settings.items():
        runs = []
        for cached in (False, True):
            torch.manual_seed(0)
            runs.append(
                model.generate(
                    input_ids=ids,
                    attention_mask=attention_mask,
                    pixel_values=pixel_values,
                    **({name: cache} if cached else {}),
                    **kwargs,
                )
            )
        assert runs[0].shape[0] == ids.shape[0] * kwargs["num_return_sequences"], what
        assert torch.equal(runs[1], runs[0]), what
        assert cache.get_seq_length() == length and cache.layers[0].keys.shape[0] == ids.shape[0], what
    if family == "mpt":
        return  # (a static cache with MPT needs transformers 5: tested in test_fast_path.py)
    # an empty cache given for the expanded rows (a static one, sized batch x beams) is used as it is
    static = StaticCache(config=model.config.text_config, max_cache_len=24, **static_batch_size(ids.shape[0] * 3))
    kwargs = dict(settings["beams"], num_return_sequences=1)
    got = model.generate(
        input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs, **{name: static}
    )
    expected = model.generate(input_ids=ids, attention_mask=attention_mask, pixel_values=pixel_values, **kwargs)
    assert torch.equal(got, expected)


def static_batch_size(rows: int) -> dict:
    """`StaticCache`'s batch size argument: transformers 4.x sizes the cache by it, 5.x by the first update."""
    return {"max_batch_size": rows} if transformers.__version__.startswith("4.") else {}


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_classifier_free_guidance_has_a_text_only_unconditional_pass(family):
    """`guidance_scale`: the unconditional logits come from the prompt's last token (here `<image>`) and the generated
    ones alone, without images (a generated `<image>` too), as a by-hand loop of no-cache forwards computes them."""
    from .test_core import MEDIA, inputs, tiny_model

    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2, seq=9, images=3)
    ids[:, 4] = 5
    ids[:, -1] = MEDIA  # the unconditional pass starts from an <image> token; a generated one is the third image
    scale, new = 1.5, 4

    class ImageOnlyAtStepOne(ForceTokenAt):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return super().__call__(input_ids, scores.index_fill(-1, torch.tensor([MEDIA]), -float("inf")))

    force_image = ImageOnlyAtStepOne(MEDIA, 1, ids.shape[1])
    got = model.generate(
        input_ids=ids,
        pixel_values=pixel_values,
        guidance_scale=scale,
        logits_processor=LogitsProcessorList([force_image]),
        max_new_tokens=new,
        min_new_tokens=new,
    )
    sequence = ids
    with torch.no_grad():
        for _ in range(new):
            conditional = model(input_ids=sequence, pixel_values=pixel_values).logits[:, -1].log_softmax(-1)
            unconditional_ids = sequence[:, ids.shape[1] - 1 :]
            unconditional = model(input_ids=unconditional_ids, image_indices=torch.zeros_like(unconditional_ids))
            unconditional = unconditional.logits[:, -1].log_softmax(-1)
            scores = scale * (conditional - unconditional) + unconditional
            token = force_image(sequence, scores).argmax(-1, keepdim=True)
            sequence = torch.cat((sequence, token), dim=1)
    assert (sequence[:, ids.shape[1] + 1] == MEDIA).all()
    assert torch.equal(got, sequence)


@pytest.mark.parametrize("conditioning", ["sequence", "original_kv_cache"])
def test_continuing_from_an_image_cache_equals_continuing_with_the_images(conditioning):
    """`generate` continues a sequence from an LM cache with the `image_cache` of the forward that made it as it does
    with the images: a generated `<image>` is counted as there (`"sequence"`: as in the cache-less run), and an
    `<image>` beyond the cached images is refused."""
    from .test_core import EOC, MEDIA, inputs, tiny_model

    model = tiny_model("gpt_neox", generated_image_conditioning=conditioning)
    ids, pixel_values = inputs(batch=1)
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values=pixel_values, past_key_values=DynamicCache(), use_cache=True)
    name, lm_cache = lm_cache_of(first)
    continued = torch.cat((ids, torch.tensor([[5, 6]])), dim=1)
    force_image = LogitsProcessorList([ForceTokenAt(MEDIA, 1, continued.shape[1])])
    settings = dict(max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    runs = {
        "no cache": model.generate(
            input_ids=continued, pixel_values=pixel_values, use_cache=False, logits_processor=force_image, **settings
        ),
        "images": model.generate(
            input_ids=continued,
            pixel_values=pixel_values,
            **{name: copy.deepcopy(lm_cache)},
            logits_processor=force_image,
            **settings,
        ),
        "image_cache": model.generate(
            input_ids=continued,
            image_cache=first.image_cache,
            **{name: copy.deepcopy(lm_cache)},
            logits_processor=force_image,
            **settings,
        ),
    }
    # `"original_kv_cache"` decodes as `"sequence"` without a cache (the original's one forward per step)
    no_cache = runs.pop("no cache")
    expected = no_cache if conditioning == "sequence" else runs.pop("images")
    assert expected.sequences[0, continued.shape[1] + 1] == MEDIA
    for run, got in runs.items():
        assert torch.equal(got.sequences, expected.sequences), run
        for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"{run}, step {step}")
    beyond = torch.cat((ids, torch.tensor([[EOC, MEDIA, 5]])), dim=1)
    with pytest.raises(ValueError, match="has 3 <image> tokens but only 2 images"):
        model.generate(
            input_ids=beyond, image_cache=first.image_cache, max_new_tokens=2, **{name: copy.deepcopy(lm_cache)}
        )


@pytest.mark.parametrize("conditioning", ["sequence", "original_kv_cache"])
def test_generate_from_inputs_embeds_counts_a_generated_image_as_from_input_ids(conditioning):
    """With the prompt given as `inputs_embeds` (the generated tokens then make up all of `input_ids`), a generated
    `<image>` is counted as with `input_ids`; a text-only prompt stays text only, as with `input_ids`; and the images
    of an `image_cache` are placed by the `<image>` embeddings, as with `input_ids`."""
    from .test_core import MEDIA, inputs, tiny_model

    model = tiny_model("llama", generated_image_conditioning=conditioning)
    ids, pixel_values = inputs(batch=2, seq=6)
    embeds = model.get_input_embeddings()(ids)
    image_indices = model._image_indices(ids, pixel_values.shape[1])
    settings = dict(max_new_tokens=9, min_new_tokens=9, return_dict_in_generate=True, output_logits=True)
    for step in (1, 7):  # the generated <image> before and after as many tokens as the prompt's
        expected = model.generate(
            input_ids=ids,
            pixel_values=pixel_values,
            logits_processor=LogitsProcessorList([ForceTokenAt(MEDIA, step, ids.shape[1])]),
            **settings,
        )
        got = model.generate(
            inputs_embeds=embeds,
            pixel_values=pixel_values,
            image_indices=image_indices,
            logits_processor=LogitsProcessorList([ForceTokenAt(MEDIA, step, 0)]),
            **settings,
        )
        assert torch.equal(got.sequences, expected.sequences[:, ids.shape[1] :]), step
        for a, b in zip(got.logits, expected.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    text = ids.masked_fill(ids == MEDIA, 5)
    force_image = LogitsProcessorList([ForceTokenAt(MEDIA, 1, 0)])
    got = model.generate(inputs_embeds=model.get_input_embeddings()(text), logits_processor=force_image, **settings)
    force_image = LogitsProcessorList([ForceTokenAt(MEDIA, 1, text.shape[1])])
    expected = model.generate(input_ids=text, logits_processor=force_image, **settings)
    assert torch.equal(got.sequences, expected.sequences[:, text.shape[1] :])
    # images from an earlier call's `image_cache`, placed by the <image> embeddings as by the <image> ids
    image_cache = model(input_ids=ids, pixel_values=pixel_values).image_cache
    expected = model.generate(input_ids=ids, image_cache=image_cache, max_new_tokens=4, min_new_tokens=4)
    got = model.generate(inputs_embeds=embeds, image_cache=image_cache, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(got, expected[:, ids.shape[1] :])


def test_early_exit_self_speculation_is_refused_clearly():
    """transformers' early-exit candidates (`assistant_early_exit`) failed deep inside with an AttributeError."""
    from .test_core import inputs, tiny_model

    model = tiny_model("llama")
    ids, pixel_values = inputs(batch=1)
    with pytest.raises(ValueError, match="assistant_early_exit .* is not supported"):
        model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=2, assistant_early_exit=1)
    config = GenerationConfig(max_new_tokens=2, assistant_early_exit=1)
    with pytest.raises(ValueError, match="assistant_early_exit .* is not supported"):
        model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=config)
    with pytest.raises(ValueError, match="assistant_early_exit .* is not supported"):  # (AttributeError before)
        model.generate(ids, config, pixel_values=pixel_values)


def test_generate_reads_positional_arguments_as_their_keywords():
    """`generate(inputs, generation_config, logits_processor, ...)` by position, as `GenerationMixin.generate` takes
    them: the same tokens as by keyword (the checks and the image bookkeeping read them either way), and Python's
    errors for a repeated or an extra argument."""
    from .test_core import MEDIA as MEDIA_ID
    from .test_core import PAD as PAD_ID
    from .test_core import inputs, tiny_model

    model = tiny_model("llama")
    ids, pixel_values = inputs(batch=2)
    config = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD_ID)
    processors = LogitsProcessorList([ForceTokenAt(MEDIA_ID, 1, ids.shape[1])])
    expected = model.generate(
        input_ids=ids, generation_config=config, logits_processor=processors, pixel_values=pixel_values
    )
    assert (expected[:, ids.shape[1] + 1] == MEDIA_ID).all()
    assert torch.equal(model.generate(ids, config, processors, pixel_values=pixel_values), expected)
    assert torch.equal(model.generate(inputs=ids, generation_config=config, logits_processor=processors,
                                      pixel_values=pixel_values), expected)  # fmt: skip
    with pytest.raises(TypeError, match="multiple values for argument 'generation_config'"):
        model.generate(ids, config, generation_config=config, pixel_values=pixel_values)
    with pytest.raises(TypeError, match="too many positional arguments"):
        model.generate(ids, config, processors, None, None, None, None, None, None, None, None, None, None, None)
    # the images by position (as the original's `generate(vision_x, lang_x)`) land on `generation_config`: say so
    for args in ((ids, pixel_values), (pixel_values, ids)):
        with pytest.raises(ValueError, match=r"generate\(input_ids=lang_x, pixel_values=vision_x\)"):
            model.generate(*args, max_new_tokens=2)


def test_a_text_only_conversation_continues_after_a_generated_image_with_image_indices():
    """Continuing from a cache, `<image>` tokens without images are refused (they may be the prompt's); the error
    says how to continue a text-only conversation whose model generated one, and that way gives the cache-less run."""
    from .test_core import MEDIA, tiny_model

    model = tiny_model("mpt")
    ids = torch.tensor([[7, 8, 9, 10]])
    out = model.generate(
        input_ids=ids,
        max_new_tokens=3,
        min_new_tokens=3,
        logits_processor=LogitsProcessorList([ForceTokenAt(MEDIA, 1, ids.shape[1])]),
        return_dict_in_generate=True,
    )
    name, cache = lm_cache_of(out)
    continued = torch.cat((out.sequences, torch.tensor([[5]])), dim=1)
    with pytest.raises(ValueError, match=r"pass image_indices=torch.zeros_like\(input_ids\)"):
        model.generate(input_ids=continued, max_new_tokens=2, **{name: copy.deepcopy(cache)})
    text_only = torch.zeros_like(continued)
    got = model.generate(
        input_ids=continued, image_indices=text_only, max_new_tokens=3, min_new_tokens=3, **{name: copy.deepcopy(cache)}
    )
    assert torch.equal(
        got, model.generate(input_ids=continued, image_indices=text_only, max_new_tokens=3, min_new_tokens=3)
    )


def test_a_generated_image_token_beyond_the_images_is_scored_with_image_indices():
    """A sequence from `generate` may hold a generated `<image>` with no image of its own. `forward` refuses to count
    it from `input_ids` alone (more `<image>` tokens than images) and says how to run it: `image_indices`, with which
    the logits are those that `generate` decoded with (`"sequence"`: beyond the images, every latent equally)."""
    from .test_core import MEDIA, inputs, tiny_model

    model = tiny_model("gpt_neox")
    ids, pixel_values = inputs(batch=1)
    prompt = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=1, min_new_tokens=1)
    sequence = torch.cat((prompt, torch.tensor([[MEDIA, 5]])), dim=1)
    with pytest.raises(ValueError, match=r"pass `image_indices` \(batch, seq\)"):
        model(input_ids=sequence, pixel_values=pixel_values)
    image_indices = (sequence == MEDIA).cumsum(dim=-1)  # the generated <image>: image 3 of 2, every latent
    logits = model(input_ids=sequence, pixel_values=pixel_values, image_indices=image_indices).logits
    generated = model.generate(
        input_ids=sequence[:, :-1],
        pixel_values=pixel_values,
        max_new_tokens=1,
        min_new_tokens=1,
        output_logits=True,
        return_dict_in_generate=True,
        image_indices=image_indices[:, :-1],
    )
    torch.testing.assert_close(generated.logits[0][0], logits[0, -2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_inputs_embeds_alone_place_the_images_by_the_image_embedding(family):
    """`inputs_embeds` without `input_ids` or `image_indices` (a soft prompt's, e.g. PEFT's prompt tuning): the images
    go where the positions hold the `<image>` token's embedding, as transformers' vision-language models place them;
    the forward and `generate` (greedy, beams) give what they give for the ids. Without such a position, or with
    more of them than images, a clear error."""
    from .test_core import MEDIA, PAD, inputs, tiny_model

    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2, seq=10)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2], ids[0, 2] = PAD, 0, MEDIA
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits
        got = model(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for num_beams in (1, 3):
        kw = dict(attention_mask=mask, pixel_values=pixel_values, max_new_tokens=5, min_new_tokens=5)
        expected = model.generate(input_ids=ids, num_beams=num_beams, **kw)
        assert torch.equal(model.generate(inputs_embeds=embeds, num_beams=num_beams, **kw), expected[:, -5:])
    text = model.get_input_embeddings()(ids.masked_fill(ids == MEDIA, 5))
    with pytest.raises(ValueError, match="no position of inputs_embeds holds the <image> token's embedding"):
        model(inputs_embeds=text, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="has 2 <image> tokens but only 1 images"):
        model(inputs_embeds=embeds, pixel_values=pixel_values[:, :1])


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_input_ids_and_the_embeddings_of_them(num_beams):
    """`generate(input_ids=..., inputs_embeds=...)` (transformers takes both: the embeddings feed the prompt, the ids
    come back in the output): the images are placed by the `<image>` tokens of `input_ids`, as without the
    embeddings."""
    from .test_core import inputs, tiny_model

    model = tiny_model("llama")
    ids, pixel_values = inputs(batch=2)
    kw = {"pixel_values": pixel_values, "max_new_tokens": 5, "min_new_tokens": 5, "num_beams": num_beams}
    expected = model.generate(input_ids=ids, **kw)
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model.generate(input_ids=ids, inputs_embeds=embeds, **kw), expected)
    # ids that are not those embedded (a soft prompt's fewer): an attention mask for the embedded positions is needed,
    # and the images are placed by the <image> embeddings
    with pytest.raises(ValueError, match=r"inputs_embeds hold 10 positions and input_ids 9: pass an attention"):
        model.generate(input_ids=ids[:, 1:], inputs_embeds=embeds, **kw)
    mask = torch.ones_like(ids)
    got = model.generate(input_ids=ids[:, 1:], inputs_embeds=embeds, attention_mask=mask, **kw)
    assert torch.equal(got[:, -5:], expected[:, -5:])


@needs_flex_with_static_cache
@pytest.mark.parametrize("family", FLEX_FAMILIES)
def test_flex_attention_with_a_static_cache_generates_as_sdpa(family):
    """With flex attention and a compileable cache, `generate` gives the model a flex `BlockMask`, not a tensor: it
    goes to the LM unchecked (reading its shape failed with AttributeError), and the LM gets that mask.

    The tokens are compared with SDPA's on CUDA only (OPENFLAMINGO_TEST_DEVICE=cuda): torch 2.13's compiled flex
    attention on the CPU gives different numbers from run to run, NaN among them, for a bare `LlamaForCausalLM` too
    (static cache or none, once it has recompiled for the decoding shapes)."""
    from torch.nn.attention.flex_attention import BlockMask

    from .test_core import flex_text_config, inputs, tiny_model

    device = torch.device(os.environ.get("OPENFLAMINGO_TEST_DEVICE", "cpu"))
    flex = tiny_model(family, text_config=flex_text_config(family), attn_implementation="flex_attention").to(device)
    sdpa = tiny_model(family, text_config=flex_text_config(family)).to(device)
    ids, pixel_values = (tensor.to(device) for tensor in inputs(seq=6))
    mask = torch.ones_like(ids)
    masks_given = []
    flex.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks_given.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 402, "eos_token_id": 400}
    expected = sdpa.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **kwargs)
    given = flex.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values, cache_implementation="static", **kwargs
    )
    assert given.shape == expected.shape and torch.equal(given[:, : ids.shape[1]], ids)
    assert len(masks_given) == 3 and all(isinstance(given_mask, BlockMask) for given_mask in masks_given)
    if device.type == "cuda":
        assert torch.equal(given, expected)


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_mpt_positions_beyond_max_seq_len_are_refused_clearly(family):
    """MPT / MosaicGPT build their ALiBi bias for `max_seq_len` keys: more positions (the input, the cache and the
    input, or a prompt plus its new tokens) are a clear error before anything runs, not a shape error deep in the
    attention; raising `max_seq_len` extends the bias (ALiBi extrapolates) without changing shorter inputs' logits."""
    from transformers import DynamicCache

    from .test_core import PAD, inputs, tiny_model

    model = tiny_model(family)
    limit = model.config.text_config.max_seq_len
    ids, pixel_values = inputs(batch=2, seq=limit + 1, images=2)
    with pytest.raises(ValueError, match=f"The input is {limit + 1} positions, more than .* max_seq_len of {limit}"):
        model(input_ids=ids, pixel_values=pixel_values)
    fitting = model(input_ids=ids[:, :limit], pixel_values=pixel_values).logits
    assert fitting.shape[1] == limit
    # a cache and new tokens: counted where the keys meet the bias
    prompt = ids[:, : limit - 4]
    cache = model(input_ids=prompt, pixel_values=pixel_values, past_key_values=DynamicCache(), use_cache=True)
    more = ids[:, limit - 4 : limit + 1]
    with pytest.raises(ValueError, match=f"key length \\(cache included\\) is {limit + 1} positions"):
        model(
            input_ids=more,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache.past_key_values,
            image_cache=cache.image_cache,
        )
    # generate: before decoding, with either cache (4.x's MPT has no static one), for max_new_tokens or max_length
    kw = {"input_ids": prompt, "pixel_values": pixel_values, "do_sample": False, "pad_token_id": PAD}
    static = [] if transformers.__version__.startswith("4.") else [{"cache_implementation": "static"}]
    for extra in ({}, *static):
        prompt_plus_new = rf"The prompt \({limit - 4}\) plus max_new_tokens is {limit + 1} positions"
        with pytest.raises(ValueError, match=prompt_plus_new):
            model.generate(**kw, max_new_tokens=5, **extra)
        assert model.generate(**kw, max_new_tokens=4, min_new_tokens=4, **extra).shape == (2, limit)
    with pytest.raises(ValueError, match=f"max_length is {limit + 6} positions"):
        model.generate(**kw, max_length=limit + 6)
    # no length given: transformers' default of 20 new tokens (4.x: its config's max_length=20, read as new tokens)
    with pytest.raises(
        ValueError, match=rf"The prompt \({limit - 4}\) plus the default 20 new tokens is {limit + 16} "
    ):
        model.generate(**kw)
    assert model.generate(
        input_ids=ids[:, : limit - 20], pixel_values=pixel_values, do_sample=False, pad_token_id=PAD, min_new_tokens=20
    ).shape == (2, limit)
    with pytest.raises(ValueError, match=f"max_length is {limit + 6} positions"):
        model.generate(**kw, max_length=limit + 6, max_new_tokens=None)  # (None: unset, as `generate` reads it)
    # the remedy the error names
    model.config.text_config.max_seq_len = 2 * limit
    assert model(input_ids=ids, pixel_values=pixel_values).logits.shape[1] == limit + 1
    torch.testing.assert_close(model(input_ids=ids[:, :limit], pixel_values=pixel_values).logits, fitting)


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_a_given_generation_config_is_read_with_the_models_defaults(family):
    """`generate(generation_config=...)`: transformers (>= 4.50) takes the fields that the given config leaves unset
    from the model's `generation_config`, and the checks before decoding read the same settings. The MPT length check
    read the given config alone: with the model's `max_new_tokens` it refused a prompt that fits (for transformers'
    default of 20 new tokens), and let through one that does not (decoding up to an error in the forward)."""
    from .test_core import inputs, tiny_model

    model = tiny_model(family)
    limit = model.config.text_config.max_seq_len
    ids, pixel_values = inputs(batch=1, seq=limit - 14, images=2)
    model.generation_config.max_new_tokens = 5
    expected = model.generate(input_ids=ids, pixel_values=pixel_values, num_beams=2)
    got = model.generate(input_ids=ids, pixel_values=pixel_values, generation_config=GenerationConfig(num_beams=2))
    assert got.shape[1] == limit - 9
    assert torch.equal(got, expected)
    model.generation_config.max_new_tokens = 40
    short = ids[:, : limit - 34]
    with pytest.raises(ValueError, match=rf"The prompt \({limit - 34}\) plus max_new_tokens is {limit + 6} positions"):
        model.generate(input_ids=short, pixel_values=pixel_values, generation_config=GenerationConfig(num_beams=2))


def test_token_healing_with_images_is_refused(loaded, tiny_images):
    """transformers' token healing decodes the prompt with `skip_special_tokens=True` and tokenizes the text again:
    the `<image>` tokens were dropped and `generate` went on without placing the images (a silent wrong answer)."""
    model, processor = loaded("tiny-llama")
    inputs = processor(images=[tiny_images[:2]], text=["<image>Output:a cat<|endofchunk|><image>Output: htt"])
    with pytest.raises(ValueError, match="token_healing with images is not supported"):
        model.generate(**inputs, max_new_tokens=3, token_healing=True, tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="token_healing with images is not supported"):
        model.generate(
            **inputs,
            max_new_tokens=3,
            tokenizer=processor.tokenizer,
            generation_config=GenerationConfig(token_healing=True, max_new_tokens=3),
        )
