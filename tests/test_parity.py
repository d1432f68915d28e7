"""Parity with the original implementation (open_flamingo 2.0.1) on the four tiny reference families and on the
fixtures of a sweep against it (other seeds, layer intervals, LM settings and image modes)."""

from __future__ import annotations

import pytest
import torch

from .conftest import FAMILIES, SWEEP, fixture_images


@pytest.mark.parametrize("family", [*FAMILIES, *SWEEP])
def test_logits_and_loss_match_reference(family, loaded, reference):
    model, _ = loaded(family)
    _, ref = reference(family)
    with torch.no_grad():
        right = model(
            input_ids=ref["input_ids_right"],
            attention_mask=ref["attention_mask_right"],
            pixel_values=ref["vision_x"],
            labels=ref["labels_right"],
        )
        left = model(
            input_ids=ref["input_ids_left"], attention_mask=ref["attention_mask_left"], pixel_values=ref["vision_x"]
        )
    torch.testing.assert_close(right.logits, ref["logits_right"], atol=1e-4, rtol=0)
    # Left padding: every real token is compared. The logits AT the padding positions are the outputs of queries whose
    # every key is masked; their values come from each transformers version's mask arithmetic (4.33's GPT-NeoX and
    # LLaMA add two finfo.min masks into -inf), influence no real token, and are not part of the model's semantics.
    real = ref["attention_mask_left"].bool()
    torch.testing.assert_close(left.logits[real], ref["logits_left"][real], atol=1e-4, rtol=0)
    torch.testing.assert_close(right.loss, ref["loss_right"].reshape(()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", [*FAMILIES, *SWEEP])
def test_processor_reproduces_reference_inputs(family, loaded, reference, tiny_images):
    _, processor = loaded(family)
    spec, ref = reference(family)
    every_image = fixture_images(family, tiny_images)
    each = processor.image_processor(every_image, return_tensors="pt")["pixel_values"]  # the original's transform
    torch.testing.assert_close(each.reshape(ref["pixel_values"].shape), ref["pixel_values"], atol=1e-6, rtol=0)
    images = [[every_image[i] for i in row] for row in spec["vision_x_image_order"]]
    left = processor(images=images, text=spec["prompts"])
    assert torch.equal(left["input_ids"], ref["input_ids_left"])
    assert torch.equal(left["attention_mask"], ref["attention_mask_left"])
    torch.testing.assert_close(left["pixel_values"], ref["vision_x"].squeeze(2), atol=1e-6, rtol=0)
    right = processor(images=images, text=spec["prompts"], return_labels=True)
    assert torch.equal(right["input_ids"], ref["input_ids_right"])
    # the first position is not a target here (nothing predicts it), whatever its token: the loss never reads it
    assert (right["labels"][:, 0] == -100).all()
    assert torch.equal(right["labels"][:, 1:], ref["labels_right"][:, 1:])
    assert processor.image_token_id == spec["media_token_id"]
    assert processor.end_of_chunk_token_id == spec["eoc_token_id"]
    assert processor.tokenizer.pad_token_id == spec["pad_token_id"]
