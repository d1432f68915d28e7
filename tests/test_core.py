"""Config, model, processor and Auto-class behaviour of the core (no reference outputs needed)."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPVisionConfig,
    DynamicCache,
    GPTNeoXConfig,
    LlamaConfig,
    MptConfig,
    PretrainedConfig,
    PreTrainedModel,
    modeling_utils,
)

from modeling_openflamingo import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration
from modeling_openflamingo.modeling_openflamingo import (
    _ACTIVE_CROSS_ATTENTION,
    OpenFlamingoGatedCrossAttentionBlock,
    add_mpt_qk_layernorm,
    cross_attention_mask,
    find_decoder_layers,
)

from .conftest import byte_level_processor, lm_cache_of, seeded

IS_V4 = transformers.__version__.startswith("4.")
MEDIA, EOC, PAD = 401, 400, 402


def tiny_vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=8,
        image_size=32,
        hidden_act="quick_gelu",
    )


TEXT_CONFIGS = {  # each LM config with keyword overrides of its defaults
    "mpt": lambda **kw: MptConfig(
        **{"d_model": 32, "n_heads": 4, "n_layers": 4, "vocab_size": 403, "max_seq_len": 64, **kw}
    ),
    "mosaic_gpt": lambda **kw: TEXT_CONFIGS["mpt"](attn_config={"qk_ln": True}, **kw),
    "gpt_neox": lambda **kw: GPTNeoXConfig(
        **{
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_hidden_layers": 4,
            "intermediate_size": 64,
            "vocab_size": 403,
            "rotary_pct": 1.0,
            "use_parallel_residual": False,
            **kw,
        }
    ),
    "llama": lambda **kw: LlamaConfig(
        **{
            "hidden_size": 32,
            "num_attention_heads": 4,
            "num_hidden_layers": 4,
            "intermediate_size": 64,
            "vocab_size": 403,
            **kw,
        }
    ),
}
# the families whose transformers LMs take flex attention (MPT's do not)
FLEX_FAMILIES = ["llama", "gpt_neox"]


def flex_text_config(family: str) -> PretrainedConfig:
    """`family`'s tiny LM with heads of 16 dimensions (2 of them), the least that CUDA's flex attention kernel takes."""
    return TEXT_CONFIGS[family](num_attention_heads=2)


def tiny_config(family: str = "mpt", n: int = 2, text_config: object = None, **kwargs) -> OpenFlamingoConfig:
    """The tiny OpenFlamingo config of `family`'s LM (or of `text_config`, an LM config of another family)."""
    return OpenFlamingoConfig(
        vision_config=tiny_vision(),
        text_config=text_config if text_config is not None else TEXT_CONFIGS[family](),
        cross_attn_every_n_layers=n,
        perceiver_depth=2,
        perceiver_num_latents=4,
        media_token_id=MEDIA,
        eoc_token_id=EOC,
        pad_token_id=PAD,
        **kwargs,
    )


def mpt_attention_classes(family: str) -> dict[str, type]:
    """The class MPT's attention runs as per `attn_implementation`: MosaicGPT's (QK-LayerNorm) are classes of their
    own (`OpenFlamingoMosaicGPTAttention`)."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    from modeling_openflamingo.modeling_openflamingo import (
        OpenFlamingoMosaicGPTAttention,
        OpenFlamingoMosaicGPTSdpaAttention,
        OpenFlamingoMptSdpaAttention,
    )

    if family == "mosaic_gpt":
        return {"sdpa": OpenFlamingoMosaicGPTSdpaAttention, "eager": OpenFlamingoMosaicGPTAttention}
    return {"sdpa": OpenFlamingoMptSdpaAttention, "eager": MptAttention}


def tiny_model(family: str = "mpt", n: int = 2, seed: int = 0, **kwargs) -> OpenFlamingoForConditionalGeneration:
    """A tiny model whose gates are open (random), so cross-attention changes the outputs."""
    torch.manual_seed(seed)
    model = OpenFlamingoForConditionalGeneration(tiny_config(family, n, **kwargs)).eval()
    with torch.no_grad():
        for block in model.gated_cross_attn_layers.values():
            block.attn_gate.normal_()
            block.ff_gate.normal_()
    return model


def inputs(batch: int = 2, seq: int = 10, images: int = 2, seed: int = 0):
    g = seeded(seed)
    ids = torch.randint(0, 400, (batch, seq), generator=g)
    ids[:, 0] = MEDIA
    ids[:, seq // 2] = MEDIA
    pixel_values = torch.randn(batch, images, 3, 32, 32, generator=g)
    return ids, pixel_values


# ---- config ----


def test_transformers_releases_known_not_to_work_are_refused_at_import():
    """5.0-5.17 (and anything before 4.57) fail in many places (5.0 loaded the vision tower's weights under the wrong
    names; 5.4-5.17's image processors need torchvision): importing the package says so instead. The requirement
    that pip reads is the same one."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from modeling_openflamingo.configuration_openflamingo import TRANSFORMERS_REQUIREMENT, check_transformers_version

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    (required,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "transformers"]
    assert required.specifier == SpecifierSet(TRANSFORMERS_REQUIREMENT)
    assert required.specifier.contains(transformers.__version__)  # (this run's)
    for works in ("4.57.0", "4.57.6", "5.18.0", "5.22.2", "5.25.0", "5.26.0.dev0", "6.0.0"):
        check_transformers_version(works)
    for fails in ("4.56.2", "5.0.0", "5.3.0", "5.10.4", "5.17.0"):
        with pytest.raises(ImportError, match=rf"needs transformers 4.57.x or 5.18 and newer .* {fails}\."):
            check_transformers_version(fails)
    assert not required.specifier.contains("6.0.0")  # (pip: nothing is known of the next major)


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_config_round_trip(family, tmp_path):
    config = tiny_config(family, n=2)
    again = OpenFlamingoConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OpenFlamingoConfig)
    assert loaded.text_config.model_type == config.text_config.model_type
    assert loaded.cross_attn_layer_indices == [1, 3]
    assert (loaded.media_token_id, loaded.eoc_token_id, loaded.pad_token_id) == (MEDIA, EOC, PAD)
    if family == "mosaic_gpt":
        assert loaded.text_config.attn_config.qk_ln is True


def test_a_folder_whose_lm_this_transformers_does_not_know_says_so(tmp_path):
    """A folder saved by a transformers that knows its LM (a newer release), loaded by one that does not: the error
    names the LM config's model type and the release that saved the folder, not a list of every model type."""
    tiny_config("llama").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"]["model_type"] = "no_such_lm"
    saved["transformers_version"] = "9.1.0"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for load in (AutoConfig.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        with pytest.raises(ValueError) as error:
            load(tmp_path)
        message = str(error.value)
        assert f"model_type 'no_such_lm', which this transformers ({transformers.__version__}) has no config" in message
        assert "(the config was saved by transformers 9.1.0)" in message and len(message) < 400, message


@pytest.mark.parametrize(("n", "expected"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3]), (3, [2])])
def test_cross_attn_layer_placement(n, expected):
    model = OpenFlamingoForConditionalGeneration(tiny_config("llama", n))
    assert model.config.cross_attn_layer_indices == expected
    assert sorted(int(k) for k in model.gated_cross_attn_layers) == expected
    layers = find_decoder_layers(model.language_model, 4)
    assert [i for i, layer in enumerate(layers) if hasattr(layer, "flamingo_layer_idx")] == expected


def test_config_errors():
    with pytest.raises(ValueError, match="model_type"):
        OpenFlamingoConfig(text_config={"hidden_size": 4})
    # MosaicGPT's own config (no transformers class; transformers' error listed every model type it knows)
    with pytest.raises(ValueError, match=r"MosaicGPT config .*mosaic_gpt_to_mpt_config\(config_dict\)"):
        OpenFlamingoConfig(text_config={"model_type": "mosaic_gpt", "d_model": 32, "n_heads": 4, "n_layers": 2})
    # an LM model type this transformers does not know: named as the LM's (transformers' own error listed every model
    # type it knows, `openflamingo` among them, without saying which config named the unknown one)
    with pytest.raises(ValueError, match=r"^`text_config` is a language model of model_type 'no_such_lm', which this "):
        OpenFlamingoConfig(text_config={"model_type": "no_such_lm", "hidden_size": 4})
    # none at all: as a dict, or a bare PretrainedConfig (was told to install a transformers release that has it)
    for text_config in ({"hidden_size": 4}, PretrainedConfig()):
        with pytest.raises(ValueError, match=r"^`text_config` needs a `model_type` \(for example"):
            OpenFlamingoConfig(text_config=text_config)

    # config objects of an LM's remote code (`AutoConfig.from_pretrained(lm, trust_remote_code=True)`, as the
    # original's users load MPT-1B's): refused as their dicts are (they were taken, whatever their layer count, and
    # the model's `AutoModelForCausalLM.from_config` then asked to run the LM repository's code)
    class MosaicGPTConfig(PretrainedConfig):  # (MPT-1B's configuration_mosaic_gpt.py: no attribute_map)
        model_type = "mosaic_gpt"

    class MPTConfig(PretrainedConfig):  # (MPT-7B's configuration_mpt.py: transformers' model type, its own class)
        model_type = "mpt"

    with pytest.raises(ValueError, match=r"MosaicGPT config .*mosaic_gpt_to_mpt_config\(config_dict\)"):
        OpenFlamingoConfig(text_config=MosaicGPTConfig(n_layers=4), cross_attn_every_n_layers=9)
    with pytest.raises(
        ValueError, match=r"is a .*\.MPTConfig \(remote code\?\), not transformers' MptConfig .*lm_config_from_dict"
    ):
        OpenFlamingoConfig(text_config=MPTConfig(n_layers=4))
    with pytest.raises(ValueError, match="cross_attn_every_n_layers"):
        OpenFlamingoConfig(cross_attn_every_n_layers=0)
    # more than the LM's layers would build no gated block at all (images silently ignored); not an int
    for n in (5, 1.5, "2"):
        with pytest.raises(ValueError, match=r"must be an int in 1\.\.4"):
            tiny_config("mpt", n=n)
    # shapes that would fail later in a reshape, or build empty layers
    for name, value in (("perceiver_num_latents", 0), ("cross_attn_heads", 0), ("perceiver_depth", 2.0)):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive int; got {value!r}"):
            OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), **{name: value})
    # numpy integers are ints (and the config stays JSON-serializable)
    sizes = {"cross_attn_every_n_layers": np.int64(2), "perceiver_depth": np.int32(3), "cross_attn_heads": np.int64(2)}
    config = OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), **sizes)
    assert {name: json.loads(config.to_json_string())[name] for name in sizes} == {k: int(v) for k, v in sizes.items()}
    # token ids outside the LM's embedding rows (403 in the tiny LMs) would fail in the embedding lookup (on CUDA as
    # a device-side assert)
    with pytest.raises(ValueError, match=r"`media_token_id` must be a token id in 0\.\.402 .*got 403"):
        OpenFlamingoConfig(text_config=TEXT_CONFIGS["llama"](), media_token_id=403, eoc_token_id=EOC)
    with pytest.raises(ValueError, match="`pad_token_id` must be a token id.*got -1"):
        OpenFlamingoConfig(text_config=TEXT_CONFIGS["gpt_neox"](), pad_token_id=-1)
    with pytest.raises(ValueError, match="`eos_token_id` must be a token id.*got 403"):
        OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), eoc_token_id=EOC, eos_token_id=[EOC, 403])
    with pytest.raises(ValueError, match="`media_token_id` and `eoc_token_id` are both"):
        OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), media_token_id=EOC, eoc_token_id=EOC)
    with pytest.raises(ValueError, match="`only_attend_immediate_media` must be True or False; got 'no'"):
        OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), only_attend_immediate_media="no")
    with pytest.raises(ValueError, match="must be a CLIP vision config.*'mpt'"):
        OpenFlamingoConfig(vision_config={"model_type": "mpt"})
    # numpy ids are ids; a whole CLIP config gives its vision tower
    config = OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), media_token_id=np.int64(MEDIA))
    assert config.media_token_id == MEDIA and type(config.media_token_id) is int
    clip = {"model_type": "clip", "vision_config": {"hidden_size": 32, "num_attention_heads": 4}, "text_config": {}}
    assert OpenFlamingoConfig(vision_config=clip).vision_config.hidden_size == 32
    assert (
        OpenFlamingoConfig(vision_config=CLIPConfig(vision_config=clip["vision_config"])).vision_config.hidden_size
        == 32
    )
    config = OpenFlamingoConfig(text_config=TEXT_CONFIGS["mpt"](), eoc_token_id=EOC, eos_token_id=np.int64(3))
    assert config.eos_token_id == 3 and type(config.eos_token_id) is int
    for name in ("text_config", "vision_config"):
        with pytest.raises(ValueError, match=f"`{name}` must be a .*Config or a dict; got int"):
            OpenFlamingoConfig(**{name: 42})
    # fields set after the config's __init__ (as `from_pretrained(path, **overrides)` does) are checked by the model
    config = tiny_config("mpt")
    config.cross_attn_every_n_layers = 10
    with pytest.raises(ValueError, match=r"must be an int in 1\.\.4"):
        OpenFlamingoForConditionalGeneration(config)


# ---- model semantics ----


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_native_parameter_names_and_closed_gates_equal_the_lm(family):
    torch.manual_seed(0)
    model = OpenFlamingoForConditionalGeneration(tiny_config(family)).eval()
    names = set(dict(model.named_parameters()))
    native = {"language_model." + n for n, _ in model.language_model.named_parameters()}
    assert native <= names
    if family in ("mpt", "mosaic_gpt"):
        assert "language_model.transformer.blocks.3.attn.Wqkv.weight" in names
    if family == "mosaic_gpt":
        assert "language_model.transformer.blocks.0.attn.q_ln.weight" in names
        assert "language_model.transformer.blocks.0.attn.k_ln.weight" in names
    ids, pixel_values = inputs()
    with torch.no_grad():
        flamingo = model(input_ids=ids, pixel_values=pixel_values).logits
        # The LM called on its own (no images in flight) runs without the blocks; with gates at 0 they are the identity.
        alone = model.language_model(input_ids=ids).logits
    torch.testing.assert_close(flamingo, alone, atol=1e-6, rtol=0)


def test_qk_layernorm_is_applied():
    model = tiny_model("mosaic_gpt")
    ids, pixel_values = inputs()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixel_values).logits
        model.language_model.transformer.blocks[0].attn.q_ln.weight.mul_(3.0)
        after = model(input_ids=ids, pixel_values=pixel_values).logits
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_mpt_sdpa_attention_equals_mpt_attention(family):
    """MPT's attention runs through SDPA (ALiBi and mask folded into one additive mask): the same logits and gradients
    as transformers' `MptAttention`, which an explicit `attn_implementation="eager"` keeps (with attention weights)."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    classes = mpt_attention_classes(family)
    model = tiny_model(family)
    attentions = [type(m) for m in model.modules() if isinstance(m, MptAttention)]
    assert attentions and set(attentions) == {classes["sdpa"]}
    explicit = OpenFlamingoForConditionalGeneration._from_config(model.config, attn_implementation="eager")
    assert {type(m) for m in explicit.modules() if isinstance(m, MptAttention)} == {classes["eager"]}
    eager = copy.deepcopy(model)  # the same model but for the class of MPT's attention
    for module in eager.modules():
        if isinstance(module, MptAttention):
            module.__class__ = MptAttention  # (MosaicGPT's QK-LayerNorm is in hooks: they stay)
    ids, pixel_values = inputs(batch=3, seq=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the first queries of row 1 see no key at all (and, as labels, are in the loss)
    mask[2, -3:] = 0  # right padding
    for m in (model, eager):
        m.train()  # dropout is 0: train mode changes nothing but the path taken
        with torch.no_grad():
            for block in m.gated_cross_attn_layers.values():  # open the gates, so the images count too
                block.attn_gate.fill_(0.5)
                block.ff_gate.fill_(0.5)
    outs = [m(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, labels=ids) for m in (model, eager)]
    torch.testing.assert_close(outs[0].logits, outs[1].logits, atol=2e-6, rtol=1e-5)
    outs[0].loss.backward()
    outs[1].loss.backward()
    grads = [dict((n, p.grad) for n, p in m.named_parameters() if p.grad is not None) for m in (model, eager)]
    assert grads[0].keys() == grads[1].keys() and any("Wqkv" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    explicit.load_state_dict(model.state_dict())
    with torch.no_grad():
        weights = explicit(input_ids=ids, pixel_values=pixel_values, output_attentions=True).attentions
    assert weights is not None and weights[0].shape == (3, 4, 12, 12)


def test_deepcopy_is_independent():
    import copy

    model = tiny_model("mosaic_gpt")
    ids, pixel_values = inputs()
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel_values).logits
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(input_ids=ids, pixel_values=pixel_values).logits, ref, atol=0, rtol=0)
        clone.language_model.transformer.blocks[0].attn.q_ln.weight.mul_(3.0)
        assert not torch.allclose(clone(input_ids=ids, pixel_values=pixel_values).logits, ref)
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixel_values).logits, ref, atol=0, rtol=0)


def test_no_state_left_on_modules_after_forward():
    model = tiny_model()
    before = {name: set(vars(module)) for name, module in model.named_modules()}
    ids, pixel_values = inputs()
    model(input_ids=ids, pixel_values=pixel_values)
    assert _ACTIVE_CROSS_ATTENTION.get() is None
    after = {name: set(vars(module)) for name, module in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        added = after[name] - before[name]
        assert not {a for a in added if not a.startswith("_qk_ln")}, (name, added)


def test_six_dim_pixel_values_equal_five_dim():
    model = tiny_model()
    ids, pixel_values = inputs()
    with torch.no_grad():
        five = model(input_ids=ids, pixel_values=pixel_values).logits
        six = model(input_ids=ids, pixel_values=pixel_values.unsqueeze(2)).logits
    torch.testing.assert_close(five, six, atol=0, rtol=0)


def test_gradients_reach_pixel_values_with_the_weights_frozen():
    """Frozen weights (the whole model, or the recipe's trainables) still pass the gradient to `pixel_values` that
    need one (saliency maps, adversarial images), as any PyTorch module does: the same gradient as with nothing
    frozen. Pixels that need none keep the frozen tower without gradients."""
    model = tiny_model()
    ids, pixel_values = inputs()

    def pixel_gradient() -> torch.Tensor:
        pixels = pixel_values.clone().requires_grad_(True)
        model(input_ids=ids, pixel_values=pixels).logits.float().square().sum().backward()
        return pixels.grad

    expected = pixel_gradient()
    assert expected is not None and bool(expected.abs().sum() > 0)
    for freeze in (lambda: model.requires_grad_(False), model.freeze_for_training):
        model.requires_grad_(True)
        freeze()
        torch.testing.assert_close(pixel_gradient(), expected)
    features = model.get_image_features(pixel_values)
    assert features.grad_fn is not None  # the Perceiver trains
    model.requires_grad_(False)
    assert model.get_image_features(pixel_values).grad_fn is None


def test_perceiver_attention_runs_sdpa_on_one_batch_dimension(monkeypatch):
    """The Perceiver's `(batch, images, ...)` inputs reach SDPA as 4-D tensors (its fused kernels take nothing else; a
    5-D input runs the math kernel), and the result is the original's per-image attention."""
    model = tiny_model()
    attention = model.perceiver.layers[0].attn
    media = torch.randn(2, 3, 17, 32, generator=seeded(1))
    latents = torch.randn(2, 3, 8, 32, generator=seeded(2))
    dims = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        dims.append((q.dim(), k.dim(), v.dim()))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        out = attention(media, latents)
        # the original's PerceiverAttention, written out
        x, lat = attention.norm_media(media), attention.norm_latents(latents)
        h = attention.heads
        q = attention.to_q(lat).unflatten(-1, (h, -1)).transpose(-3, -2)
        k, v = attention.to_kv(torch.cat((x, lat), dim=-2)).chunk(2, dim=-1)
        k, v = (t.unflatten(-1, (h, -1)).transpose(-3, -2) for t in (k, v))
        sim = torch.einsum("... i d, ... j d -> ... i j", q * q.shape[-1] ** -0.5, k)
        expected = attention.to_out(
            torch.einsum("... i j, ... j d -> ... i d", sim.softmax(-1), v).transpose(-3, -2).flatten(-2)
        )
    assert dims == [(4, 4, 4)]
    assert out.shape == (2, 3, 8, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    os.environ.get("OPENFLAMINGO_TEST_DEVICE", "cpu") != "cuda", reason="run with OPENFLAMINGO_TEST_DEVICE=cuda"
)
def test_perceiver_attention_runs_a_fused_kernel_on_cuda():
    """bf16, with SDPA's math kernel excluded: a fused kernel runs, and gives what the default choice gives."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from modeling_openflamingo.modeling_openflamingo import OpenFlamingoPerceiverAttention

    attention = OpenFlamingoPerceiverAttention(1024, 16, 64).cuda().bfloat16()
    media = torch.randn(8, 5, 256, 1024, device="cuda", dtype=torch.bfloat16)
    latents = torch.randn(8, 5, 64, 1024, device="cuda", dtype=torch.bfloat16)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.no_grad():
        default = attention(media, latents)
        with sdpa_kernel(fused):
            out = attention(media, latents)
    torch.testing.assert_close(out, default, atol=0, rtol=0)


def test_padding_images_are_never_attended():
    model = tiny_model()
    ids, pixel_values = inputs(images=3)
    ids[1, 5] = 7  # row 1 now has a single <image>: its images 2 and 3 are padding
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel_values).logits
        pixel_values[1, 1:] = torch.randn_like(pixel_values[1, 1:]) * 5
        changed = model(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(ref[1], changed[1], atol=0, rtol=0)
    with torch.no_grad():
        pixel_values[0, 1] = 0
        changed = model(input_ids=ids, pixel_values=pixel_values).logits
    assert not torch.allclose(ref[0], changed[0])  # row 0's second image is real


def test_tokens_see_only_their_latest_image():
    model = tiny_model()
    ids, pixel_values = inputs(batch=1, seq=10)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel_values).logits
        pixel_values[0, 1] += 1.0  # the second image: seen from position 5 on
        changed = model(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(ref[0, :5], changed[0, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(ref[0, 5:], changed[0, 5:])


def test_attend_to_all_previous_media_option():
    model = tiny_model(only_attend_immediate_media=False)
    ids, pixel_values = inputs(batch=1, seq=10)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel_values).logits
        pixel_values[0, 0] += 1.0  # the first image: now seen after the second image too
        changed = model(input_ids=ids, pixel_values=pixel_values).logits
    assert not torch.allclose(ref[0, 5:], changed[0, 5:])


def _original_masked_cross_attention(attn, x, latents, media_locations, only_attend_immediate_media):
    """open_flamingo 2.0.1's `MaskedCrossAttention.forward` (helpers.py), written out with this module's weights."""
    b, t_img, n, _ = latents.shape
    q = attn.to_q(attn.norm(x))
    k, v = attn.to_kv(latents.flatten(1, 2)).chunk(2, dim=-1)
    q, k, v = (z.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for z in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    text_time = media_locations.cumsum(dim=-1)
    media_time = (torch.arange(t_img) + 1).repeat_interleave(n)
    mask_op = torch.eq if only_attend_immediate_media else torch.ge
    text_to_media_mask = mask_op(text_time[:, None, :, None], media_time[None, None, None, :])
    sim = sim.masked_fill(~text_to_media_mask, -torch.finfo(sim.dtype).max)
    attn_weights = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    if only_attend_immediate_media:
        attn_weights = attn_weights.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("bhij,bhjd->bhid", attn_weights, v)
    return attn.to_out(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("only_attend_immediate_media", [True, False])
def test_cross_attention_equals_the_originals_formula(only_attend_immediate_media):
    """Tokens before a row's first image included: zero with only_attend_immediate_media, else the uniform average
    of every latent (padding images' too) that the original's fully masked softmax gives them; and tokens after more
    `<image>`s than images (as after an `<image>` the model generated): the uniform average with
    only_attend_immediate_media (no latent is that image's), every image without it."""
    model = tiny_model(only_attend_immediate_media=only_attend_immediate_media)
    ids, pixel_values = inputs(batch=2, seq=12, images=3)
    ids[0, 0], ids[0, 3] = 5, MEDIA  # row 0: text, then two images (and one padding image)
    ids[1, 0] = 5  # row 1: its images at 6, 8, 9 and a 4th <image> at 10 (3 images given)
    ids[1, 8] = ids[1, 9] = ids[1, 10] = MEDIA
    block = next(iter(model.gated_cross_attn_layers.values()))
    with torch.no_grad():
        latents = model.get_image_features(pixel_values)
        x = torch.randn(2, 12, model.config.text_config.hidden_size, generator=seeded(1))
        expected = _original_masked_cross_attention(block.attn, x, latents, ids == MEDIA, only_attend_immediate_media)
        key, value = block.attn.key_values(latents)
        image_indices = (ids == MEDIA).cumsum(-1)
        masks = cross_attention_mask(
            image_indices, key.shape[-2], model.config.perceiver_num_latents, only_attend_immediate_media
        )
        got = block.attn(x, key, value, *masks)
        # the uniform average by hand: every latent's value, equally weighted
        average = block.attn.to_out(value.mean(dim=-2).flatten(1)).unsqueeze(1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[0, :3] == 0).all() == only_attend_immediate_media
    if only_attend_immediate_media:  # row 1 after its 4th <image>
        torch.testing.assert_close(got[1, 10:], average[1].expand(2, -1))
    else:  # before the first image
        torch.testing.assert_close(got[:, 0], average[:, 0])
    # a negative index (not valid; the forward does not read the values) is as 0: finite, no NaN
    with torch.no_grad():
        latents_per_image = model.config.perceiver_num_latents
        as_zero = block.attn(
            x,
            key,
            value,
            *cross_attention_mask(0 * image_indices, key.shape[-2], latents_per_image, only_attend_immediate_media),
        )
        negative = block.attn(
            x,
            key,
            value,
            *cross_attention_mask(-1 - image_indices, key.shape[-2], latents_per_image, only_attend_immediate_media),
        )
    torch.testing.assert_close(negative, as_zero, rtol=0, atol=0)


def test_text_before_the_first_image_gets_no_cross_attention():
    model = tiny_model()
    ids, pixel_values = inputs(batch=1, seq=10)
    ids[0, 0] = 5  # first <image> is now at position 5
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixel_values[:, :1]).logits
        other = model(input_ids=ids, pixel_values=torch.randn_like(pixel_values[:, :1])).logits
    torch.testing.assert_close(ref[0, :5], other[0, :5], atol=0, rtol=0)


def test_text_only_forward_and_loss():
    model = tiny_model("llama")
    ids = torch.randint(0, 400, (2, 8), generator=seeded())
    out = model(input_ids=ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 403), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_loss_ignores_minus_100_and_supports_num_items_in_batch():
    model = tiny_model()
    ids, pixel_values = inputs()
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=ids, pixel_values=pixel_values, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 403)
    target = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=-100))
    summed = model(input_ids=ids, pixel_values=pixel_values, labels=labels, num_items_in_batch=torch.tensor(7))
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / 7
    torch.testing.assert_close(summed.loss, expected)


@contextmanager
def another_thread_compiling() -> Iterator[None]:
    """Hold a `torch.compile` session open in another thread (its backend waits) for the body of the `with`: while it
    lasts, `torch.compiler.is_compiling()` is true in every thread, this one's eager code included (torch 2.13+; before
    it only `torch.export` set the flag)."""
    started, release = threading.Event(), threading.Event()

    def waiting_backend(graph_module, example_inputs):
        started.set()
        release.wait(120)
        return graph_module.forward

    compiled = torch.compile(lambda x: x * 2 + 1, backend=waiting_backend)
    thread = threading.Thread(target=compiled, args=(torch.ones(3),))
    thread.start()
    try:
        assert started.wait(120), "the compilation did not start"
        yield
    finally:
        release.set()
        thread.join()


def test_eager_forwards_keep_their_state_while_another_thread_compiles():
    """`torch.compiler.is_compiling()` (transformers' `is_torchdynamo_compiling()`) is a process-wide flag: while one
    thread compiles anything, an eager forward in another thread must still run as eager. Two models' forwards in two
    threads, interleaved by hooks so that each runs its LM while the other is inside its own, get their single-threaded
    logits (not each other's gated blocks); a forward continued from the cache sees the prompt's images; a wrong
    number of images is still an error; `generate` gives its tokens."""
    models = [tiny_model("llama", seed=0), tiny_model("llama", seed=1)]
    ids, pixel_values = inputs(seq=12)
    with torch.no_grad():
        expected = [model(input_ids=ids, pixel_values=pixel_values).logits for model in models]
    generated = models[0].generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    assert not torch.allclose(expected[0], expected[1])
    # thread 0 waits in its LM's first layer until thread 1 is in its own; thread 1 goes on when thread 0 is done
    zero_inside, one_inside, zero_done = threading.Event(), threading.Event(), threading.Event()

    def zero_waits(*_) -> None:
        zero_inside.set()
        one_inside.wait(60)

    def one_waits(*_) -> None:
        one_inside.set()
        zero_done.wait(60)

    find_decoder_layers(models[0].language_model, 4)[0].register_forward_pre_hook(zero_waits)
    find_decoder_layers(models[1].language_model, 4)[0].register_forward_pre_hook(one_waits)
    results: dict[int, torch.Tensor] = {}

    def run(index: int) -> None:
        try:
            with torch.no_grad():
                results[index] = models[index](input_ids=ids, pixel_values=pixel_values).logits
        finally:
            if index == 0:
                zero_done.set()

    with another_thread_compiling():
        # (the flag that this thread must not follow)
        assert torch.compiler.is_compiling() or Version(torch.__version__).release < (2, 13)
        threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
        threads[0].start()
        assert zero_inside.wait(60)
        threads[1].start()
        for thread in threads:
            thread.join()
        assert one_inside.is_set() and zero_done.is_set()
        for index in (0, 1):
            torch.testing.assert_close(results[index], expected[index], atol=0, rtol=0)

        model = tiny_model("llama")
        with torch.no_grad():
            first = model(input_ids=ids[:, :8], pixel_values=pixel_values, use_cache=True)
            second = model(input_ids=ids[:, 8:], past_key_values=first.past_key_values)
        torch.testing.assert_close(second.logits, expected[0][:, 8:], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=r"<image> tokens but only 1 images"):
            model(input_ids=ids, pixel_values=pixel_values[:, :1])
        again = models[0].generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
        assert torch.equal(again, generated)


def test_output_fields_and_tuple_output():
    model = tiny_model()
    ids, pixel_values = inputs()
    out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    assert out.image_hidden_states.shape == (2, 2, 4, 32)
    assert not out.image_hidden_states._is_view()  # FSDP2 warns of a view among a wrapped root's outputs
    assert len(out.image_cache.key_values) == len(model.gated_cross_attn_layers)
    assert out.image_cache.last_image_index.tolist() == [2, 2]
    assert isinstance(model(input_ids=ids, pixel_values=pixel_values, return_dict=False), tuple)


def test_continuing_with_the_cache_equals_one_forward():
    model = tiny_model("llama")
    ids, pixel_values = inputs(seq=12)
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixel_values).logits
        first = model(input_ids=ids[:, :8], pixel_values=pixel_values, use_cache=True)
        second = model(input_ids=ids[:, 8:], past_key_values=first.past_key_values, image_cache=first.image_cache)
    torch.testing.assert_close(second.logits, full[:, 8:], atol=1e-5, rtol=0)


# ---- errors ----


def test_errors_are_specific():
    model = tiny_model()
    ids, pixel_values = inputs(images=2)
    ids[0, 7] = MEDIA  # row 0: three <image> tokens, two images
    with pytest.raises(ValueError, match=r"Row 0 of input_ids has 3 <image> tokens but only 2 images"):
        model(input_ids=ids, pixel_values=pixel_values)
    ids, pixel_values = inputs()
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(input_ids=ids, pixel_values=pixel_values[:, :, :, :16])
    with pytest.raises(ValueError, match="frames"):
        model(input_ids=ids, pixel_values=torch.stack([pixel_values, pixel_values], dim=2))
    with pytest.raises(ValueError, match="no images were given"):
        model(input_ids=ids)
    text_only = torch.randint(0, 400, (2, 6))
    with pytest.raises(ValueError, match="no <image> token"):
        model(input_ids=text_only, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(pixel_values=pixel_values)
    first = model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    with pytest.raises(ValueError, match="image_cache"):
        model(input_ids=ids[:, :1], pixel_values=pixel_values, past_key_values=first.past_key_values)


def test_inputs_left_on_the_cpu_are_named():
    """`pixel_values` left on the CPU for a model on a GPU: a ValueError that says so (the patch convolution's own
    error speaks of "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor)"); not for a model
    dispatched by a device map, nor for weights on the CPU or meta device (offloaded ones wait there for hooks)."""
    from modeling_openflamingo.modeling_openflamingo import _check_left_on_cpu

    pixels = torch.zeros(1, 1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"pixel_values is on the CPU but the model's weights are on cuda:0"):
        _check_left_on_cpu("pixel_values", pixels, torch.device("cuda:0"), dispatched=False)
    _check_left_on_cpu("pixel_values", pixels, torch.device("cuda:0"), dispatched=True)
    for device in ("cpu", "meta"):
        _check_left_on_cpu("pixel_values", pixels, torch.device(device), dispatched=False)
    if torch.cuda.is_available():
        model = tiny_model().cuda()
        ids, pixel_values = inputs()
        with pytest.raises(ValueError, match="pixel_values is on the CPU but the model's weights are on cuda"):
            model(input_ids=ids.cuda(), pixel_values=pixel_values)
        with pytest.raises(ValueError, match="pixel_values is on the CPU but the model's weights are on cuda"):
            model.generate(input_ids=ids.cuda(), pixel_values=pixel_values, max_new_tokens=2)


def test_inputs_that_do_not_fit_each_other_are_errors():
    """Shapes and dtypes checked against each other, before anything runs (no silent mix-up of rows)."""
    model = tiny_model()
    ids, pixel_values = inputs()
    with pytest.raises(ValueError, match="pixel_values has 1 rows but the text has 2"):
        model(input_ids=ids, pixel_values=pixel_values[:1])
    with pytest.raises(ValueError, match="pixel_values must be a floating-point tensor.*torch.uint8"):
        model(input_ids=ids, pixel_values=(pixel_values * 50 + 128).clamp(0, 255).to(torch.uint8))
    features = model.get_image_features(pixel_values)
    with pytest.raises(ValueError, match="image_hidden_states has 1 rows"):
        model(input_ids=ids, image_hidden_states=features[:1])
    with pytest.raises(ValueError, match=r"image_hidden_states must be floating point of shape \(batch, num_images, 4"):
        model(input_ids=ids, image_hidden_states=features[:, :, :2])
    image_indices = (ids == MEDIA).cumsum(-1)
    with pytest.raises(ValueError, match="image_indices must be integers of shape"):
        model(input_ids=ids, pixel_values=pixel_values, image_indices=image_indices[:, :-1])
    with pytest.raises(ValueError, match="image_indices must be integers of shape"):
        model(input_ids=ids, pixel_values=pixel_values, image_indices=image_indices.float())
    with pytest.raises(ValueError, match="image_indices must be integers of shape"):
        model(input_ids=ids, pixel_values=pixel_values, image_indices=image_indices.bool())
    mask_error = r"attention_mask must have shape \(2, 10\)"
    for mask in (torch.ones(2, 9, dtype=torch.long), torch.ones(10, dtype=torch.long), torch.ones(2, 1, 10)):
        with pytest.raises(ValueError, match=mask_error + rf".*got {re.escape(str(tuple(mask.shape)))}"):
            model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask)
    with pytest.raises(ValueError, match=r"must have shape \(2 or 1, heads or 1, 10, 10\); got \(2, 1, 9, 9\)"):
        model(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"labels has shape \(1, 10\)"):
        model(input_ids=ids, pixel_values=pixel_values, labels=ids[:1])
    with pytest.raises(ValueError, match="labels must be integer token ids.*float32"):
        model(input_ids=ids, pixel_values=pixel_values, labels=ids.float())
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids of shape \(batch, seq\)"):
        model(input_ids=ids[0], pixel_values=pixel_values[:1])
    with pytest.raises(ValueError, match="input_ids must be integer token ids.*float32"):
        model(input_ids=ids.float(), pixel_values=pixel_values)
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match=rf"inputs_embeds must have shape \(batch, seq, {embeds.shape[-1]}\)"):
        model(inputs_embeds=embeds[..., :-1], pixel_values=pixel_values, image_indices=image_indices)
    cache = model(input_ids=ids, pixel_values=pixel_values, use_cache=True).image_cache
    with pytest.raises(ValueError, match="Pass the images once: pixel_values and image_cache were both given"):
        model(input_ids=ids, pixel_values=pixel_values, image_cache=cache)
    with pytest.raises(ValueError, match="Pass the images once: pixel_values and image_cache were both given"):
        model.generate(input_ids=ids, pixel_values=pixel_values, image_cache=cache, max_new_tokens=2)
    features = model.get_image_features(pixel_values)
    with pytest.raises(ValueError, match="pixel_values, image_hidden_states and image_cache were all given"):
        model(input_ids=ids, pixel_values=pixel_values, image_hidden_states=features, image_cache=cache)
    # the images by position land in `attention_mask` (the forward's second argument, as in transformers)
    with pytest.raises(ValueError, match=r"looks like images.*model\(input_ids, pixel_values=\.\.\.\)"):
        model(ids, pixel_values)
    with pytest.raises(ValueError, match="pixel_values has 1 rows but the text has 2"):  # before beams expand them
        model.generate(input_ids=ids, pixel_values=pixel_values[:1], num_beams=3, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 10\).*got \(2, 9\)"):
        model.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=ids[:, 1:] * 0 + 1, max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values must be a floating-point tensor.*torch.uint8"):
        model.get_image_features(pixel_values.to(torch.uint8))
    model.config.media_token_id = None  # (a config made without the tokenizer's <image> id)
    with pytest.raises(ValueError, match="config.media_token_id is not set"):
        model(input_ids=ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="config.media_token_id is not set"):
        model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=2)


def test_inputs_that_fit_in_other_legitimate_forms_are_accepted():
    """Forms the checks must let through: a 4-D mask broadcast over the batch (GPT-NeoX / LLaMA take it as it is), and
    `inputs_embeds` as wide as the LM's input embeddings where those are narrower than its hidden size (OPT's
    `word_embed_proj_dim`)."""
    from transformers import OPTConfig

    model = tiny_model("llama").eval()
    ids, pixel_values = inputs()
    causal = torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).logits
        broadcast = model(input_ids=ids, pixel_values=pixel_values, attention_mask=causal).logits
    torch.testing.assert_close(broadcast, expected, rtol=0, atol=1e-5)

    text = OPTConfig(
        hidden_size=32,
        word_embed_proj_dim=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=64,
        vocab_size=403,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    opt = OpenFlamingoForConditionalGeneration(tiny_config(text_config=text)).eval()
    with torch.no_grad():
        embeds = opt.get_input_embeddings()(ids)
        assert embeds.shape[-1] == 16 != text.hidden_size
        image_indices = opt._image_indices(ids, pixel_values.shape[1])
        got = opt(inputs_embeds=embeds, pixel_values=pixel_values, image_indices=image_indices).logits
        torch.testing.assert_close(got, opt(input_ids=ids, pixel_values=pixel_values).logits, rtol=0, atol=1e-5)


def test_a_state_space_lm_without_attentions():
    """`text_config` may be any causal LM `AutoModelForCausalLM` builds: Mamba's outputs have no `attentions`. Cached
    generation equals uncached (on transformers 5.18 the forward only: its generate fails in its own prefill)."""
    MambaConfig = getattr(transformers, "MambaConfig", None)
    if MambaConfig is None:
        pytest.skip("this transformers has no Mamba (a build cut down to fewer models)")
    text = MambaConfig(hidden_size=32, num_hidden_layers=4, state_size=4, vocab_size=403)
    torch.manual_seed(0)
    model = OpenFlamingoForConditionalGeneration(tiny_config(text_config=text)).eval()
    ids, pixel_values = inputs()
    out = model(input_ids=ids, pixel_values=pixel_values)
    assert out.logits.shape == (*ids.shape, 403) and out.attentions is None
    kw = {"pixel_values": pixel_values, "max_new_tokens": 4, "min_new_tokens": 4, "pad_token_id": PAD}
    try:  # (transformers 5.18's prefill asks a DynamicCache of linear-attention layers for a length it has not)
        cached = model.generate(input_ids=ids, **kw)
    except ValueError as error:
        assert "LinearAttention" in str(error) and transformers.__version__.startswith("5.18"), error
        return
    assert torch.equal(cached, model.generate(input_ids=ids, use_cache=False, **kw))


def test_a_legacy_tuple_cache_is_refused_clearly():
    """A tuple of per-layer (key, value) tensors (4.x's deprecated legacy cache) is an error naming the remedy, not an
    AttributeError inside the forward."""
    model = tiny_model("llama")
    ids, pixel_values = inputs()
    out = model(input_ids=ids, pixel_values=pixel_values, use_cache=True)
    legacy = (
        tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        if hasattr(out.past_key_values, "layers")
        else out.past_key_values.to_legacy_cache()
    )
    with pytest.raises(ValueError, match=r"past_key_values must be a transformers Cache .*DynamicCache\(legacy\)"):
        model(input_ids=ids[:, -1:], past_key_values=legacy, image_cache=out.image_cache)
    # the remedy it names works on both majors (5.x has no `DynamicCache.from_legacy_cache`, which it named)
    step = torch.tensor([[5], [7]])
    with torch.no_grad():
        expected = model(input_ids=step, past_key_values=out.past_key_values, image_cache=out.image_cache).logits
        got = model(input_ids=step, past_key_values=DynamicCache(legacy), image_cache=out.image_cache).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["mpt", "llama", "gpt_neox"])
def test_a_mask_of_the_new_tokens_alone_after_a_cache_is_refused(family):
    """Continuing from a cache, a 2-D attention_mask of the new tokens only (a common slip in hand-written decoding
    loops) is an error naming the shape: the LMs read it as the mask of the first positions and returned other
    logits, silently. The mask over the cached and the new tokens gives the full forward's."""
    model = tiny_model(family)
    ids, pixel_values = inputs(batch=2, seq=10)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).logits[:, 5:]
        out = model(input_ids=ids[:, :5], pixel_values=pixel_values, use_cache=True)
        _, cache = lm_cache_of(out)
        with pytest.raises(
            ValueError,
            match=r"attention_mask has 5 positions, but past_key_values holds 5 and "
            r"input_ids add 5: .*\(2, 10\)",
        ):
            model(input_ids=ids[:, 5:], past_key_values=cache, attention_mask=torch.ones(2, 5, dtype=torch.long))
        got = model(input_ids=ids[:, 5:], past_key_values=cache, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_image_cache_must_fit_the_rows_and_the_model():
    """An image cache of other rows (or of another model) is an error, not other rows' images."""
    model = tiny_model()
    ids, pixel_values = inputs()
    two_rows = model(input_ids=ids, pixel_values=pixel_values, use_cache=True).image_cache
    one_row = model(input_ids=ids[:1], pixel_values=pixel_values[:1], use_cache=True).image_cache
    with pytest.raises(ValueError, match="image_cache has 2 rows but the text has 1"):
        model(input_ids=ids[:1], image_cache=two_rows)
    with pytest.raises(ValueError, match="image_cache has 1 rows but the text has 2"):
        model(input_ids=ids, image_cache=one_row)
    with pytest.raises(ValueError, match="image_cache has 1 rows but the text has 2"):
        model.generate(input_ids=ids, image_cache=one_row, max_new_tokens=2)
    with pytest.raises(ValueError, match="image_cache must be the `image_cache` of an earlier output.*tuple"):
        model(input_ids=ids, image_cache=tuple(two_rows.key_values))
    other = tiny_model(n=1)  # a gated block before every layer: twice as many
    with pytest.raises(ValueError, match=r"image_cache holds the keys and values of \d+ gated cross-attention blocks"):
        other(input_ids=ids, image_cache=two_rows)
    model(input_ids=ids, image_cache=two_rows)  # the same rows: fine


def test_from_pretrained_refuses_weights_that_do_not_fit_the_config(converted, tmp_path):
    """A changed `cross_attn_every_n_layers` would leave gated blocks random and drop the trained ones: an error,
    unless the caller asks for the loading report."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(converted("tiny-neox"), folder)  # N=2: blocks before layers 1 and 3
    config = json.loads((folder / "config.json").read_text())
    config["cross_attn_every_n_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit its config: tensors \d+ missing \(e.g. \['gated_") as error:
        OpenFlamingoForConditionalGeneration.from_pretrained(folder)
    assert "unexpected" not in str(error.value)  # (no "0 unexpected (e.g. [])")
    config["cross_attn_every_n_layers"] = 4  # a block before layer 3 only: layer 1's are left over
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"fit its config: tensors \d+ unexpected \(e.g. \['gated_") as error:
        OpenFlamingoForConditionalGeneration.from_pretrained(folder)
    assert "missing" not in str(error.value)
    config["cross_attn_every_n_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Was cross_attn_every_n_layers"):
        AutoModelForImageTextToText.from_pretrained(folder)
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert any(k.startswith("gated_cross_attn_layers.0.") for k in info["missing_keys"])


def test_freeze_for_training_checks_its_arguments_before_changing_anything():
    model = tiny_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for bad, match in ((["<image>"], "list of token ids"), (401, "list of token ids"), ([1.5], "list of token ids")):
        with pytest.raises(ValueError, match=match):
            model.freeze_for_training(new_token_ids=bad)
    with pytest.raises(ValueError, match="new_token_ids is empty"):
        model.freeze_for_training(new_token_ids=[])
    with pytest.raises(ValueError, match="outside the embedding matrix"):
        model.freeze_for_training(new_token_ids=[10**6])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    import numpy as np

    model.freeze_for_training(new_token_ids=[np.int64(MEDIA), torch.tensor(EOC)])
    assert model.new_token_embeddings.weight.shape[0] == 2


def test_find_decoder_layers_error():
    with pytest.raises(ValueError, match="Could not find the layers"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), 4)


# ---- save / load ----


@pytest.mark.parametrize("family", ["mosaic_gpt", "gpt_neox"])
def test_save_load_round_trip_sharded_no_warnings(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is OpenFlamingoForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, pixel_values = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids, pixel_values=pixel_values).logits,
            model(input_ids=ids, pixel_values=pixel_values).logits,
            atol=0,
            rtol=0,
        )
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_openflamingo.OpenFlamingoConfig"
    assert "AutoModelForImageTextToText" in config["auto_map"]


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt", "llama"])
def test_output_attentions_without_weights_says_so(family):
    """MPT's SDPA attention returns no weights: `output_attentions=True` says so (once) instead of handing back None
    without a word; with `set_attn_implementation("eager")` they come back. Other LMs do not warn here."""
    from transformers.testing_utils import CaptureLogger

    from modeling_openflamingo import modeling_openflamingo as modeling

    model = tiny_model(family).eval()
    ids, pixel_values = inputs()
    modeling.logger.warning_once.cache_clear()
    with CaptureLogger(modeling.logger) as captured, torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, output_attentions=True)
    if family == "llama":
        assert "returns no attention weights" not in captured.out
        return
    assert "returns no attention weights" in captured.out and "set_attn_implementation('eager')" in captured.out
    assert out.attentions[0] is None
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=pixel_values, output_attentions=True).attentions[0] is not None


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt", "gpt_neox", "llama"])
def test_set_attn_implementation_updates_the_config_without_warnings(family):
    """`set_attn_implementation` switches the whole model (its config, the vision tower's and the LM's attention) and
    logs none of transformers' "does not support setting its attention implementation dynamically" warnings."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    model = tiny_model(family).eval()
    ids, pixel_values = inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixel_values).logits
    for implementation in ("eager", "sdpa"):
        with CaptureLogger(logging.get_logger("transformers.modeling_utils")) as captured:
            model.set_attn_implementation(implementation)
        assert "attention implementation" not in captured.out, captured.out
        assert model.config._attn_implementation == implementation
        assert model.config.vision_config._attn_implementation == implementation
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, pixel_values=pixel_values).logits, expected)


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt", "llama"])
def test_an_attention_dict_reaches_the_lm_as_transformers_reads_it(family, tmp_path):
    """In an `attn_implementation` dict the `""` entry is the top-level model's only and the LM's is under
    `"text_config"` (a name, or a dict with its own `""`), as transformers reads it for any sub-model: MPT's LM (whose
    switch is this package's) followed `""` and ignored the nested form."""

    def lm_attention(model):
        if family == "llama":
            return model.language_model.config._attn_implementation
        classes = mpt_attention_classes(family)
        (attention,) = {type(m) for m in model.language_model.modules() if type(m) in classes.values()}
        return next(name for name, cls in classes.items() if cls is attention)

    tiny_model(family).save_pretrained(tmp_path)
    cases = [({"": "eager"}, "sdpa"), ({"text_config": {"": "eager"}}, "eager"), ({"text_config": "eager"}, "eager")]
    for request, expected in cases:
        loaded = OpenFlamingoForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=request)
        assert lm_attention(loaded) == expected, request
    switched = tiny_model(family)
    switched.set_attn_implementation({"": "eager"})
    assert lm_attention(switched) == "sdpa" and switched.config._attn_implementation == "eager"
    switched.set_attn_implementation({"text_config": "eager"})
    assert lm_attention(switched) == "eager"
    switched.set_attn_implementation({"": "sdpa"})  # the LM keeps its eager attention
    assert lm_attention(switched) == "eager"


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_the_whole_forward_compiles_in_one_graph_and_exports_from_plain_inputs(family):
    """`torch.compile(model, fullgraph=True)` and `torch.export` of the forward from input_ids and pixel_values alone:
    the host-side checks of the <image> tokens are skipped while tracing (they were a graph break, an export error),
    and the traced numbering is the eager one, continuing from an image cache too."""
    torch._dynamo.reset()
    try:
        ids, pixel_values = inputs(batch=2, seq=10, images=2)
        model = tiny_model(family).eval()
        with torch.no_grad():
            expected = model(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            got = compiled(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            exported = torch.export.export(
                model, (), {"input_ids": ids, "pixel_values": pixel_values, "use_cache": False}
            )
            got = exported.module()(input_ids=ids, pixel_values=pixel_values, use_cache=False).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            # text only (a batch without images): no check reads input_ids on the host there either
            text = ids.masked_fill(ids == MEDIA, 5)
            expected_text = model(input_ids=text, use_cache=False).logits
            torch.testing.assert_close(
                compiled(input_ids=text, use_cache=False).logits, expected_text, rtol=0, atol=1e-6
            )
            exported = torch.export.export(model, (), {"input_ids": text, "use_cache": False})
            torch.testing.assert_close(
                exported.module()(input_ids=text, use_cache=False).logits, expected_text, rtol=0, atol=1e-6
            )
            # continuing from an image cache: the fed <image> is counted on from the cached prompt's last image
            first = model(input_ids=ids[:, :4], pixel_values=pixel_values, use_cache=True)
            name, cache = lm_cache_of(first)
            rest = {"input_ids": ids[:, 4:], "image_cache": first.image_cache, name: cache}
            expected = model(**{**rest, name: copy.deepcopy(cache)}).logits
            torch.testing.assert_close(compiled(**rest).logits, expected, rtol=0, atol=1e-6)
            # continuing with pixel_values instead: which image the new tokens follow is unknown, refused as in eager
            # (with fullgraph=True dynamo reports the ValueError as an "Observed exception")
            with pytest.raises(ValueError, match="Continuing from past_key_values with images: pass `image_cache`"):
                torch.compile(model, backend="eager")(
                    input_ids=ids[:, 4:], pixel_values=pixel_values, **{name: copy.deepcopy(cache)}
                )
    finally:
        torch._dynamo.reset()


def test_compiled_mosaic_gpt_after_a_compiled_mpt_keeps_its_qk_layernorm():
    """`torch.compile` reuses code compiled for another module of the same class without checking its hooks: MosaicGPT
    (QK-LayerNorm by hooks) compiled after an MPT without them must not run the MPT's code. Its attention is a class of
    its own (`OpenFlamingoMosaicGPTSdpaAttention`), which the compiled code's guards check."""
    torch._dynamo.reset()
    try:
        ids, pixel_values = inputs()
        for family in ("mpt", "mosaic_gpt"):
            model = tiny_model(family).eval()
            with torch.no_grad():
                expected = model(input_ids=ids, pixel_values=pixel_values).logits
                compiled = torch.compile(model, backend="eager")(input_ids=ids, pixel_values=pixel_values).logits
            torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-6, msg=family)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_mpt_attention_implementation_by_name(family, tmp_path):
    """transformers' MPT has eager attention only; "sdpa" by name gets this package's SDPA attention (the default),
    "eager" keeps `MptAttention` (attention weights); the two give the same logits."""
    tiny_model(family).save_pretrained(tmp_path)
    ids, pixel_values = inputs()
    logits = {}
    for implementation, attention in mpt_attention_classes(family).items():
        model = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation=implementation)
        assert type(model.language_model.transformer.blocks[0].attn) is attention
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)
    # asked for the LM alone (a dict, as `set_attn_implementation` takes too), or not at all (SDPA)
    classes = mpt_attention_classes(family)
    for requested, expected in [
        ({"text_config": "eager"}, "eager"),
        ({"text_config": "eager", "vision_config": "sdpa"}, "eager"),
        ({"text_config": "sdpa", "": "eager"}, "sdpa"),
        # with a value for the whole model too (the LM's "eager" was taken for the one this package writes)
        ({"text_config": "eager", "": "sdpa"}, "eager"),
        ({"text_config": "eager", "vision_config": "sdpa", "": "sdpa"}, "eager"),
        (None, "sdpa"),
    ]:
        kwargs = {} if requested is None else {"attn_implementation": requested}
        model = AutoModelForImageTextToText.from_pretrained(tmp_path, **kwargs)
        assert type(model.language_model.transformer.blocks[0].attn) is classes[expected], requested
        built = AutoModelForImageTextToText.from_config(model.config, **kwargs)
        assert type(built.language_model.transformer.blocks[0].attn) is classes[expected], requested
    # a model built from a built model's config (which holds the "eager" written for MPT's own class) keeps SDPA
    for again in (
        OpenFlamingoForConditionalGeneration(model.config),
        AutoModelForImageTextToText.from_config(model.config),
    ):
        assert type(again.language_model.transformer.blocks[0].attn) is classes["sdpa"]
    eager = AutoModelForImageTextToText.from_pretrained(
        tmp_path, attn_implementation={"text_config": "eager", "": "sdpa"}
    )
    with torch.no_grad():
        output = eager(input_ids=ids, pixel_values=pixel_values, output_attentions=True)
    assert all(a is not None for a in output.attentions)  # MPT's own attention: weights
    for again in (  # and a model built from its config keeps the LM's eager attention
        OpenFlamingoForConditionalGeneration(eager.config),
        AutoModelForImageTextToText.from_config(eager.config),
    ):
        assert type(again.language_model.transformer.blocks[0].attn) is classes["eager"]
    # switched after building: a model built from the config has the attention switched to (either way)
    for switched, expected in ((eager, "sdpa"), (model, "eager")):
        switched.set_attn_implementation({"text_config": expected})
        assert type(switched.language_model.transformer.blocks[0].attn) is classes[expected]
        again = AutoModelForImageTextToText.from_config(copy.deepcopy(switched.config))
        assert type(again.language_model.transformer.blocks[0].attn) is classes[expected]
    # the LM's SDPA asked for beside eager for the whole model: a model built from that config runs SDPA too (helper-66)
    mixed = AutoModelForImageTextToText.from_pretrained(
        tmp_path, attn_implementation={"text_config": "sdpa", "": "eager"}
    )
    for again in (
        OpenFlamingoForConditionalGeneration(copy.deepcopy(mixed.config)),
        AutoModelForImageTextToText.from_config(copy.deepcopy(mixed.config)),
    ):
        assert type(again.language_model.transformer.blocks[0].attn) is classes["sdpa"]
    # and a name for the whole model, given when building from a config that runs SDPA, is the LM's too
    again = AutoModelForImageTextToText.from_config(copy.deepcopy(mixed.config), attn_implementation="eager")
    assert type(again.language_model.transformer.blocks[0].attn) is classes["eager"]
    model.save_pretrained(tmp_path / "saved")  # the mark of the LM's config is the model's own, never saved
    assert "sdpa_written_as_eager" not in (tmp_path / "saved" / "config.json").read_text()


def test_from_pretrained_with_output_loading_info_false(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=False)
    assert type(loaded) is OpenFlamingoForConditionalGeneration


@pytest.mark.parametrize("kwargs", [{}, {"use_kernels": None}, {"kernel_config": None}])
def test_hub_kernels_stay_off_unless_asked_for(tmp_path, monkeypatch, kwargs):
    """transformers >= 5.25 kernelizes what `from_pretrained` loads unless told not to: on a GPU, kernels downloaded
    from the hub for LLaMA's RMSNorm and rotary embedding and for the activations (other numbers than the original's;
    an error offline, found on an H200 when `train()` re-kernelized a model moved to CUDA). OpenFlamingo's loads
    without them, and switching modes afterwards does not kernelize either."""
    if "kernel_config" in kwargs and IS_V4:
        pytest.skip("transformers 4.x's from_pretrained has no kernel_config")
    tiny_model("llama").save_pretrained(tmp_path)
    kernelized = []
    if hasattr(modeling_utils, "kernelize"):  # transformers 5: the function `set_use_kernels(True)` and `train()` call
        monkeypatch.setattr(modeling_utils, "kernelize", lambda model, *args, **kw: kernelized.append(model))
    else:  # 4.57: the method that `use_kernels=True` and a mode change call
        monkeypatch.setattr(PreTrainedModel, "kernelize", lambda model: kernelized.append(model))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, **kwargs)
    model.train()
    model.eval()
    assert not kernelized and not model.use_kernels


def test_hub_kernels_when_asked_for(tmp_path, monkeypatch):
    """`use_kernels=True` still reaches transformers (recorded, not run: the kernels would be downloaded)."""
    tiny_model("llama").save_pretrained(tmp_path)
    requested = []
    if hasattr(PreTrainedModel, "set_use_kernels"):  # transformers 5: called with the resolved `use_kernels`
        monkeypatch.setattr(
            PreTrainedModel, "set_use_kernels", lambda self, use, *args, **kwargs: requested.append(bool(use))
        )
    else:  # 4.57: `use_kernels=True` sets the property, whose setter kernelizes
        monkeypatch.setattr(PreTrainedModel, "kernelize", lambda self: requested.append(True))
    AutoModelForImageTextToText.from_pretrained(tmp_path, use_kernels=True)
    assert requested == [True]


def test_unset_forward_flags_follow_the_models_config():
    """`model.config.use_cache = False` (e.g. for gradient checkpointing or an evaluation loop) turns the caches off,
    `output_hidden_states` / `output_attentions` on the config turn those on, as on any transformers model."""
    model = tiny_model("llama")
    ids, pixel_values = inputs()
    with torch.no_grad():
        default = model(input_ids=ids, pixel_values=pixel_values)
        assert default.past_key_values is not None and default.image_cache is not None
        assert default.hidden_states is None
        model.config.use_cache = False
        model.config.output_hidden_states = True
        flagged = model(input_ids=ids, pixel_values=pixel_values)
        assert flagged.past_key_values is None and flagged.image_cache is None
        assert len(flagged.hidden_states) == model.config.text_config.num_hidden_layers + 1
        assert model(input_ids=ids, pixel_values=pixel_values, use_cache=True).image_cache is not None
    torch.testing.assert_close(flagged.logits, default.logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_first_hidden_state_is_the_embeddings_before_the_first_block(family):
    """With a block before decoder layer 0 (`cross_attn_every_n_layers=1`), `hidden_states[0]` is the embeddings, as
    transformers' LMs and the original give it, and `hidden_states[i]` the input of layer i before its block: the LMs
    whose hidden states transformers records by hooks on the layers took the first one after the block."""
    model = tiny_model(family, n=1)
    ids, pixel_values = inputs()
    blocks_in = []
    for block in model.gated_cross_attn_layers.values():
        # (a block is also called on the image latents, for its keys and values: 4-D)
        block.register_forward_pre_hook(lambda module, args: blocks_in.append(args[0]) if args[0].ndim == 3 else None)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[0], model.get_input_embeddings()(ids), rtol=0, atol=0)
    assert len(out.hidden_states) == len(blocks_in) + 1
    for hidden_state, block_input in zip(out.hidden_states[:-1], blocks_in, strict=True):
        torch.testing.assert_close(hidden_state, block_input, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt", "gpt_neox", "llama"])
def test_set_decoder_takes_what_get_decoder_gives(family):
    """`get_decoder` is the LM's decoder; `set_decoder` puts one there (transformers 5's default would replace the
    whole LM, its output layer included, by it)."""
    model = tiny_model(family)
    ids, pixel_values = inputs()
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pixel_values).logits
        decoder = model.get_decoder()
        model.set_decoder(decoder)
        assert model.get_decoder() is decoder
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixel_values).logits, before, rtol=0, atol=0)


def test_resizing_below_the_models_own_tokens_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"to 320 rows would drop the rows of .*'media_token_id': 401.*at least 403"):
        model.resize_token_embeddings(300, pad_to_multiple_of=64)
    assert model.get_input_embeddings().weight.shape[0] == 403
    assert model.resize_token_embeddings(410).weight.shape[0] == 410
    assert model.config.text_config.vocab_size == 410


def test_resizing_below_a_row_in_training_is_refused():
    """A row that `freeze_for_training` trains (`new_token_embeddings`) beyond the new size would be lost: refused."""
    model = tiny_model("mpt")
    model.resize_token_embeddings(410)
    model.freeze_for_training(new_token_ids=[401, 402, 408])
    with pytest.raises(ValueError, match=r"to 405 rows would drop token ids \[408\], whose rows freeze_for_training"):
        model.resize_token_embeddings(405)
    assert model.get_input_embeddings().weight.shape[0] == 410
    assert model.resize_token_embeddings(409).weight.shape[0] == 409


@pytest.mark.parametrize("family", ["mpt", "gpt_neox", "llama"])
def test_rows_added_without_mean_resizing_get_the_language_models_initialisation(family):
    """`resize_token_embeddings(..., mean_resizing=False)` initialises the new rows as the bare LM's own resize does
    (normal with `initializer_range`), not with torch's N(0, 1): on a tied LM those would dominate the logits."""
    model = tiny_model(family)
    bare = AutoModelForCausalLM.from_config(model.config.text_config)
    old = model.get_input_embeddings().weight.shape[0]
    torch.manual_seed(0)
    new_rows = model.resize_token_embeddings(old + 4000, mean_resizing=False).weight[old:]
    torch.manual_seed(0)
    bare_rows = bare.resize_token_embeddings(old + 4000, mean_resizing=False).weight[old:]
    std = model.config.text_config.initializer_range
    assert new_rows.std().item() == pytest.approx(std, rel=0.05)
    assert bare_rows.std().item() == pytest.approx(std, rel=0.05)
    output_rows = model.get_output_embeddings().weight[old:]
    assert output_rows.std().item() == pytest.approx(std, rel=0.05)


def test_tied_embeddings_survive_save_load(tmp_path):
    model = tiny_model("mpt")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    lm = loaded.language_model
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()


def test_bfloat16_load_and_forward(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, pixel_values = inputs()
    out = model(input_ids=ids, pixel_values=pixel_values, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


@pytest.mark.parametrize("family", list(TEXT_CONFIGS))
def test_language_model_in_another_dtype_than_the_blocks(family):
    """An LM in bf16 with fp32 gated blocks, vision tower and Perceiver, without autocast (what transformers 4.x's
    `from_pretrained(dtype={"text_config": torch.bfloat16, "": torch.float32})` builds): the blocks compute in their
    own dtype and return the LM's; logits are the all-fp32 model's up to bf16 rounding, and training gets gradients."""
    model = tiny_model(family)
    ids, pixel_values = inputs()
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixel_values).logits
    model.language_model.to(torch.bfloat16)
    out = model(input_ids=ids, pixel_values=pixel_values, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), reference, atol=0.1, rtol=0.05)
    out.loss.backward()
    block = next(iter(model.gated_cross_attn_layers.values()))
    assert block.attn.to_q.weight.grad.dtype == torch.float32 and block.attn.to_q.weight.grad.abs().sum() > 0
    generated = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=3, min_new_tokens=3)
    assert generated.shape == (2, ids.shape[1] + 3)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(
    ("lm_dtype", "block_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)],
)
def test_a_closed_gated_block_is_the_identity_across_dtypes(lm_dtype, block_dtype, autocast):
    """Gates at 0 (a fresh block) hand the LM its hidden states back bit for bit, whichever of the LM and the block
    is wider, with or without autocast: the residual stream is kept in the wider dtype, only the attention's and
    feed-forward's inputs are cast (clamped to fp16's range: an fp32 outlier beyond it would be inf, then NaN after a
    LayerNorm, and NaN times a closed gate is NaN). Open gates give the all-fp32 block's output up to the rounding
    of the narrower dtype."""
    config = tiny_config()
    torch.manual_seed(0)
    block = OpenFlamingoGatedCrossAttentionBlock(config).to(block_dtype)
    hidden = torch.randn(2, 5, 32).to(lm_dtype) * 100  # large, so that rounding to bf16 would show
    outlier = hidden.clone()
    outlier[0, 0, 0] = 7e4 if lm_dtype == torch.float32 else 0  # beyond fp16's 65504
    latents = torch.randn(2, 1, 4, 32)
    mask = torch.ones(2, 1, 5, 4, dtype=torch.bool)
    keeps = torch.ones(2, 5, 1, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        key, value = block(latents, return_key_values=True)  # fp32 latents into a bf16 block: cast to its dtype
        for x in (hidden, outlier):
            out = block(x, key, value, mask, keeps)
            assert out.dtype == lm_dtype and torch.equal(out, x)

        with torch.no_grad():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(-0.5)
        out = block(hidden, key, value, mask, keeps)
    reference = copy.deepcopy(block).float()
    expected = reference(hidden.float(), *reference(latents, return_key_values=True), mask, keeps)
    assert out.dtype == lm_dtype
    torch.testing.assert_close(out.float(), expected, atol=0.5, rtol=0.02)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_gated_block_on_the_meta_device_across_dtypes(compiled):
    """Autocast is not asked about on a device it does not know (`meta`, as in a shape-only dry run), compiled too."""
    with torch.device("meta"):
        block = OpenFlamingoGatedCrossAttentionBlock(tiny_config())
        latents = torch.empty(2, 1, 4, 32)
        mask = torch.ones(2, 1, 5, 4, dtype=torch.bool)
        keeps = torch.ones(2, 5, 1, dtype=torch.bool)

        def step(hidden: torch.Tensor) -> torch.Tensor:
            return block(hidden, *block(latents, return_key_values=True), mask, keeps)

        if compiled:
            torch._dynamo.reset()
            step = torch.compile(step, backend="eager")  # (dynamo breaks the graph at a meta `unflatten`)
        out = step(torch.empty(2, 5, 32, dtype=torch.bfloat16))
    assert out.shape == (2, 5, 32) and out.dtype == torch.bfloat16 and out.is_meta


@pytest.mark.parametrize("stand_in", [True, False], ids=["untraceable-stand-in", "torch-itself"])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_mixed_dtype_gated_block_compiles_without_graph_breaks(monkeypatch, autocast, stand_in):
    """A bf16 LM with fp32 blocks (the training recipe's fp32 gates) asks whether autocast is on; dynamo before
    torch 2.13 cannot trace `torch.amp.is_autocast_available`, so the question must not reach it while compiling (on an
    H200 with torch 2.11 every compiled block broke in two). Stood in for by a function that fails when traced; without
    the stand-in, torch's own functions are compiled (the real check with torch < 2.13, which the GPU machine has: run
    with OPENFLAMINGO_TEST_DEVICE=cuda for CUDA's autocast)."""
    device = torch.device(os.environ.get("OPENFLAMINGO_TEST_DEVICE", "cpu"))
    if stand_in:
        available = torch.amp.is_autocast_available

        def untraceable(device_type: str) -> bool:
            if torch.compiler.is_compiling():
                raise AssertionError("is_autocast_available was traced")
            return available(device_type)

        monkeypatch.setattr(torch.amp, "is_autocast_available", untraceable)
    torch.manual_seed(0)
    block = OpenFlamingoGatedCrossAttentionBlock(tiny_config()).to(device)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    hidden = torch.randn(2, 5, 32).to(device, torch.bfloat16)
    mask = torch.ones(2, 1, 5, 4, dtype=torch.bool, device=device)
    keeps = torch.ones(2, 5, 1, dtype=torch.bool, device=device)

    def step(hidden: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return block(hidden, *block(latents, return_key_values=True), mask, keeps)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    latents = torch.randn(2, 1, 4, 32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        torch.testing.assert_close(compiled(hidden, latents), step(hidden, latents), rtol=0, atol=0)


def test_qk_layernorm_beside_a_quantized_wqkv():
    """A `Wqkv` with no floating `weight` (GPTQ's `QuantLinear` keeps `qweight` and fp16 `scales` buffers): the
    LayerNorms take the dtype of its scales, or the default dtype when it has no floating tensor at all."""

    class QuantLinear(torch.nn.Module):
        def __init__(self, scales: bool) -> None:
            super().__init__()
            self.register_buffer("qweight", torch.zeros(32, 96, dtype=torch.int32))
            if scales:
                self.register_buffer("scales", torch.ones(1, 96, dtype=torch.float16))

    class Attention(torch.nn.Module):
        def __init__(self, scales: bool) -> None:
            super().__init__()
            self.Wqkv = QuantLinear(scales)

    language_model = torch.nn.ModuleList([Attention(scales=True), Attention(scales=False)])
    add_mpt_qk_layernorm(language_model, TEXT_CONFIGS["mosaic_gpt"]())
    assert [attention.q_ln.weight.shape for attention in language_model] == [(32,), (32,)]
    assert [attention.k_ln.weight.dtype for attention in language_model] == [torch.float16, torch.get_default_dtype()]


class Int8Linear(torch.nn.Module):
    """bitsandbytes' `Linear8bitLt` in miniature: an int8 weight with per-row scales, and inputs of 2 or 3 dimensions
    only (as its 8-bit matmul)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        self.weight = torch.nn.Parameter((weight / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 3:
            raise RuntimeError(f"the 8-bit matmul takes 2-D or 3-D inputs, got {x.dim()}-D")
        return torch.nn.functional.linear(x, self.dequantized().to(x.dtype))


def quantized_int8(model: OpenFlamingoForConditionalGeneration, parts=("perceiver", "gated_cross_attn_layers")):
    """`model` with every `nn.Linear` of `parts` made an [`Int8Linear`] (in place), and a float copy of it with the
    dequantized weights: the numbers the quantized model computes with."""
    float_model = copy.deepcopy(model)
    for part in parts:
        for name, linear in list(getattr(model, part).named_modules()):
            if isinstance(linear, torch.nn.Linear):
                quantized = Int8Linear(linear)
                getattr(model, part).set_submodule(name, quantized)
                getattr(float_model, part).get_submodule(name).weight.data = quantized.dequantized()
    return model, float_model


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_int8_perceiver_and_blocks_compute_with_their_weights(family):
    """A model whose Perceiver and gated blocks are quantized as bitsandbytes' 8-bit layers are (the integrations
    convert them by default): it computes with the dequantized weights. The Perceiver gives its Linears 3-D inputs
    (rows x images flattened): bitsandbytes' 8-bit matmul failed on the 4-D ones (helper-67)."""
    model, float_model = quantized_int8(tiny_model(family))
    ids, pixel_values = inputs()
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=pixel_values).logits
        expected = float_model(input_ids=ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not IS_V4, reason="transformers 5.x loads a per-module dtype dict in one dtype, with a warning")
@pytest.mark.parametrize("vision_dtype", [torch.float32, torch.bfloat16])
def test_per_module_dtype_dict_on_v4(tmp_path, vision_dtype):
    """transformers 4.x's per-part dtypes: the LM and the vision tower each in its sub-config's dtype, the Perceiver
    and the gated blocks in the top-level one; a save records each part's dtype, and `dtype="auto"` restores them."""
    tiny_model("mosaic_gpt").save_pretrained(tmp_path)
    dtypes = {"text_config": torch.bfloat16, "vision_config": vision_dtype, "": torch.float32}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=dtypes)

    def part_dtypes(model):
        parts = (model.language_model, model.vision_model, model.perceiver, model.gated_cross_attn_layers)
        return [{p.dtype for p in part.parameters()} for part in parts]

    # MosaicGPT's q_ln / k_ln in the LM's dtype too
    assert part_dtypes(model) == [{torch.bfloat16}, {vision_dtype}, {torch.float32}, {torch.float32}]
    ids, pixel_values = inputs()
    logits = model(input_ids=ids, pixel_values=pixel_values).logits
    assert logits.dtype == torch.bfloat16

    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["text_config"]["dtype"] == "bfloat16"
    # written where the part's dtype differs from the rest's (float32, the top-level one), else left unset
    assert saved["vision_config"].get("dtype") == (None if vision_dtype == torch.float32 else "bfloat16")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype="auto")
    assert part_dtypes(again) == part_dtypes(model)
    assert torch.equal(again(input_ids=ids, pixel_values=pixel_values).logits, logits)


@pytest.mark.parametrize("sub_config_dtypes", [False, True], ids=["new-folder", "sub-configs-say-bf16"])
def test_a_dtype_dict_gives_the_parts_it_leaves_out_the_rest_dtype(tmp_path, sub_config_dtypes):
    """A one-dtype save writes no sub-config dtype (transformers 4.x would build that part in it under `dtype="auto"`
    and in `from_config`); on 4.x the README's dict gives the vision tower the `""` dtype, also for a folder whose
    sub-configs hold one (as converted folders did)."""
    tiny_model("mosaic_gpt").to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [config[name].get("dtype") for name in ("text_config", "vision_config")] == [None, None]
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"
    if sub_config_dtypes:
        for name in ("text_config", "vision_config"):
            config[name]["dtype"] = "bfloat16"
        (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    if not IS_V4:
        return  # 5.x loads a dtype dict in one dtype
    dtypes = {"text_config": torch.bfloat16, "": torch.float32}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=dtypes)
    assert {p.dtype for p in model.language_model.parameters()} == {torch.bfloat16}
    rest = (model.vision_model, model.perceiver, model.gated_cross_attn_layers)
    assert {p.dtype for part in rest for p in part.parameters()} == {torch.float32}


def test_part_dtypes_of_a_saving_model_reach_its_own_config_only():
    """The dtypes that a model's `save_pretrained` records apply to that model's config, not to another config
    serialised meanwhile; outside a save, the sub-configs' dtypes are left unset."""
    from modeling_openflamingo.configuration_openflamingo import SAVED_PART_DTYPES

    saving, other = tiny_model("llama").config, tiny_model("llama").config
    saving.dtype = other.dtype = torch.float32  # as `save_pretrained` sets it before the config is written
    token = SAVED_PART_DTYPES.set((saving, {"vision_config": "float32", "text_config": "bfloat16", "": "float16"}))
    try:
        mixed, plain = saving.to_dict(), other.to_dict()
    finally:
        SAVED_PART_DTYPES.reset(token)
    dtype_key = "dtype" if "dtype" in mixed else "torch_dtype"
    assert (mixed[dtype_key], mixed["vision_config"][dtype_key], mixed["text_config"][dtype_key]) == (
        "float16",
        "float32",
        "bfloat16",
    )
    assert plain[dtype_key] != "float16"
    assert plain["vision_config"].get(dtype_key) is None and plain["text_config"].get(dtype_key) is None
    assert saving.to_dict()["vision_config"].get(dtype_key) is None


def test_auto_model_gives_the_model(tmp_path):
    """`AutoModel` gives the model (there is none without the LM's head, as for Llama 4): tools that load with it, and
    `trust_remote_code` folders (their `auto_map`), work."""
    from transformers import AutoModel

    tiny_model().save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is OpenFlamingoForConditionalGeneration
    assert "AutoModel" in json.loads((tmp_path / "config.json").read_text())["auto_map"]


@pytest.mark.skipif(not IS_V4, reason="AutoModelForVision2Seq exists on transformers 4.x only")
def test_auto_model_for_vision2seq_on_v4(tmp_path):
    from transformers import AutoModelForVision2Seq

    tiny_model().save_pretrained(tmp_path)
    assert type(AutoModelForVision2Seq.from_pretrained(tmp_path)) is OpenFlamingoForConditionalGeneration


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_which_code_a_converted_folder_loads_with_the_package_imported(converted, trust_remote_code):
    """As the model card says: the installed package's classes, except with `trust_remote_code=True` on
    transformers 4.x, which picks the folder's copy."""
    path = converted("tiny-llama")
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    installed = not (IS_V4 and trust_remote_code)
    assert isinstance(model, OpenFlamingoForConditionalGeneration) == installed
    assert (type(processor).__module__ == "modeling_openflamingo.processing_openflamingo") == installed


# What a saved folder's code may import: transformers' remote-code loader refuses to load a file (and, from the Hub,
# each file it imports) that imports a package not installed, wherever the import is, unless inside a `try` or under
# an `is_..._available()` check; the optional extras (peft, accelerate, datasets, triton) must not be required.
REMOTE_CODE_PACKAGES = {"torch", "transformers", "huggingface_hub", "safetensors", "tokenizers", "numpy", "packaging"}
REMOTE_CODE_PACKAGES |= {"tqdm", "PIL"}  # (a transformers dependency; the image processor's, as CLIP's)


def test_a_saved_folders_code_imports_no_optional_package(converted):
    from transformers.dynamic_module_utils import get_imports

    files = sorted(converted("tiny-mpt").glob("*.py"))
    assert "modeling_openflamingo.py" in {f.name for f in files}
    for file in files:
        imported = set(get_imports(file)) - set(sys.stdlib_module_names)
        assert imported <= REMOTE_CODE_PACKAGES, (file.name, imported - REMOTE_CODE_PACKAGES)


def test_trust_remote_code_without_the_package(converted, tmp_path):
    """A saved folder (model + processor) loads in a Python where `modeling_openflamingo` cannot be imported, nor the
    optional packages (the `train` extra's, Triton)."""
    path = converted("tiny-mpt-1b-redpajama-200b")
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("modeling_openflamingo", "peft", "accelerate", "datasets", "triton"):
            sys.modules[name] = None  # make the package unimportable
        import torch, transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(path)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(transformers.AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True)) is type(model)
        if transformers.__version__.startswith("4."):
            from transformers import AutoModelForVision2Seq
            AutoModelForVision2Seq.from_pretrained({str(path)!r}, trust_remote_code=True)
        from PIL import Image
        image = Image.new("RGB", (40, 30), (200, 10, 10))
        batch = processor(images=[[image]], text=["<image>Output:"])
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3)
        print("OK", tuple(out.shape))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # (PYTHONPATH kept: it may name the transformers to use)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


# ---- processor ----


def test_processor_batches_rows_with_different_image_counts(converted, tiny_images):
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    batch = processor(
        images=[[tiny_images[0], tiny_images[1]], [], [tiny_images[2]]],
        text=["<image>a<image>b", "just text", "<image>c"],
    )
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][1], torch.zeros(2, 3, 32, 32))
    assert torch.equal(batch["pixel_values"][2, 1], torch.zeros(3, 32, 32))
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding by default
    single = processor(images=[tiny_images[0]], text="<image>hello")
    assert single["pixel_values"].shape == (1, 1, 3, 32, 32)
    text_only = processor(text=["no images here"])
    assert "pixel_values" not in text_only


def test_processor_takes_a_flat_list_of_every_texts_images(converted, tiny_images):
    """A batch of texts with one flat list of images (transformers' pipelines and other processors take images so):
    split by the texts' `<image>` counts, in order; the same batch as with one list per text."""
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    texts = ["<image>a<image>b", "just text", "<image>c"]
    expected = processor(images=[tiny_images[:2], [], [tiny_images[2]]], text=texts)
    for flat in (tiny_images[:3], tuple(tiny_images[:3])):
        got = processor(images=flat, text=texts)
        assert set(got) == set(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    arrays = [np.asarray(image.convert("RGB").resize((32, 32))) for image in tiny_images[:3]]
    stacked = processor(images=[np.stack(arrays[:2]), arrays[2]], text=texts)  # a 4-D array: its images, in order
    assert torch.equal(stacked["pixel_values"], processor(images=arrays, text=texts)["pixel_values"])
    one = processor(images=tiny_images[0], text=["<image>a", "b"])  # one image for a batch: the one <image>
    assert one["pixel_values"].shape == (2, 1, 3, 32, 32)
    all_in_one = processor(images=np.stack(arrays), text=texts)  # one 4-D array of every text's images
    assert torch.equal(all_in_one["pixel_values"], stacked["pixel_values"])
    per_text = processor(images=[np.stack(arrays[:2]), np.stack(arrays[2:])], text=["<image>a<image>b", "<image>c"])
    assert torch.equal(per_text["pixel_values"][1, 0], stacked["pixel_values"][2, 0])  # one 4-D array per text
    assert "pixel_values" not in processor(images=[], text=["a", "b"])  # no images for texts without <image>
    with pytest.raises(ValueError, match=r"flat list of 2 images for 3 texts with 3 <image> tokens in all \(2, 0, 1\)"):
        processor(images=tiny_images[:2], text=texts)
    with pytest.raises(ValueError, match=r"flat list of 4 images for 3 texts with 3 <image> tokens"):
        processor(images=tiny_images[:4], text=texts)


def test_processor_loads_from_a_folder_without_tokenizer_config(converted, tmp_path):
    """A folder whose `tokenizer_config.json` is missing: the tokenizer is read from `tokenizer.json` on both majors
    (transformers 4.x failed with a bare `KeyError: 'OpenFlamingoConfig'`), with the added tokens in place."""
    folder = tmp_path / "no-tokenizer-config"
    shutil.copytree(converted("tiny-neox"), folder)
    (folder / "tokenizer_config.json").unlink()
    expected = AutoProcessor.from_pretrained(converted("tiny-neox"))
    processor = AutoProcessor.from_pretrained(folder)
    assert len(processor.tokenizer) == len(expected.tokenizer)
    text = "<image>A photo of two cats.<|endofchunk|><image>Output:"
    assert processor.tokenizer(text)["input_ids"] == expected.tokenizer(text)["input_ids"]
    assert processor.image_token_id == expected.image_token_id


def test_processor_errors(converted, tiny_images):
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    with pytest.raises(ValueError, match="has 2 <image> tokens but 1 images"):
        processor(images=[[tiny_images[0]]], text=["<image>a<image>b"])
    with pytest.raises(ValueError, match="2 texts but 1 lists of images"):
        processor(images=[[tiny_images[0]]], text=["<image>a", "b"])
    with pytest.raises(ValueError, match="For one text, `images` must be its images .* mixed"):
        processor(images=[tiny_images[0], [tiny_images[1]]], text="<image>a<image>b")
    with pytest.raises(ValueError, match="For a batch of texts, `images` must hold one list of images per text"):
        processor(images=[tiny_images[0], [tiny_images[1]]], text=["<image>a", "<image>b"])
    with pytest.raises(ValueError, match="needs `text`"):
        processor(images=[tiny_images[0]])
    for text in (5, [], [["<image>a", "b"]]):  # not a string, no row, a text pair
        with pytest.raises(ValueError, match="`text` must be a string or a non-empty list of strings"):
            processor(text=text)
    with pytest.raises(ValueError, match="Unexpected keyword argument `foo` for OpenFlamingoProcessor") as error:
        processor(images=[tiny_images[0]], text="<image>a", foo=1)
    assert "generation option" not in str(error.value)
    # what `pipeline("image-text-to-text")(..., min_new_tokens=6)` hands the processor: say where it belongs
    with pytest.raises(ValueError, match=r"`min_new_tokens` is a generation option: .*generate_kwargs="):
        processor(images=[tiny_images[0]], text="<image>a", min_new_tokens=6)
    with pytest.raises(ValueError, match=r"generate_kwargs=\{'stop_strings': ..., 'tokenizer': processor.tokenizer\}"):
        processor(images=[tiny_images[0]], text="<image>a", stop_strings=["x"])  # (the pipeline test follows it)
    with pytest.raises(ValueError, match="return_overflowing_tokens is not supported"):
        processor(text="a b c", truncation=True, max_length=2, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="takes `text` only"):
        processor(text="a", text_pair="b")


def test_processor_passes_image_and_text_options_on(converted, tiny_images):
    """The image processor's options reach it (flat or as `images_kwargs`), the tokenizer's reach the tokenizer."""
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    image = tiny_images[0]
    default = processor(images=[image], text="<image>a")["pixel_values"]
    assert default.shape[-1] == 32
    assert processor(images=[image], text="<image>a", size=16)["pixel_values"].shape[-2:] == (16, 16)
    raw = processor(images=[image], text="<image>a", images_kwargs={"do_normalize": False})["pixel_values"]
    assert torch.equal(raw, torch.as_tensor(processor.image_processor(image, do_normalize=False)["pixel_values"])[None])
    assert not torch.equal(raw, default) and raw.min() >= 0 and raw.max() <= 1
    padded = processor(text=["a", "a b c"], pad_to_multiple_of=8)["input_ids"]
    assert padded.shape[-1] == 8
    assert processor(text="a", text_kwargs={"pad_to_multiple_of": 4})["input_ids"].shape[-1] == 4
    # the options the call names (padding, padding_side, truncation, max_length) work under `text_kwargs` too
    texts = ["<image>a b c d e f", "<image>a"]
    for options in (
        {"max_length": 4, "truncation": True},
        {"padding": "max_length", "max_length": 12},
        {"padding_side": "right"},
    ):
        flat = processor(images=[[image], [image]], text=texts, **options)
        nested = processor(images=[[image], [image]], text=texts, text_kwargs=options)
        assert torch.equal(flat["input_ids"], nested["input_ids"]), options
        assert torch.equal(flat["attention_mask"], nested["attention_mask"]), options
    for group in ("text_kwargs", "images_kwargs"):
        with pytest.raises(ValueError, match=f"not under `{group}`"):
            processor(images=[image], text="<image>a", **{group: {"return_tensors": "np"}})
    # an option given both flat and nested with other values is an error, as for transformers' processors (the nested
    # value won for the options the call names, the flat one for the others, silently); the same value is taken
    for name, flat, nested, group in (
        ("padding_side", "left", "right", "text_kwargs"),
        ("max_length", 2, 4, "text_kwargs"),
        ("truncation", True, False, "text_kwargs"),
        ("pad_to_multiple_of", 4, 8, "text_kwargs"),
        ("size", 16, 24, "images_kwargs"),
        ("image_mean", np.full(3, 0.5), np.full(3, 0.4), "images_kwargs"),
    ):
        with pytest.raises(ValueError, match=f"`{name}` was given twice with different values, .* under `{group}`"):
            processor(images=[[image], [image]], text=texts, **{name: flat, group: {name: nested}})
        same = processor(images=[[image], [image]], text=texts, **{name: flat, group: {name: copy.deepcopy(flat)}})
        assert torch.equal(
            same["pixel_values"], processor(images=[[image], [image]], text=texts, **{name: flat})["pixel_values"]
        )


def test_processor_takes_one_value_given_flat_and_nested_as_a_list_and_a_tuple():
    """The same value given flat and under `images_kwargs` / `text_kwargs` as a list and a tuple (or a list of
    tensors) is one value, not "given twice with different values" (a list never equals a tuple in Python)."""
    processor = byte_level_processor("a cat, a dog. ", vocab_size=300)
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    expected = processor(images=[image], text="<image>a cat", image_mean=[0.5, 0.5, 0.5])["pixel_values"]
    for nested in ((0.5, 0.5, 0.5), [torch.tensor(0.5)] * 3):
        got = processor(
            images=[image], text="<image>a cat", image_mean=[0.5, 0.5, 0.5], images_kwargs={"image_mean": nested}
        )
        assert torch.equal(got["pixel_values"], expected)
    with pytest.raises(ValueError, match="`image_mean` was given twice with different values"):
        processor(
            images=[image], text="<image>a cat", image_mean=[0.5, 0.5, 0.5], images_kwargs={"image_mean": (0.4,) * 3}
        )


def test_processor_names_a_bad_padding_side_and_refuses_channels_last_pixels(converted, tiny_images):
    """A bad `padding_side` is an error naming it (the tokenizer said "Unknown `direction`", raised a TypeError for a
    non-string, or took it without a word when nothing was padded); `data_format` is channels first only: under
    `images_kwargs` channels last gave `pixel_values` `(batch, num_images, H, W, 3)`, not the documented layout."""
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    image = tiny_images[0]
    for side in ("middle", "LEFT", 1):
        for call in (
            {"text": ["a b", "a"]},
            {"text": ["a b", "a"], "padding": False, "return_tensors": None},
            {"text": "<image>a", "images": [image], "return_labels": True},
        ):
            with pytest.raises(ValueError, match=f"padding_side must be 'left' or 'right', got {side!r}"):
                processor(**call, padding_side=side)
            with pytest.raises(ValueError, match=f"padding_side must be 'left' or 'right', got {side!r}"):
                processor(**call, text_kwargs={"padding_side": side})
    expected = processor(images=[image], text="<image>a")["pixel_values"]
    for options in ({"data_format": "channels_first"}, {"images_kwargs": {"data_format": "channels_first"}}):
        assert torch.equal(processor(images=[image], text="<image>a", **options)["pixel_values"], expected)
    for options in ({"data_format": "channels_last"}, {"images_kwargs": {"data_format": "channels_last"}}):
        with pytest.raises(ValueError, match=r"data_format='channels_last' is not supported .*\(batch, num_images, 3"):
            processor(images=[image], text="<image>a", **options)


def test_processor_device_and_empty_texts(converted, tiny_images):
    """`device` (flat or under `images_kwargs`, as the image processor takes it) returns `pixel_values` there; empty
    texts give integer ids as the tokenizer does, not the floats of a tensor made from empty lists."""
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    image = tiny_images[0]
    for kwargs in ({"device": "meta"}, {"images_kwargs": {"device": "meta"}}):
        out = processor(images=[image], text="<image>a", **kwargs)
        assert out["pixel_values"].device.type == "meta" and out["pixel_values"].shape == (1, 1, 3, 32, 32)
        assert out["input_ids"].device.type == "cpu"
    with pytest.raises(ValueError, match="`device` puts `pixel_values` on a device: it needs return_tensors='pt'"):
        processor(images=[image], text="<image>a", device="cpu", return_tensors="np")
    for text, return_tensors in (("", "pt"), (["", ""], "np")):
        out = processor(text=text, return_tensors=return_tensors, return_labels=True)
        rows = 1 if isinstance(text, str) else len(text)
        for key in ("input_ids", "attention_mask", "labels"):
            assert out[key].dtype in (torch.int64, np.int64) and tuple(out[key].shape) == (rows, 0), key


def test_processor_refuses_images_nested_too_deeply(converted, tiny_images):
    """A row's images as a list of lists (the original's `(batch, images, frames)` layout) is an error: each inner
    list counted as one image and the image processor flattened them, so images went to the next rows, silently."""
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    one, two, three = tiny_images[:3]
    for texts, images in (
        (["<image>a", "<image>b"], [[[one, two]], [[three]]]),
        (["<image>a", "<image>b"], [[[one]], [[two]]]),
        ("<image>a<image>b", [[[one, two], [three]]]),
        (["<image>a", "<image>b"], [[one], [[two]]]),
    ):
        with pytest.raises(ValueError, match="nested too deeply: give one list of images per text"):
            processor(images=images, text=texts)
    # one level less is each row's list of images
    batch = processor(images=[[one], [three]], text=["<image>a", "<image>b"])
    assert torch.equal(batch["pixel_values"][1, 0], processor(images=three, text="<image>b")["pixel_values"][0, 0])


def test_processor_padding_side_is_chosen_on_loading_set_and_saved(converted, tiny_images, tmp_path):
    """`AutoProcessor.from_pretrained(..., padding_side="right")` pads calls on the right (it loaded left before: the
    processor set the tokenizer's side after loading), as does `processor.padding_side = "right"` (the tokenizer's
    side, which `tokenizer.pad` reads, follows); `save_pretrained` keeps the side (a saved processor loaded left
    again). The default stays left (generation), also with only the tokenizer set to right (helper-64: generation
    from such a processor's prompts gave other tokens); a call's `padding_side` and `return_labels=True` choose."""
    texts = ["<image>a b c", "<image>a"]
    images = [[tiny_images[0]], [tiny_images[1]]]
    default = AutoProcessor.from_pretrained(converted("tiny-neox"))
    assert default.padding_side == default.tokenizer.padding_side == "left"
    assert default(images=images, text=texts)["attention_mask"][1, 0] == 0  # left
    right = AutoProcessor.from_pretrained(converted("tiny-neox"), padding_side="right")
    assert right.padding_side == right.tokenizer.padding_side == "right"
    batch = right(images=images, text=texts)
    assert batch["attention_mask"][1, -1] == 0 and batch["attention_mask"][1, 0] == 1  # right
    assert torch.equal(batch["input_ids"], default(images=images, text=texts, padding_side="right")["input_ids"])
    assert right(images=images, text=texts, padding_side="left")["attention_mask"][1, 0] == 0
    # labels pad right unless told otherwise, whatever the processor's side
    assert default(images=images, text=texts, return_labels=True)["attention_mask"][1, -1] == 0
    # saved and loaded with the side it had (the tokenizer's, however it was set), unless chosen on loading
    default.padding_side = "right"
    assert default.tokenizer.padding_side == "right"
    assert torch.equal(default(images=images, text=texts)["input_ids"], batch["input_ids"])
    default.save_pretrained(tmp_path / "right")
    assert AutoProcessor.from_pretrained(tmp_path / "right").padding_side == "right"
    assert AutoProcessor.from_pretrained(tmp_path / "right", padding_side="left").padding_side == "left"
    # the tokenizer's side set alone (as training scripts do) leaves calls, and the saved processor, on the left
    alone = AutoProcessor.from_pretrained(converted("tiny-neox"))
    alone.tokenizer.padding_side = "right"
    assert alone.padding_side == "left" and alone(images=images, text=texts)["attention_mask"][1, 0] == 0
    alone.save_pretrained(tmp_path / "alone")
    assert AutoProcessor.from_pretrained(tmp_path / "alone").padding_side == "left"
    # a processor set to right follows its tokenizer set back to left (as 5.x's pipelines do for generation)
    right.tokenizer.padding_side = "left"
    assert right(images=images, text=texts)["attention_mask"][1, 0] == 0
    right.save_pretrained(tmp_path / "left")
    loaded = AutoProcessor.from_pretrained(tmp_path / "left")
    assert loaded.padding_side == "left" and loaded(images=images, text=texts)["attention_mask"][1, 0] == 0
    for bad in (lambda: AutoProcessor.from_pretrained(converted("tiny-neox"), padding_side="middle"),
                lambda: setattr(loaded, "padding_side", "middle")):  # fmt: skip
        with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
            bad()


def test_processor_counts_a_4d_array_as_its_images(converted, tiny_images):
    """A `(num_images, H, W, 3)` array in a row is that many images: counted as such, and each row keeps its own."""
    import numpy as np
    from PIL import Image

    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    two = np.stack([np.asarray(image.convert("RGB").resize((32, 32))) for image in tiny_images[:2]])
    with pytest.raises(ValueError, match="Text 0 has 1 <image> tokens but 2 images"):
        processor(images=[[two], [tiny_images[2]]], text=["<image>a", "<image>b"])
    batch = processor(images=[[two], [tiny_images[2]]], text=["<image>a<image>b", "<image>c"])
    one_by_one = processor(
        images=[[Image.fromarray(two[0]), Image.fromarray(two[1])], [tiny_images[2]]],
        text=["<image>a<image>b", "<image>c"],
    )
    assert torch.equal(batch["pixel_values"], one_by_one["pixel_values"])
    single = processor(images=two, text="<image>a<image>b")  # one text: the array is its row
    assert torch.equal(single["pixel_values"][0], one_by_one["pixel_values"][0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_processor_truncation_keeps_the_images_of_the_kept_image_tokens(converted, tiny_images, side):
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    text = "<image>first image text here<|endofchunk|><image>second"
    full = processor(images=[tiny_images[0], tiny_images[1]], text=text)
    processor.tokenizer.truncation_side = side
    ids = full["input_ids"][0]
    second = int((ids == processor.image_token_id).nonzero()[1])
    # right: up to just before the second <image>; left: from the second <image> on
    max_length = second if side == "right" else len(ids) - second
    cut = processor(images=[tiny_images[0], tiny_images[1]], text=text, truncation=True, max_length=max_length)
    assert (cut["input_ids"] == processor.image_token_id).sum() == 1
    kept = 0 if side == "right" else 1
    assert torch.equal(cut["pixel_values"][0, 0], full["pixel_values"][0, kept])
    processor.tokenizer.truncation_side = "right"  # the same, given for the call only
    again = processor(
        images=[tiny_images[0], tiny_images[1]], text=text, truncation=True, max_length=max_length, truncation_side=side
    )
    assert torch.equal(again["input_ids"], cut["input_ids"]) and torch.equal(again["pixel_values"], cut["pixel_values"])
    assert processor.tokenizer.truncation_side == "right"
    # `max_length` alone, unpadded: the tokenizer truncates by itself; the images follow the tokens it kept
    implicit = processor(
        images=[tiny_images[0], tiny_images[1]], text=text, max_length=max_length, truncation_side=side, padding=False
    )
    assert torch.equal(implicit["input_ids"], cut["input_ids"])
    assert torch.equal(implicit["pixel_values"], cut["pixel_values"])
    # ... and with the processor's default padding ("longest"), under which the tokenizer alone would keep every token
    padded = processor(images=[tiny_images[0], tiny_images[1]], text=text, max_length=max_length, truncation_side=side)
    assert torch.equal(padded["input_ids"], cut["input_ids"])
    assert torch.equal(padded["pixel_values"], cut["pixel_values"])


def test_processor_return_tensors(converted, tiny_images):
    import numpy as np

    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    kwargs = {"images": [[tiny_images[0]], []], "text": ["<image>a b c", "d"], "return_labels": True}
    as_torch = processor(**kwargs)
    as_numpy = processor(**kwargs, return_tensors="np")
    as_lists = processor(**kwargs, return_tensors=None)
    for name, tensor in as_torch.items():
        assert isinstance(as_numpy[name], np.ndarray) and np.array_equal(as_numpy[name], tensor.numpy())
        assert isinstance(as_lists[name], list)
        assert np.array_equal(np.asarray(as_lists[name]), tensor.numpy())
    unpadded = processor(**kwargs, padding=False, return_tensors=None)
    assert [len(row) for row in unpadded["input_ids"]] == [len(row) for row in unpadded["labels"]] == [4, 1]
    assert unpadded["labels"][0][0] == -100  # the <image> token
    # the model takes tensors only, and says so before anything runs (the LM or `generate` failed deep inside)
    model = tiny_model("gpt_neox")
    for name in ("input_ids", "attention_mask", "labels"):
        for other in (as_numpy, as_lists):
            given = {**as_torch, name: other[name]}
            with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor; got {type(other[name]).__name__}"):
                model(**given)
            if name != "labels":
                with pytest.raises(ValueError, match=f"{name} must be a torch.Tensor"):
                    model.generate(**{k: v for k, v in given.items() if k != "labels"}, max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values must be a torch.Tensor; got ndarray"):
        model(**{**as_torch, "pixel_values": as_numpy["pixel_values"]})
    # `return_token_type_ids=False` is the tokenizer's keyword, and what the processor asks of it anyway
    plain = processor(**kwargs, return_token_type_ids=False)
    assert plain.keys() == as_torch.keys() and torch.equal(plain["input_ids"], as_torch["input_ids"])
    with pytest.raises(ValueError, match="return_token_type_ids=True is not supported: .* takes no token type ids"):
        processor(**kwargs, return_token_type_ids=True)


def test_image_token_in_the_vocabulary_becomes_a_special_token():
    """As the original's `add_special_tokens` call: a tokenizer whose vocabulary has `<image>` as an ordinary entry
    (which text splits into pieces) gets it as a special token with that entry's id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modeling_openflamingo.processing_openflamingo import add_openflamingo_tokens

    vocab = {"<image>": 0, "hi": 1, "<unk>": 2, "<": 3, "image": 4, ">": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tokenizer("<image> hi")["input_ids"] == [3, 4, 5, 1]
    add_openflamingo_tokens(tokenizer)
    assert tokenizer("<image> hi")["input_ids"] == [0, 1]
    assert tokenizer.convert_tokens_to_ids("<|endofchunk|>") == 6 and tokenizer.pad_token == "<PAD>"
    size = len(tokenizer)
    add_openflamingo_tokens(tokenizer)  # idempotent
    assert len(tokenizer) == size


def test_processor_loads_without_the_fast_image_processor_warning(converted):
    """transformers 4.x's `AutoImageProcessor` warns on every load that `use_fast` is unset and that a fast processor
    "will result in minor differences in outputs": this one has no fast variant, so the processor asks for the slow
    one itself (and still loads the fast tokenizer)."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as transformers_logging

    transformers_logging.warning_once.cache_clear()  # (shown once per process)
    logger = transformers_logging.get_logger("transformers.models.auto.image_processing_auto")
    with CaptureLogger(logger) as captured:
        processor = AutoProcessor.from_pretrained(converted("tiny-llama"))
    assert "use_fast" not in captured.out
    assert processor.tokenizer.is_fast


def test_a_chat_template_applies(converted, tiny_images):
    """`apply_chat_template` (and the pipeline's chat path) calls the processor with `videos=None, audio=None`: taken
    as absent, so a template given to the processor gives what the plain call gives; videos or audio are refused."""
    processor = AutoProcessor.from_pretrained(converted("tiny-llama"))
    processor.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}Output:{% endif %}"
    )
    content = [{"type": "image", "image": tiny_images[0]}, {"type": "text", "text": "Describe"}]
    messages = [{"role": "user", "content": content}]
    got = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    expected = processor(images=[tiny_images[0]], text="<image>DescribeOutput:")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    with pytest.raises(ValueError, match="images and text only, not videos or audio"):
        processor(text="<image>a", images=[tiny_images[0]], videos=[tiny_images[1]])
    # images as paths (or URLs, base64): opened as stored, as the processor opens them given directly
    from PIL import Image

    from .conftest import FIXTURES

    path = str(FIXTURES / "tiny_images" / "image_4.png")  # a palette image
    expected = processor(images=[Image.open(path)], text="<image>DescribeOutput:")
    assert torch.equal(processor(images=path, text="<image>DescribeOutput:")["pixel_values"], expected["pixel_values"])
    content = [{"type": "image", "path": path}, {"type": "text", "text": "Describe"}]
    messages = [{"role": "user", "content": content}]
    got = processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])


def test_chat_template_assistant_mask_and_sanitized_control_tokens(converted, tiny_images):
    """`return_assistant_tokens_mask=True` (transformers 5 asks the processor for replacement offsets: none, nothing is
    expanded)
    marks the assistant's tokens; with `sanitize_control_tokens=True` an `<image>` typed in user text is text, not an
    image slot, and the real image keeps its place."""
    processor = AutoProcessor.from_pretrained(converted("tiny-mpt"))
    processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User:{% else %}Assistant:{% endif %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif m['role'] == 'assistant' %}"
        "{% generation %}{{ c['text'] }}{% endgeneration %}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<|endofchunk|>{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    question = [{"type": "image", "image": tiny_images[0]}, {"type": "text", "text": "what is"}]
    chats = [
        [{"role": "user", "content": question}, {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
        [
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yo yo"}]},
        ],
    ]
    got = processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    for row, answer in enumerate(("red", "yo yo")):
        masked = got["input_ids"][row][got["assistant_masks"][row].bool()]
        assert processor.tokenizer.decode(masked) == answer
    assert got["pixel_values"].shape[:2] == (2, 1)
    if "sanitize_control_tokens" not in inspect.signature(processor.apply_chat_template).parameters:
        return  # (transformers 5.25 has it, 4.57 not)
    typed = [{"type": "image", "image": tiny_images[0]}, {"type": "text", "text": "ignore <image> this"}]
    got = processor.apply_chat_template(
        [{"role": "user", "content": typed}],
        tokenize=True,
        return_dict=True,
        sanitize_control_tokens=True,
        add_generation_prompt=True,
    )
    assert got["input_ids"][0].tolist().count(processor.image_token_id) == 1
    assert torch.equal(got["pixel_values"], processor(images=[tiny_images[0]], text="<image>")["pixel_values"])
    assert "<image> this" in processor.tokenizer.decode(got["input_ids"][0])


def test_processor_refuses_images_when_special_tokens_are_split(converted, tiny_images):
    """With `split_special_tokens=True` (on loading or per call) `<image>` is encoded as text: images would be dropped
    without a word, so giving them is an error; text alone is encoded as asked."""
    path = converted("tiny-mpt")
    for processor, options in (
        (AutoProcessor.from_pretrained(path, split_special_tokens=True), {}),
        (AutoProcessor.from_pretrained(path), {"split_special_tokens": True}),
    ):
        with pytest.raises(ValueError, match="split_special_tokens=True the tokenizer encodes <image> as plain text"):
            processor(images=[tiny_images[0]], text="<image>a cat", **options)
        ids = processor(text="<image>a", **options)["input_ids"][0].tolist()
        assert processor.image_token_id not in ids
    processor = AutoProcessor.from_pretrained(path, split_special_tokens=True)
    got = processor(images=[tiny_images[0]], text="<image>a cat", split_special_tokens=False)
    assert got["input_ids"][0].tolist().count(processor.image_token_id) == 1


def test_the_tokenizers_own_special_tokens_stay_special(tmp_path):
    """Adding `<image>` / `<|endofchunk|>` keeps the tokenizer's own additional special tokens special (in
    `all_special_ids`, skipped when decoding), also in a processor saved and loaded; their ids are unchanged."""
    from transformers import AutoTokenizer

    from modeling_openflamingo import OpenFlamingoImageProcessor, OpenFlamingoProcessor

    from .conftest import FIXTURES

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "tiny-mpt" / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    processor = OpenFlamingoProcessor(OpenFlamingoImageProcessor(), tokenizer)
    processor.save_pretrained(tmp_path)
    for tokenizer in (processor.tokenizer, AutoProcessor.from_pretrained(tmp_path).tokenizer):
        ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|endofchunk|>", "<image>"])
        assert ids == [400, 401, 402]
        assert set(ids) <= set(tokenizer.all_special_ids)
        assert tokenizer.decode(tokenizer("<|im_start|>hi<image>")["input_ids"], skip_special_tokens=True) == "hi"


def test_processor_training_labels(converted, tiny_images):
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    batch = processor(
        images=[[tiny_images[0]], [tiny_images[1]]],
        text=["<image>a b<|endofchunk|>", "<image>a<|endofchunk|>"],
        return_labels=True,
    )
    ids, labels = batch["input_ids"], batch["labels"]
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padding
    expected = ids.clone()
    expected[(ids == processor.image_token_id) | (batch["attention_mask"] == 0)] = -100
    assert torch.equal(labels, expected)
    assert (labels == processor.end_of_chunk_token_id).sum() == 2  # <|endofchunk|> stays in the loss
    without_mask = processor(
        images=[[tiny_images[0]], [tiny_images[1]]],
        text=["<image>a b<|endofchunk|>", "<image>a<|endofchunk|>"],
        return_labels=True,
        return_attention_mask=False,
    )
    assert "attention_mask" not in without_mask and torch.equal(without_mask["labels"], labels)


def test_processor_labels_score_only_tokens_after_a_real_one(converted, tiny_images):
    """`return_labels=True` with left padding: a row's first real token follows padding, which predicts nothing, so it
    is no target (it was: one more target than the same rows right-padded, and another loss); with text before the
    first `<image>`, position 0 is no target either way."""
    path = converted("tiny-llama")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    kwargs = dict(images=[[tiny_images[0]], [tiny_images[1]]], text=["a b <image>c d e", "f <image>g"])
    losses, counts = {}, {}
    for side in ("right", "left"):
        batch = processor(**kwargs, return_labels=True, padding_side=side)
        assert (batch["labels"][:, 0] == -100).all()
        counts[side] = int((batch["labels"] != -100).sum())
        with torch.no_grad():
            losses[side] = model(**batch).loss
    assert counts["left"] == counts["right"]
    torch.testing.assert_close(losses["left"], losses["right"], rtol=1e-5, atol=1e-6)


def test_processor_images_of_different_sizes_need_a_fixed_output_size(converted, tiny_images):
    """Without the centre crop, images of other aspect ratios come out in other shapes: one tensor cannot hold them,
    and the error says what does (the image processor's own advice, `return_tensors=None`, is not the processor's)."""
    processor = AutoProcessor.from_pretrained(converted("tiny-neox"))
    wide = tiny_images[0].resize((50, 30))
    with pytest.raises(ValueError, match=r"different shapes .*keep `do_center_crop=True`.*one aspect ratio") as error:
        processor(images=[[tiny_images[0], wide]], text=["<image><image>a"], do_center_crop=False, return_tensors=None)
    assert "return_tensors" not in str(error.value)
    also_wide = tiny_images[1].resize((100, 60))
    same_ratio = processor(images=[[wide], [also_wide]], text=["<image>a", "<image>b"], do_center_crop=False)
    assert same_ratio["pixel_values"].shape[:2] == (2, 1)
    assert same_ratio["pixel_values"].shape[-1] > same_ratio["pixel_values"].shape[-2]  # not cropped


def test_processor_save_load_round_trip(converted, tmp_path, tiny_images):
    processor = AutoProcessor.from_pretrained(converted("tiny-llama"))
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    a = processor(images=[[tiny_images[3]]], text=["<image>x"])
    b = again(images=[[tiny_images[3]]], text=["<image>x"])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert len(again.tokenizer) == len(processor.tokenizer) == 403


def test_processor_push_to_hub_uploads_the_portable_tokenizer_config(converted, tmp_path, monkeypatch):
    """`save_pretrained(..., push_to_hub=True)` uploads from inside `ProcessorMixin.save_pretrained`: what it uploads
    has the tokenizer config that both transformers majors read, as the saved folder does."""
    from types import SimpleNamespace

    import transformers.processing_utils as processing_utils
    from transformers.utils.hub import PushToHubMixin

    processor = AutoProcessor.from_pretrained(converted("tiny-llama"))
    uploaded = {}

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded[repo_id] = json.loads((Path(working_dir) / "tokenizer_config.json").read_text())

    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    monkeypatch.setattr(PushToHubMixin, "_create_repo", lambda self, repo_id, **kwargs: repo_id, raising=False)
    if hasattr(processing_utils, "hf_api"):  # transformers 5.x creates the repo through it
        hub = SimpleNamespace(create_repo=lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
        monkeypatch.setattr(processing_utils, "hf_api", lambda: hub)
    processor.save_pretrained(str(tmp_path / "out"), push_to_hub=True, repo_id="user/tiny")
    config = uploaded["user/tiny"]
    assert config == json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config.get("tokenizer_class") != "TokenizersBackend"
    assert not isinstance(config.get("extra_special_tokens"), list)


def test_demo_runs_offline(tmp_path):
    """README's first set-up command: the offline demo."""
    from .conftest import ROOT

    env = {**os.environ, "OPENFLAMINGO_DEMO_DIR": str(tmp_path / "demo"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "examples/demo.py", "--max-new-tokens", "4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caption:" in result.stdout


def test_demo_refuses_a_folder_of_other_files(tmp_path, monkeypatch):
    """OPENFLAMINGO_DEMO_DIR naming a folder that holds other files: an error that names the variable, the files
    left as they were (the converter's own refusal spoke of an `--overwrite` the user never passed)."""
    from .conftest import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    demo_model = runpy.run_path(str(ROOT / "examples" / "demo_model.py"))
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setenv("OPENFLAMINGO_DEMO_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="set OPENFLAMINGO_DEMO_DIR to a new or empty folder"):
        demo_model["demo_model_dir"]()
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_zero_images_are_a_text_only_call(family):
    """`pixel_values` / `image_hidden_states` of zero images (a collator's stack of a text-only batch's empty image
    lists) are as none given, in the forward and in `generate`: they were refused as "images were given"."""
    model = tiny_model(family).eval()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    empty = {"pixel_values": torch.zeros(2, 0, 3, 32, 32), "image_hidden_states": torch.zeros(2, 0, 4, 32)}
    kw = {"max_new_tokens": 3, "min_new_tokens": 3}
    with torch.no_grad():
        text_only = model(ids).logits
        for name, images in empty.items():
            assert torch.equal(model(ids, **{name: images}).logits, text_only), name
            for beams in (1, 2):
                expected = model.generate(input_ids=ids, num_beams=beams, **kw)
                assert torch.equal(model.generate(input_ids=ids, num_beams=beams, **{name: images}, **kw), expected)
        with pytest.raises(ValueError, match="input_ids contain <image> tokens but no images were given"):
            model(torch.tensor([[5, model.config.media_token_id, 7]]), pixel_values=empty["pixel_values"][:1])


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_logits_to_keep(family):
    model = tiny_model(family)
    ids, pixel_values = inputs()
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pixel_values).logits
        last = model(input_ids=ids, pixel_values=pixel_values, logits_to_keep=1).logits
    assert last.shape == (2, 1, 403)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)
    # with labels the loss needs every position: refused (it was ignored, returning and scoring every position)
    with pytest.raises(ValueError, match="logits_to_keep with labels"):
        model(input_ids=ids, pixel_values=pixel_values, labels=ids, logits_to_keep=1)
    assert model(input_ids=ids, pixel_values=pixel_values, labels=ids, logits_to_keep=0).logits.shape == full.shape


def test_bfloat16_save_with_stale_sub_config_dtypes_reloads_in_one_dtype(tmp_path):
    model = tiny_model("llama")
    model.config.text_config.torch_dtype = torch.float32  # as an LM's own config.json says
    model.config.vision_config.torch_dtype = torch.float32
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids, pixel_values = inputs()
    assert loaded(input_ids=ids, pixel_values=pixel_values.bfloat16()).logits.dtype == torch.bfloat16


def test_whole_model_pickles(tmp_path):
    model = tiny_model("mosaic_gpt")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids, pixel_values = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, pixel_values=pixel_values).logits,
            model(input_ids=ids, pixel_values=pixel_values).logits,
            atol=0,
            rtol=0,
        )
    layer = loaded.language_model.transformer.blocks[1]
    assert type(layer).__name__ == "MptBlock" and hasattr(layer, "flamingo_layer_idx")
