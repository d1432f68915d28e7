"""Folders saved under one transformers major load, exactly, under the other (and the same one).

`tests/fixtures/saved/by-transformers-{4,5}/` hold the tiny GPT-NeoX (rotary settings, untied head) and MosaicGPT
(QK-LayerNorm, tied embeddings) fixtures as converted by transformers 4.57.6 and 5.24.0 with the converter of
abef94d, and `by-transformers-5.25/` the same by 5.25.0 with a later converter (the config's `eos_token_id` and
`generated_image_conditioning`, sub-config dtypes left unset). The traps they guard against:
4.x reading 5.x's `rope_parameters` (it falls back to `rotary_pct=0.25`), 4.x's `CLIPVisionModel` nesting its weights
under `vision_model.`, and 5.x tokenizer configs (`TokenizersBackend`, a list of `extra_special_tokens`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from .conftest import FIXTURES

SAVED = FIXTURES / "saved"


@pytest.mark.parametrize("family", ["tiny-neox", "tiny-mpt-1b-redpajama-200b"])
@pytest.mark.parametrize("saved_by", ["by-transformers-4", "by-transformers-5", "by-transformers-5.25"])
def test_saved_folder_loads_exactly(saved_by, family, reference, tiny_images):
    path = SAVED / saved_by / family
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = AutoProcessor.from_pretrained(path)
    spec, ref = reference(family)
    images = [[tiny_images[i] for i in row] for row in spec["vision_x_image_order"]]
    batch = processor(images=images, text=spec["prompts"], return_labels=True)
    assert torch.equal(batch["input_ids"], ref["input_ids_right"])
    with torch.no_grad():
        out = model.eval()(**batch)
    torch.testing.assert_close(out.logits, ref["logits_right"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref["loss_right"].reshape(()), atol=1e-5, rtol=0)
