"""Folders saved under one transformers major load, exactly, under the other (and the same one).

`tests/fixtures/saved/by-transformers-{4,5}/` hold the tiny GPT-NeoX (rotary settings, untied head) and MosaicGPT
(QK-LayerNorm, tied embeddings) fixtures as converted by transformers 4.57.6 and 5.24.0 with the converter of
abef94d, and `by-transformers-5.25/` the same by 5.25.0 with a later converter (the config's `eos_token_id` and
`generated_image_conditioning`, sub-config dtypes left unset), and `rope-*/` configs alone of LMs with scaled rotary
embeddings, saved by 5.25.0. The traps they guard against:
4.x reading 5.x's `rope_parameters` (it falls back to `rotary_pct=0.25`), 4.x's `CLIPVisionModel` nesting its weights
under `vision_model.`, and 5.x tokenizer configs (`TokenizersBackend`, a list of `extra_special_tokens`).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, GPTNeoXConfig, LlamaConfig

from modeling_openflamingo import OpenFlamingoConfig

from .conftest import FIXTURES

SAVED = FIXTURES / "saved"
IS_V4 = transformers.__version__.startswith("4.")


def _tiny_lm(config_class: type, **rotary: object) -> object:
    """A tiny LM config of `config_class` (the tests' sizes) with the given rotary settings."""
    sizes = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 4, "intermediate_size": 64}
    return config_class(**sizes, vocab_size=403, **rotary)


# LMs with other rotary settings than the default, as transformers takes them on either major (legacy keywords)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ROPE_SCALED_LMS = {
    "rope-llama-linear": lambda: _tiny_lm(
        LlamaConfig, rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}
    ),
    "rope-llama-llama3": lambda: _tiny_lm(
        LlamaConfig, max_position_embeddings=256, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)
    ),
    "rope-neox-linear": lambda: _tiny_lm(
        GPTNeoXConfig, rotary_pct=0.5, rotary_emb_base=20000, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
}


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


def _rotary_embedding(text_config) -> torch.nn.Module:
    """The LM's own rotary embedding module, built from `text_config` as its model builds it."""
    if text_config.model_type == "llama":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as rotary
    else:
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding as rotary
    return rotary(config=text_config)


@pytest.mark.parametrize("name", list(ROPE_SCALED_LMS))
def test_a_folder_saved_by_5x_keeps_its_rotary_settings(name):
    """transformers 5.x writes rotary settings as `rope_parameters` only, which 4.x ignores: a scaled rope (any type),
    its `rope_theta` and GPT-NeoX's `rotary_pct` / `rotary_emb_base` fell back to 4.x's defaults (logits off by ~15,
    without a word). The config also writes the keys 4.x reads. The fixture is a config saved by 5.25.0: on either
    major its LM computes the rotary embedding of the same LM configured natively there."""
    from .test_core import tiny_config

    path = SAVED / "by-transformers-5.25" / name
    if not IS_V4:  # the fixture is what this code writes now
        written = tiny_config(text_config=ROPE_SCALED_LMS[name]()).to_dict()["text_config"]
        saved = OpenFlamingoConfig.from_pretrained(path).to_dict()["text_config"]
        keys = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rotary_pct")
        assert {k: written.get(k) for k in keys} == {k: saved.get(k) for k in keys}
    loaded = OpenFlamingoConfig.from_pretrained(path).text_config
    native = ROPE_SCALED_LMS[name]()
    positions = torch.arange(300)[None]
    hidden = torch.zeros(1, 300, 32)
    expected, got = _rotary_embedding(native), _rotary_embedding(loaded)
    torch.testing.assert_close(got.inv_freq, expected.inv_freq, rtol=0, atol=0)
    for a, b in zip(got(hidden, positions), expected(hidden, positions), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(IS_V4, reason="transformers 5.x's form of the rotary settings (rope_parameters)")
def test_longrope_writes_its_original_length_where_4x_reads_it():
    """4.x's longrope reads `original_max_position_embeddings` from the config, not from `rope_scaling` (it failed
    to load a folder whose 5.x `rope_parameters` held it)."""
    from .test_core import tiny_config

    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16}
    factors = {"long_factor": [2.0, 2.1, 2.2, 2.3], "short_factor": [1.0, 1.1, 1.2, 1.3]}
    lm = _tiny_lm(LlamaConfig, max_position_embeddings=64, rope_parameters={**longrope, **factors})
    text = tiny_config(text_config=lm).to_dict()["text_config"]
    assert text["original_max_position_embeddings"] == 16
    assert text["rope_scaling"] == {**factors, "rope_type": "longrope", "original_max_position_embeddings": 16}


@pytest.mark.parametrize("saved_by", ["by-transformers-4", "by-transformers-5.25"])
def test_pipeline_of_a_saved_folder_asks_nothing(saved_by):
    """transformers 5's pipeline looks up a video processor for every image-text model; a 4.x-saved folder's
    top-level image-processor `auto_map` read as remote code made it ask "Do you wish to run the custom code? [y/N]"
    (and wait 15 s for an answer). With the package imported nothing is asked, on either major."""
    import subprocess
    import sys

    script = (
        "import modeling_openflamingo\n"
        "from PIL import Image\n"
        "from transformers import pipeline\n"
        f"pipe = pipeline('image-text-to-text', model={str(SAVED / saved_by / 'tiny-neox')!r})\n"
        "out = pipe(text='<image>A photo of', images=[Image.new('RGB', (40, 30))], max_new_tokens=2)\n"
        "print('OK', out[0]['input_text'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK <image>A photo of" in done.stdout
    assert "custom code" not in done.stdout + done.stderr, done.stdout + done.stderr
