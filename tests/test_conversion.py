"""Conversion of the original checkpoints (presets, hub inputs, errors, dry run) and back to the original format.

No test touches the network: `huggingface_hub` is replaced by a fake hub backed by the fixtures.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_openflamingo import OpenFlamingoProcessor
from modeling_openflamingo.checkpoint_conversion import (
    LM_KEY_RULES,
    OPEN_CLIP_KEY_RULES,
    ConversionError,
    TensorSource,
    build_converted_model,
    build_empty_model,
    checkpoint_key_to_native,
    convert_hf_to_openflamingo,
    convert_openflamingo_checkpoint,
    dry_run,
    export_openflamingo_state_dict,
    lm_config_from_dict,
    lm_family_of,
    load_tokenizer,
    load_torch_file,
    map_key,
    mosaic_gpt_to_mpt_config,
    mpt_config_from_dict,
    native_key_to_checkpoint,
    preset_config,
    resolve_inputs,
    save_atomically,
    unmap_key,
)
from modeling_openflamingo.conversion_model_card import _placement
from modeling_openflamingo.conversion_presets import PRESETS, get_preset

from .conftest import FAMILIES, FIXTURES, ROOT, cli_args, load_cli

FAMILY_OF = {
    "tiny-mpt": "mpt",
    "tiny-mpt-1b-redpajama-200b": "mosaic_gpt",
    "tiny-neox": "gpt_neox",
    "tiny-llama": "llama",
}
IS_V5 = int(transformers.__version__.split(".")[0]) >= 5


def load_reverse_cli():
    path = ROOT / "conversion" / "convert_hf_to_openflamingo.py"
    spec = importlib.util.spec_from_file_location("convert_hf_to_openflamingo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spec_of(family: str) -> dict:
    return json.loads((FIXTURES / family / "spec.json").read_text())


def fixture_kwargs(family: str, **overrides) -> dict:
    src = FIXTURES / family
    kwargs = {
        "checkpoint": src / "checkpoint.pt",
        "lm": src / "lm",
        "tokenizer": src / "tokenizer",
        "open_clip_config": src / "open_clip_config.json",
        "open_clip_weights": src / "open_clip.pt",
        "cross_attn_every_n_layers": spec_of(family)["cross_attn_every_n_layers"],
        "progress": False,
    }
    kwargs.update(overrides)
    return kwargs


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def reference_logits_error(model, family: str) -> float:
    ref = load_file(str(FIXTURES / family / "reference.safetensors"))
    with torch.no_grad():
        out = model(
            input_ids=ref["input_ids_right"], attention_mask=ref["attention_mask_right"], pixel_values=ref["vision_x"]
        )
    return (out.logits.float() - ref["logits_right"]).abs().max().item()


# --------------------------------------------------------------------------------------------------------------------
# A fake hub (the real one is unreachable, and tests must never download)
# --------------------------------------------------------------------------------------------------------------------


class FakeHub:
    """Hub repos backed by local folders; records every call."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[str, Path] = {}
        self.calls: list[tuple] = []

    def add(self, repo_id: str, files: dict[str, Path | str]) -> None:
        folder = self.root / "repos" / repo_id.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copy(content, folder / name)
            else:
                (folder / name).write_text(content)
        self.repos[repo_id] = folder

    def _repo(self, repo_id: str) -> Path:
        if repo_id not in self.repos:
            raise OSError(f"404 Client Error: Repository Not Found for url: https://huggingface.co/{repo_id}")
        return self.repos[repo_id]

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        self.calls.append(("list", repo_id))
        return sorted(p.name for p in self._repo(repo_id).iterdir())

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, cache_dir=None, **kwargs):
        self.calls.append(("snapshot", repo_id, tuple(sorted(allow_patterns or ()))))
        source = self._repo(repo_id)
        dest = self.root / "cache" / repo_id.replace("/", "--")
        dest.mkdir(parents=True, exist_ok=True)
        for name in allow_patterns:
            shutil.copy(source / name, dest / name)
        return str(dest)

    def hf_hub_download(self, repo_id, filename, revision=None, cache_dir=None, **kwargs):
        self.calls.append(("file", repo_id, filename))
        path = self._repo(repo_id) / filename
        if not path.is_file():
            raise OSError(f"404 Client Error: Entry Not Found for url: https://huggingface.co/{repo_id}/{filename}")
        return str(path)


def _no_network(*args, **kwargs):
    raise AssertionError("a test tried to reach the Hugging Face Hub")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    for name in ("hf_hub_download", "snapshot_download", "list_repo_files", "HfApi"):
        monkeypatch.setattr(huggingface_hub, name, _no_network)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "hub")
    for name in ("hf_hub_download", "snapshot_download", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub, name, getattr(hub, name))
    return hub


def lm_repo_files(family: str) -> dict[str, Path]:
    """An LM hub repo: the LM's config and weights plus its tokenizer files (as the real LM repos hold them)."""
    src = FIXTURES / family
    return {p.name: p for folder in (src / "lm", src / "tokenizer") for p in folder.iterdir()}


def open_clip_repo_files(family: str) -> dict[str, Path | str]:
    """An open_clip hub repo like timm/vit_large_patch14_clip_224.openai (config under model_cfg, no quick_gelu)."""
    config = json.loads((FIXTURES / family / "open_clip_config.json").read_text())
    config.pop("quick_gelu")  # the preset must know the OpenAI weights need QuickGELU
    return {
        "open_clip_config.json": json.dumps({"model_cfg": config, "preprocess_cfg": {}}),
        "open_clip_pytorch_model.bin": FIXTURES / family / "open_clip.pt",
        "model.safetensors": "(timm's own layout: must not be downloaded)",
    }


# --------------------------------------------------------------------------------------------------------------------
# The key tables
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_keys_map_both_ways(family):
    ckpt = torch.load(FIXTURES / family / "checkpoint.pt", weights_only=True)
    lm_family = FAMILY_OF[family]
    for key in ckpt:
        native = checkpoint_key_to_native(key, lm_family)
        assert native is not None and not native.startswith("lang_encoder."), key
        assert native_key_to_checkpoint(native, lm_family) == key


def test_lm_rules_are_reversible():
    assert map_key("transformer.blocks.3.mlp.mlp_up.weight", LM_KEY_RULES["mosaic_gpt"]) == (
        "transformer.blocks.3.ffn.up_proj.weight"
    )
    assert unmap_key("transformer.blocks.3.ffn.up_proj.weight", LM_KEY_RULES["mosaic_gpt"]) == (
        "transformer.blocks.3.mlp.mlp_up.weight"
    )
    assert unmap_key("lm_head.weight", LM_KEY_RULES["mpt"]) is None  # tied to wte
    assert unmap_key("lm_head.weight", LM_KEY_RULES["gpt_neox"]) == "embed_out.weight"
    assert unmap_key("embed_out.weight", LM_KEY_RULES["gpt_neox"]) == "embed_out.weight"  # transformers < 5.14
    assert map_key("gpt_neox.layers.0.attention.masked_bias", LM_KEY_RULES["gpt_neox"]) is None


def test_open_clip_fused_attention_splits_and_joins():
    parts = map_key("transformer.resblocks.5.attn.in_proj_weight", OPEN_CLIP_KEY_RULES)
    assert parts == tuple(f"encoder.layers.5.self_attn.{p}_proj.weight" for p in "qkv")
    assert unmap_key("encoder.layers.5.self_attn.k_proj.weight", OPEN_CLIP_KEY_RULES) == (
        "transformer.resblocks.5.attn.in_proj_weight",
        1,
        3,
    )
    assert map_key("proj", OPEN_CLIP_KEY_RULES) is None


# --------------------------------------------------------------------------------------------------------------------
# Round trip: original -> ours -> original
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(family, converted, tmp_path):
    cli = load_reverse_cli()
    out = tmp_path / "checkpoint.pt"
    assert cli.main(["--model", str(converted(family)), "--output", str(out), "--no-progress"]) == 0
    assert_same_tensors(
        torch.load(out, weights_only=True), torch.load(FIXTURES / family / "checkpoint.pt", weights_only=True)
    )


def test_mpt_options_transformers_ignores_are_refused():
    """llm-foundry options that transformers' MPT ignores while the weights keep their names (the conversion would
    succeed and compute without them) are refused; MPT's own activation spelled out is not one of them."""
    raw = json.loads((FIXTURES / "tiny-mpt" / "lm" / "config.json").read_text())
    for change, name in (
        ({"norm_type": "rmsnorm"}, "norm_type"),
        ({"norm_type": "low_precision_rmsnorm"}, "norm_type"),
        ({"attn_config": {**raw["attn_config"], "qk_gn": True}}, "attn_config.qk_gn"),
        ({"attn_config": {**raw["attn_config"], "sliding_window_size": 4}}, "attn_config.sliding_window_size"),
        ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_config.ffn_type"),
        ({"ffn_config": {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "silu"}}}, "ffn_config.ffn_act_fn"),
        ({"ffn_config": {"ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}}, "ffn_config.ffn_act_fn"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"attn_config": {**raw["attn_config"], "attn_logit_softcapping": 30.0}}, "attn_config.attn_logit_softcapping"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"block_overrides": {"order": []}}, "block_overrides"),
        ({"norm_eps": 1e-2, "layer_norm_epsilon": 1e-5}, "norm_eps"),
    ):
        with pytest.raises(ConversionError, match=f"MPT with {re.escape(name)}=.* is not supported"):
            mpt_config_from_dict({**raw, **change})
    spelled_out = {"ffn_type": "mptmlp", "ffn_act_fn": {"name": "gelu", "approximate": "none"}}
    no_window = {**raw["attn_config"], "sliding_window_size": -1}
    same = mpt_config_from_dict({**raw, "ffn_config": spelled_out, "attn_config": no_window})
    assert same.to_dict() == mpt_config_from_dict(raw).to_dict()
    foundry = {**{k: v for k, v in raw.items() if k != "layer_norm_epsilon"}, "norm_eps": 1e-2}
    assert mpt_config_from_dict(foundry).layer_norm_epsilon == 1e-2  # llm-foundry's name for it
    mosaic = json.loads((FIXTURES / "tiny-mpt-1b-redpajama-200b" / "lm" / "config.json").read_text())
    with pytest.raises(ConversionError, match="MosaicGPT with alibi_bias_max=4 is not supported"):
        mosaic_gpt_to_mpt_config({**mosaic, "alibi_bias_max": 4})
    # MosaicGPT's ALiBi slopes are 2^(-8 i / n_heads); transformers' MPT interleaves those of the next power of two
    # (llm-foundry's MPT too): the same for a power of two only (MPT-1B has 16 heads)
    with pytest.raises(ConversionError, match=r"MosaicGPT with n_heads=6 is not supported \(needs a power of two"):
        mosaic_gpt_to_mpt_config({**mosaic, "d_model": 48, "n_heads": 6})
    assert mosaic_gpt_to_mpt_config({**mosaic, "d_model": 64, "n_heads": 8}).n_heads == 8
    with pytest.raises(ConversionError, match="MosaicGPT with attn_clip_qkv with attn_qk_ln=6.0 is not supported"):
        mosaic_gpt_to_mpt_config({**mosaic, "attn_clip_qkv": 6.0})
    assert mosaic_gpt_to_mpt_config({**mosaic, "attn_qk_ln": False, "attn_clip_qkv": 6.0}).attn_config.clip_qkv == 6.0
    with pytest.raises(ConversionError, match="MPT with attn_config.clip_qkv with qk_ln=6.0 is not supported"):
        mpt_config_from_dict({**raw, "attn_config": {**raw["attn_config"], "qk_ln": True, "clip_qkv": 6.0}})


def test_a_gpt_neox_with_an_odd_number_of_rotary_dimensions_is_refused():
    """The transformers the original ran (4.3x) and today's rotate an odd number of dimensions differently (the
    original's queries and keys come out one dimension wider): refused; an even number converts, on either major's
    spelling of the fraction (5.x keeps it in `rope_parameters`)."""
    raw = json.loads((FIXTURES / "tiny-neox" / "lm" / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"odd number of rotary dimensions .*int\(4 \* 0.25\) = 1\)"):
        lm_config_from_dict({**raw, "num_attention_heads": 8, "rotary_pct": 0.25})
    with pytest.raises(ConversionError, match=r"int\(8 \* 0.375\) = 3\)"):
        lm_config_from_dict({**raw, "rotary_pct": 0.375})
    for even in (0.25, 0.5, 1.0):  # 2, 4 and 8 of 8
        config, family = lm_config_from_dict({**raw, "rotary_pct": even})
        assert family == "gpt_neox"
    saved = lm_config_from_dict({**raw, "rotary_pct": 0.25})[0].to_dict()  # as this transformers writes it
    lm_config_from_dict(saved)
    with pytest.raises(ConversionError, match="odd number of rotary dimensions"):
        lm_config_from_dict({**saved, "num_attention_heads": 8})


def test_an_mpt_configs_expansion_ratio_is_what_its_weights_say(converted, tmp_path):
    """transformers' MPT builds its MLP 4x wide whatever `expansion_ratio` says (as the original's transformers did):
    an LM it built with another value converts and computes as the original ran it; an MLP really built narrower
    (llm-foundry's MPT honours the value) does not fit and is refused, naming the weight."""
    lm = tmp_path / "lm"
    shutil.copytree(FIXTURES / "tiny-mpt" / "lm", lm)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "expansion_ratio": 2}))
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", lm=lm), output_dir=tmp_path / "ours")
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-mpt")))
    weights = load_file(str(lm / "model.safetensors"))
    for name, tensor in weights.items():
        if name.endswith("ffn.up_proj.weight"):
            weights[name] = tensor[: tensor.shape[0] // 2].contiguous()
        elif name.endswith("ffn.down_proj.weight"):
            weights[name] = tensor[:, : tensor.shape[1] // 2].contiguous()
    save_file(weights, str(lm / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"ffn\.down_proj\.weight' has shape \(32, 64\) but the model needs"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", lm=lm), output_dir=tmp_path / "narrow")


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-mpt-1b-redpajama-200b"])
def test_reverse_conversion_keeps_an_mpt_lms_own_family_whatever_its_qk_layernorm(family, converted, tmp_path):
    """QK-LayerNorm tells MosaicGPT (MPT-1B, with it) from MPT (MPT-7B, without) on the way back; an MPT with it or a
    MosaicGPT without it is recorded by the conversion, and exported with its own names (with MosaicGPT's, the
    original's `load_state_dict(strict=False)` would have dropped an MPT's LM weights)."""
    lm = tmp_path / "lm"
    shutil.copytree(FIXTURES / family / "lm", lm)
    config = json.loads((lm / "config.json").read_text())
    weights = load_file(str(lm / "model.safetensors"))
    if family == "tiny-mpt":
        config["attn_config"]["qk_ln"] = True
        for i in range(config["n_layers"]):
            for name in ("q_ln", "k_ln"):
                weights[f"transformer.blocks.{i}.attn.{name}.weight"] = torch.full((config["d_model"],), 1.5)
    else:
        assert config.pop("attn_qk_ln")
        weights = {k: v for k, v in weights.items() if ".q_ln." not in k and ".k_ln." not in k}
    (lm / "config.json").write_text(json.dumps(config))
    save_file(weights, str(lm / "model.safetensors"))
    out = convert_openflamingo_checkpoint(**fixture_kwargs(family, lm=lm), output_dir=tmp_path / "ours")
    expected = "mpt" if family == "tiny-mpt" else "mosaic_gpt"
    assert lm_family_of(json.loads((out / "config.json").read_text())) == expected
    checkpoint = convert_hf_to_openflamingo(out, tmp_path / "full.pt", include_lm=True, progress=False)
    keys = torch.load(checkpoint, weights_only=True).keys()
    assert any(k.endswith(".norm_1.weight" if expected == "mpt" else ".ln_1.weight") for k in keys)
    again = convert_openflamingo_checkpoint(
        **fixture_kwargs(family, lm=lm, checkpoint=checkpoint), output_dir=tmp_path / "again"
    )
    assert_same_tensors(folder_tensors(again), folder_tensors(out))
    # the released layouts record nothing: QK-LayerNorm says it
    assert "original_model_type" not in (converted(family) / "config.json").read_text()


@pytest.mark.parametrize("family", ["tiny-neox", "tiny-llama"])
def test_round_trip_from_a_loaded_model(family, converted):
    model = AutoModelForImageTextToText.from_pretrained(converted(family))
    exported = export_openflamingo_state_dict(model.state_dict(), model.config)
    assert_same_tensors(exported, torch.load(FIXTURES / family / "checkpoint.pt", weights_only=True))


def test_export_of_a_model_training_new_token_rows_holds_the_trained_rows(converted, tmp_path):
    """After `freeze_for_training()` the added tokens' rows live in `new_token_embeddings`: the export of the loaded
    model folds them in (as `save_pretrained`), a raw state dict holding them is refused rather than exported with
    the embedding matrix's stale rows, and a PEFT adapter folder is refused with what to do."""
    model = AutoModelForImageTextToText.from_pretrained(converted("tiny-mpt"))
    model.freeze_for_training()
    with torch.no_grad():
        model.new_token_embeddings.weight.add_(1.0)
    from_module = torch.load(convert_hf_to_openflamingo(model, tmp_path / "m.pt", progress=False), weights_only=True)
    model.save_pretrained(tmp_path / "saved")
    from_folder = torch.load(
        convert_hf_to_openflamingo(tmp_path / "saved", tmp_path / "f.pt", progress=False), weights_only=True
    )
    assert_same_tensors(from_module, from_folder)
    rows = from_module["lang_encoder.transformer.wte.weight"][model.new_token_embeddings.token_ids]
    assert torch.equal(rows, model.new_token_embeddings.weight)
    with pytest.raises(ConversionError, match=r"new_token_embeddings.*merge_new_token_embeddings"):
        export_openflamingo_state_dict(model.state_dict(), model.config)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConversionError, match="PEFT adapter folder.*merge_and_unload"):
        convert_hf_to_openflamingo(adapter, tmp_path / "a.pt", progress=False)


def test_full_export_reconverts_to_the_same_model(converted, tmp_path):
    family = "tiny-mpt-1b-redpajama-200b"
    full = tmp_path / "full.pt"
    convert_hf_to_openflamingo(converted(family), full, include_lm=True, include_vision=True, progress=False)
    state = torch.load(full, weights_only=True)
    # the original's names: MosaicGPT's own LM names inside FlamingoLayer, open_clip's fused attention
    assert "lang_encoder.transformer.blocks.0.decoder_layer.ln_1.weight" in state
    assert "lang_encoder.transformer.blocks.0.decoder_layer.mlp.mlp_up.weight" in state
    open_clip = torch.load(FIXTURES / family / "open_clip.pt", weights_only=True)
    assert torch.equal(
        state["vision_encoder.transformer.resblocks.0.attn.in_proj_weight"],
        open_clip["visual.transformer.resblocks.0.attn.in_proj_weight"],
    )
    out = convert_openflamingo_checkpoint(**fixture_kwargs(family, checkpoint=full), output_dir=tmp_path / "again")
    assert_same_tensors(folder_tensors(out), folder_tensors(converted(family)))
    # the model card credits the weights to the checkpoint that held them, the LM's and tower's files with the configs
    card = (out / "README.md").read_text()
    assert "- checkpoint (perceiver, gated cross-attention, token embeddings, language model, vision tower): " in card
    assert "- language model (its config; the weights are the checkpoint's): " in card
    assert "- vision tower (its config; the weights are the checkpoint's): " in card
    plain = (converted(family) / "README.md").read_text()
    assert "- checkpoint (perceiver, gated cross-attention, token embeddings): " in plain
    assert "the weights are the checkpoint's" not in plain


def test_a_full_state_dicts_vision_tower_is_used(converted, tmp_path):
    """As the original's `load_state_dict` of a full state dict: its `vision_encoder.*` weights (a fine-tuned tower)
    win over the vision tower given on its own."""
    family = "tiny-neox"
    full = tmp_path / "full.pt"
    convert_hf_to_openflamingo(converted(family), full, include_vision=True, progress=False)
    state = torch.load(full, weights_only=True)
    state["vision_encoder.transformer.resblocks.0.attn.in_proj_weight"] += 1.0  # q, k and v of layer 0
    state["vision_encoder.ln_pre.weight"] += 1.0
    torch.save(state, full)
    out = convert_openflamingo_checkpoint(**fixture_kwargs(family, checkpoint=full), output_dir=tmp_path / "again")
    got, base = folder_tensors(out), folder_tensors(converted(family))
    prefix = next(k for k in got if k.endswith("pre_layrnorm.weight")).removesuffix("pre_layrnorm.weight")
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    layer0 = prefix + "encoder.layers.0.self_attn."
    assert changed == {prefix + "pre_layrnorm.weight", *(layer0 + f"{p}_proj.weight" for p in "qkv")}
    torch.testing.assert_close(got[prefix + "pre_layrnorm.weight"], base[prefix + "pre_layrnorm.weight"] + 1.0)
    card = (out / "README.md").read_text()
    assert "token embeddings, vision tower): " in card and "- language model: " in card


def test_v1_duplicates_export_and_reconvert(converted, tmp_path):
    ckpt = tmp_path / "v1.pt"
    convert_hf_to_openflamingo(converted("tiny-llama"), ckpt, v1_duplicates=True, progress=False)
    state = torch.load(ckpt, weights_only=True)
    for i in (1, 3):
        assert torch.equal(
            state[f"lang_encoder.gated_cross_attn_layers.{i}.attn.to_q.weight"],
            state[f"lang_encoder.model.layers.{i}.gated_cross_attn_layer.attn.to_q.weight"],
        )
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", checkpoint=ckpt), output_dir=tmp_path / "o")
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-llama")))


def test_reverse_refuses_unmerged_adapters(converted):
    model = AutoModelForImageTextToText.from_pretrained(converted("tiny-llama"))
    state = dict(model.state_dict())
    state["language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(2, 32)
    with pytest.raises(ConversionError, match="merge the adapter"):
        export_openflamingo_state_dict(state, model.config)


@pytest.mark.parametrize(
    "adapter",
    [
        (
            "IA3Config",
            {"target_modules": ["query_key_value", "dense_4h_to_h"], "feedforward_modules": ["dense_4h_to_h"]},
        ),
        ("LoKrConfig", {"target_modules": ["query_key_value"], "r": 2}),
        ("LoHaConfig", {"target_modules": ["to_q"], "r": 2}),  # the perceiver's and the gated blocks' queries
    ],
    ids=["ia3", "lokr", "loha"],
)
def test_reverse_refuses_every_unmerged_peft_adapter(adapter, converted, tmp_path):
    """Not only LoRA's `lora_*` weights: an unmerged IA3 / LoKr model exported with include_lm wrote its layers as
    `...query_key_value.base_layer.weight` and `...ia3_l.default` (names the original ignores with strict=False, so it
    kept the LM's own weights) and exited 0; a LoHa on the queries failed as an incomplete folder."""
    peft = pytest.importorskip("peft")
    name, settings = adapter
    model = peft.get_peft_model(
        AutoModelForImageTextToText.from_pretrained(converted("tiny-neox")), getattr(peft, name)(**settings)
    )
    for include_lm in (False, True):
        with pytest.raises(ConversionError, match="merge the adapter first"):
            convert_hf_to_openflamingo(model, tmp_path / "c.pt", include_lm=include_lm, progress=False)
    assert not (tmp_path / "c.pt").exists()
    merged = convert_hf_to_openflamingo(model.merge_and_unload(), tmp_path / "c.pt", include_lm=True, progress=False)
    assert not [k for k in torch.load(merged, weights_only=True) if "base_layer" in k or "default" in k]


def test_reverse_refuses_a_prompt_tuned_peft_model(converted, tmp_path):
    """Prompt tuning's virtual tokens cannot be merged nor held by the original's checkpoint: the export dropped them
    without a word (exit 0)."""
    peft = pytest.importorskip("peft")
    base = AutoModelForImageTextToText.from_pretrained(converted("tiny-neox"))
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ConversionError, match="prompt-learning adapters .*model.get_base_model"):
        convert_hf_to_openflamingo(model, tmp_path / "c.pt", progress=False)
    assert convert_hf_to_openflamingo(model.get_base_model(), tmp_path / "c.pt", progress=False).is_file()


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint variants
# --------------------------------------------------------------------------------------------------------------------


def _variant(name: str, state: dict) -> dict:
    if name == "module":
        return {f"module.{k}": v for k, v in state.items()}
    if name == "checkpoint_wrapped":
        return {
            k.replace(".gated_cross_attn_layer.", "._checkpoint_wrapped_module.gated_cross_attn_layer."): v
            for k, v in state.items()
        }
    if name == "training":
        return {
            "epoch": 3,
            "model_state_dict": state,
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        }
    if name == "v1_duplicates":
        dup = {
            k.replace("lang_encoder.model.layers.", "lang_encoder.gated_cross_attn_layers.").replace(
                ".gated_cross_attn_layer.", "."
            ): v.clone()
            for k, v in state.items()
            if ".gated_cross_attn_layer." in k
        }
        return {**state, **dup}
    raise ValueError(name)


@pytest.mark.parametrize("variant", ["module", "checkpoint_wrapped", "training", "v1_duplicates"])
def test_checkpoint_variants_convert_identically(variant, converted, tmp_path):
    state = torch.load(FIXTURES / "tiny-llama" / "checkpoint.pt", weights_only=True)
    path = tmp_path / "variant.pt"
    torch.save(_variant(variant, state), path)
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", checkpoint=path), output_dir=tmp_path / "o")
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-llama")))


def test_legacy_pickle_format_is_read(converted, tmp_path):
    state = torch.load(FIXTURES / "tiny-mpt" / "checkpoint.pt", weights_only=True)
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # torch < 1.6 files cannot be memory-mapped
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=path), output_dir=tmp_path / "o")
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-mpt")))


def test_gpt_neox_head_comes_from_the_lm_when_the_checkpoint_lacks_it(converted, tmp_path):
    state = torch.load(FIXTURES / "tiny-neox" / "checkpoint.pt", weights_only=True)
    del state["lang_encoder.embed_out.weight"]
    path = tmp_path / "no_embed_out.pt"
    torch.save(state, path)
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", checkpoint=path), output_dir=tmp_path / "o")
    # the original's resize is a shrink: the LM's first rows, which the released checkpoint also holds
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-neox")))


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_without_its_input_embeddings_is_refused(family, tmp_path):
    """Without them the added tokens' rows would be the LM's untrained ones, with no error: refused, by name."""
    from modeling_openflamingo.checkpoint_conversion import INPUT_EMBEDDINGS

    key = "lang_encoder." + INPUT_EMBEDDINGS[FAMILY_OF[family]]
    state = torch.load(FIXTURES / family / "checkpoint.pt", weights_only=True)
    del state[key]
    path = tmp_path / "no_embeddings.pt"
    torch.save(state, path)
    with pytest.raises(ConversionError, match=rf"{path}: lacks '{key}', the input embeddings"):
        convert_openflamingo_checkpoint(**fixture_kwargs(family, checkpoint=path), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_mixed_precision_converts_in_the_widest(converted, tmp_path):
    """A checkpoint whose first tensor is bf16 and the others fp32 converts in fp32 (nothing rounded), not in the
    first tensor's dtype; the bf16 tensor's values are kept exactly."""
    state = torch.load(FIXTURES / "tiny-neox" / "checkpoint.pt", weights_only=True)
    first = next(iter(state))
    state[first] = state[first].bfloat16()
    path = tmp_path / "mixed.pt"
    torch.save(state, path)
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", checkpoint=path), output_dir=tmp_path / "o")
    tensors, reference = folder_tensors(out), folder_tensors(converted("tiny-neox"))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}
    changed = [k for k in reference if not torch.equal(tensors[k], reference[k])]
    assert len(changed) == 1 and torch.equal(tensors[changed[0]], reference[changed[0]].bfloat16().float())
    # a stray float64 tensor does not make the model float64
    state[first] = state[first].double()
    torch.save(state, path)
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", checkpoint=path), output_dir=tmp_path / "o64")
    assert {t.dtype for t in folder_tensors(out).values() if t.is_floating_point()} == {torch.float32}


def test_checkpoint_without_gated_blocks_is_named(tmp_path):
    """Not reported as a wrong `cross_attn_every_n_layers` with "key None": the file holds no gated block."""
    state = torch.load(FIXTURES / "tiny-neox" / "checkpoint.pt", weights_only=True)
    path = tmp_path / "no_gated.pt"
    torch.save({k: v for k, v in state.items() if "gated_cross_attn" not in k}, path)
    with pytest.raises(ConversionError, match=rf"{path}: the checkpoint holds no gated cross-attention block"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", checkpoint=path), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_llama_head_rows_that_exist_nowhere_are_the_mean_row(tmp_path):
    """An LM with exactly the base vocabulary: lm_head grows by 3 rows that no input has."""
    src = FIXTURES / "tiny-llama"
    lm = tmp_path / "lm"
    lm.mkdir()
    base = spec_of("tiny-llama")["base_vocab"]
    weights = load_file(str(src / "lm" / "model.safetensors"))
    weights = {k: (v[:base].clone() if v.shape[0] == 413 else v) for k, v in weights.items()}
    save_file(weights, str(lm / "model.safetensors"))
    config = json.loads((src / "lm" / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "vocab_size": base}))
    with pytest.warns(UserWarning, match="mean"):
        out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", lm=lm), output_dir=tmp_path / "o")
    head = folder_tensors(out)["language_model.lm_head.weight"]
    assert head.shape[0] == base + 3
    torch.testing.assert_close(head[base:], weights["lm_head.weight"].mean(0, keepdim=True).expand(3, -1))
    assert "mean of the LM's existing output rows" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# Specific errors: the file and the key
# --------------------------------------------------------------------------------------------------------------------


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    data = (FIXTURES / "tiny-mpt" / "checkpoint.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=rf"{path}: cannot be read as a torch checkpoint \(truncated"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=path), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4096\n", "a Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "an HTML or XML page"),
        (bytes(range(256)) * 16, "cannot be read as a torch checkpoint"),
        (b"hello world\n" * 20, "a text file, not a torch checkpoint."),
        (b'{"model_cfg": {"embed_dim": 768}}', "a JSON file, not a torch checkpoint"),
        ("torchscript", "a TorchScript archive (torch.jit.save: code and weights"),
    ],
)
def test_file_that_is_no_checkpoint_is_named_as_such(tmp_path, content, says):
    """Files that are not checkpoints are not called unsafe pickles, and torch's advice to load them with
    `weights_only=False` is not passed on."""
    path = tmp_path / "checkpoint.pt"
    if content == "torchscript":  # (as OpenAI's own ViT-L-14.pt)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=path), output_dir=tmp_path / "o")
    message = str(error.value)
    assert message.startswith(f"{path}: {says}"), message
    assert "needs code" not in message and "weights_only" not in message
    assert not (tmp_path / "o").exists()


def test_intact_torch_file_that_weights_only_cannot_read_is_not_called_corrupt(tmp_path):
    """A plain state dict saved with `pickle_protocol=4` is intact but unreadable with `weights_only=True`: the
    message says to save the tensors again, not to download a corrupt file again."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"perceiver.latents": torch.zeros(2, 2)}, path, pickle_protocol=4)
    with pytest.raises(ConversionError, match=rf"{path}: a torch file whose pickle weights_only=True cannot read"):
        load_torch_file(path)


@pytest.mark.parametrize("record", ["tensor", "pickle"])
def test_checkpoint_with_flipped_bytes_is_refused_as_corrupt(tmp_path, record):
    """torch does not check the zip records' CRC-32; the converter does, so a corrupt tensor is not converted. A
    damaged pickle is named corrupt too, not a file "that needs code to load" (the unpickler's reading of the bytes),
    which would send the user to load it without weights_only."""
    import zipfile

    source = FIXTURES / "tiny-mpt" / "checkpoint.pt"
    with zipfile.ZipFile(source) as archive:
        if record == "tensor":
            info = max(archive.infolist(), key=lambda i: i.file_size)  # a tensor's storage
            assert "/data/" in info.filename
        else:
            info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
        assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(source.read_bytes())
    # the record's bytes follow its local header: 30 bytes, the name, and the local extra field (its length at 28)
    name_length, extra_length = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    offset = info.header_offset + 30 + name_length + extra_length
    for i in range(8 if record == "pickle" else 1):
        data[offset + info.file_size // 2 + i] ^= 0x01 if record == "tensor" else 0x5A
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=rf"{path}: record {info.filename} does not match its CRC-32"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=path), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_truncated_lm_weights(tmp_path):
    lm = tmp_path / "lm"
    shutil.copytree(FIXTURES / "tiny-llama" / "lm", lm)
    data = (lm / "model.safetensors").read_bytes()
    (lm / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ConversionError, match=r"model\.safetensors: .*truncated or corrupt"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", lm=lm), output_dir=tmp_path / "o")


def test_sharded_lm_without_its_index_is_named(tmp_path):
    """Not "lacks N tensors" from the first shard alone: the missing index is named."""
    from transformers import AutoModelForCausalLM

    lm = tmp_path / "lm"
    AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama" / "lm").save_pretrained(lm, max_shard_size="20KB")
    (lm / "model.safetensors.index.json").unlink()
    with pytest.raises(ConversionError, match=r"holds shards \(model-00001-of-.*but not their index"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", lm=lm), output_dir=tmp_path / "o")


def test_lm_weights_given_as_the_checkpoint_are_named(tmp_path):
    state = load_file(str(FIXTURES / "tiny-neox" / "lm" / "model.safetensors"))
    path = tmp_path / "lm.pt"
    torch.save(state, path)
    with pytest.raises(ConversionError, match=rf"{path}: not an OpenFlamingo checkpoint.*weights go to --lm"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", checkpoint=path), output_dir=tmp_path / "o")


def test_the_checkpoint_given_as_the_vision_weights_is_named(tmp_path):
    checkpoint = FIXTURES / "tiny-neox" / "checkpoint.pt"
    with pytest.raises(ConversionError, match=rf"{checkpoint}: an OpenFlamingo checkpoint .* it goes to --checkpoint"):
        convert_openflamingo_checkpoint(
            **fixture_kwargs("tiny-neox", open_clip_weights=checkpoint), output_dir=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_an_output_that_is_a_file_is_named(tmp_path):
    """Not "exists and is not empty (pass --overwrite)", which --overwrite would then refuse."""
    path = tmp_path / "a_file"
    path.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=f"{path} is a file; the output is a folder"):
            convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=path, overwrite=overwrite)
    assert path.read_text() == "x"


@pytest.mark.parametrize(
    ("family", "wrong_n", "key", "right_n"),
    [
        ("tiny-neox", 1, "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.", 2),
        ("tiny-mpt", 2, "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.", 1),
    ],
)
def test_wrong_cross_attn_interval(family, wrong_n, key, right_n, tmp_path):
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(
            **fixture_kwargs(family, cross_attn_every_n_layers=wrong_n), output_dir=tmp_path / "o"
        )
    message = str(error.value)
    assert str(FIXTURES / family / "checkpoint.pt") in message and key in message
    assert f"--cross-attn-every-n-layers {right_n}" in message


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_attn_interval_is_read_from_the_checkpoint(family, tmp_path):
    """Without a preset or `--cross-attn-every-n-layers`, N is where the checkpoint's gated blocks are: the same
    folder as with N given; a dry run of the local file finds it too."""
    n = spec_of(family)["cross_attn_every_n_layers"]
    given = convert_openflamingo_checkpoint(**fixture_kwargs(family), output_dir=tmp_path / "given")
    read = convert_openflamingo_checkpoint(
        **fixture_kwargs(family, cross_attn_every_n_layers=None), output_dir=tmp_path / "read"
    )
    assert json.loads((read / "config.json").read_text())["cross_attn_every_n_layers"] == n
    assert_same_tensors(folder_tensors(read), folder_tensors(given))
    kwargs = fixture_kwargs(family, cross_attn_every_n_layers=None)
    report = dry_run(
        checkpoint=kwargs["checkpoint"], lm=kwargs["lm"], tokenizer=kwargs["tokenizer"],
        vision_config=kwargs["open_clip_config"],
    )  # fmt: skip
    assert f"(every {n})" in report.summary()


def test_cross_attn_interval_read_from_a_checkpoint_trained_with_another_n(tmp_path):
    """tiny-mpt's blocks (N=1) before layers 1 and 3 only: the checkpoint of an N=2 model, converted as one; blocks at
    places that no N gives are refused, naming them."""
    state = torch.load(FIXTURES / "tiny-mpt" / "checkpoint.pt", weights_only=True)
    blocks = ("lang_encoder.transformer.blocks.0.gated_cross_attn_layer.", "lang_encoder.transformer.blocks.2.")
    path = tmp_path / "n2.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith(blocks)}, path)
    out = convert_openflamingo_checkpoint(
        **fixture_kwargs("tiny-mpt", checkpoint=path, cross_attn_every_n_layers=None), output_dir=tmp_path / "o"
    )
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.cross_attn_every_n_layers == 2 and sorted(model.gated_cross_attn_layers) == ["1", "3"]
    # the v1 layout's second copies alone, under an FSDP wrapper's names
    llama = torch.load(FIXTURES / "tiny-llama" / "checkpoint.pt", weights_only=True)
    v1 = _variant("v1_duplicates", llama)
    v1 = {f"module.{k}": t for k, t in v1.items() if ".gated_cross_attn_layer." not in k}
    assert any(k.startswith("module.lang_encoder.gated_cross_attn_layers.") for k in v1)
    torch.save(v1, tmp_path / "v1.pt")
    kwargs = fixture_kwargs("tiny-llama", checkpoint=tmp_path / "v1.pt", cross_attn_every_n_layers=None)
    kwargs.pop("progress")
    inputs = resolve_inputs(**kwargs)
    assert inputs.cross_attn_every_n_layers == spec_of("tiny-llama")["cross_attn_every_n_layers"]
    irregular = tmp_path / "irregular.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith(blocks[1])}, irregular)
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(
            **fixture_kwargs("tiny-mpt", checkpoint=irregular, cross_attn_every_n_layers=None),
            output_dir=tmp_path / "o2",
        )
    message = str(error.value)
    assert str(irregular) in message and "before decoder layers [0, 1, 3]" in message
    assert "no cross_attn_every_n_layers puts them there" in message and not (tmp_path / "o2").exists()


def test_lm_with_fewer_layers_than_the_checkpoint(tmp_path):
    """The message says the LM is too shallow, instead of suggesting the N that was passed."""
    src = FIXTURES / "tiny-llama"
    lm = tmp_path / "lm"
    lm.mkdir()
    config = json.loads((src / "lm" / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (lm / "config.json").write_text(json.dumps(config))
    weights = load_file(str(src / "lm" / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith(("model.layers.2.", "model.layers.3."))},
        lm / "model.safetensors",
    )
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", lm=lm), output_dir=tmp_path / "o")
    message = str(error.value)
    assert "The language model has 2 decoder layers" in message and "--cross-attn-every-n-layers" not in message


def test_checkpoint_of_another_lm_family(tmp_path):
    kwargs = fixture_kwargs("tiny-llama", checkpoint=FIXTURES / "tiny-neox" / "checkpoint.pt")
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    message = str(error.value)
    assert str(FIXTURES / "tiny-neox" / "checkpoint.pt") in message
    assert "'lang_encoder.gpt_neox.embed_in.weight'" in message and "GPT-NeoX" in message and "LLaMA" in message


def test_pickle_that_needs_code(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = torch.load(FIXTURES / "tiny-mpt" / "checkpoint.pt", weights_only=True)
    torch.save({"model_state_dict": state, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=path), output_dir=tmp_path / "o")
    message = str(error.value)
    assert str(path) in message and "'args'" in message and "argparse.Namespace" in message
    assert "needs code to load" in message
    # numpy's and torch's own classes are named too: the entry that holds the class torch refused
    for extra, named in (
        ({"epoch": np.float64(3.0)}, r"entry 'epoch' is a numpy\.\S*scalar"),
        ({"model": torch.nn.Linear(2, 2)}, r"entry 'model' is a torch\.nn\.modules\.linear\.Linear"),
    ):
        torch.save({"model_state_dict": state, **extra}, path)
        with pytest.raises(ConversionError, match=named):
            load_torch_file(path)


class _CallsIntoOs:
    """Pickles as a call of `os.getpid` (as a code-execution payload calls `os.system`): a module torch blocks."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_calls_into_a_blocked_module(tmp_path, zip_format):
    """Refused as unsafe, naming what it needs, in either format: not called corrupt, and without torch's advice to
    load the file with weights_only=False (the advice that would run the payload)."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.zeros(2), "x": _CallsIntoOs()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ConversionError) as error:
        load_torch_file(path)
    message = str(error.value)
    assert f"loading it would call {os.getpid.__module__}.getpid" in message and "Do not load it anywhere" in message
    assert "corrupt" not in message and "weights_only` set to `False`" not in message
    assert "Load it in its own project" not in message  # (the advice for a training script's classes)


def test_tokenizer_that_does_not_fit_the_checkpoint(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "tiny-llama" / "tokenizer"))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(
            **fixture_kwargs("tiny-llama", tokenizer=tmp_path / "tok"), output_dir=tmp_path / "o"
        )
    message = str(error.value)
    assert "'lang_encoder.model.embed_tokens.weight'" in message and "(403, 32)" in message and "tokenizer" in message


@pytest.mark.parametrize("source_says", [None, True, False])
def test_decoded_text_cleans_up_tokenization_spaces_as_the_original(tmp_path, source_says):
    """The original (transformers 4.33) cleaned up tokenization spaces when the tokenizer's config did not say
    otherwise (" ." -> "."); later transformers do not, and 5.x skips it for BPE tokenizers even when asked. A converted
    tokenizer says what the original did, and the processor decodes as the original on both majors."""
    source = tmp_path / "tokenizer"
    shutil.copytree(FIXTURES / "tiny-neox" / "tokenizer", source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("clean_up_tokenization_spaces")
    if source_says is not None:
        config["clean_up_tokenization_spaces"] = source_says
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "o"
    convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", tokenizer=source), output_dir=out)
    cleans_up = source_says is not False
    assert json.loads((out / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is cleans_up
    processor = AutoProcessor.from_pretrained(out)
    ids = processor.tokenizer("a cat , a dog . is n't it ?")["input_ids"]
    expected = "a cat, a dog. isn't it?" if cleans_up else "a cat , a dog . is n't it ?"
    assert processor.batch_decode([ids]) == [expected] and processor.decode(ids) == expected
    assert processor.batch_decode([ids], clean_up_tokenization_spaces=False) == ["a cat , a dog . is n't it ?"]


def test_a_tokenizer_folder_without_a_vocabulary_is_named(tmp_path):
    """The LM's folder is the default tokenizer; one holding weights only is refused as such (transformers would build
    an empty tokenizer, or ask for protobuf), in the dry run as in the conversion."""
    lm_only = FIXTURES / "tiny-mpt" / "lm"
    with pytest.raises(ConversionError, match=r"tokenizer: .*lm holds no tokenizer files .*pass --tokenizer"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", tokenizer=lm_only), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConversionError, match=r"tokenizer: .*lm holds no tokenizer files"):
        dry_run(lm=lm_only, cross_attn_every_n_layers=1)


def _llama_style_tokenizer(folder: Path) -> None:
    """A small tokenizer made as transformers 4.33 saved LLaMA's (the sentencepiece model converted to a
    `tokenizer.json`): character pieces, the legacy normalizer that puts "▁" before every segment of text (after a
    special token too) and for every space, BOS added by the template; its config names `LlamaTokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces = ["<unk>", "<s>", "</s>", "▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:.?"]
    base = Tokenizer(models.BPE({piece: i for i, piece in enumerate(pieces)}, [], unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    base.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    base.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    folder.mkdir()
    base.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True, "add_eos_token": False}))


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_tokenizer_files_tokenize_as_the_original_read_them(tmp_path, family):
    """The hub's GPT-NeoX-20B and LLaMA tokenizer folders name their model's class. transformers 5.x's classes rebuild
    the pipeline from the vocabulary (LLaMA's without 4.33's legacy "▁" after a special token: "<image>Output:" gave
    other ids) and give GPT-NeoX a default pad token (`<PAD>` was then not added: a vocabulary one short). The
    conversion reads the saved pipeline, as 4.33's fast tokenizers ran it, and adds `<PAD>` unless the files name a
    pad token."""
    from tokenizers import Tokenizer

    folder = tmp_path / "tokenizer"
    if family == "gpt_neox":
        shutil.copytree(FIXTURES / "tiny-neox" / "tokenizer", folder)
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "GPTNeoXTokenizer"}))
    else:
        _llama_style_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    base = Tokenizer.from_file(str(folder / "tokenizer.json"))
    size = base.get_vocab_size(with_added_tokens=True)
    assert len(tokenizer) == size + 3 and tokenizer.pad_token == "<PAD>"
    assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [size, size + 1, size + 2]
    for text in ("Output: a dog.", " Hello world", "Question: what is it? Short answer:"):
        assert tokenizer(text)["input_ids"] == base.encode(text).ids, text
    start = base.encode("").ids  # (LLaMA's BOS)
    piece = base.encode("Output: a dog.", add_special_tokens=False).ids  # "▁Output..." for LLaMA, as 4.33 gave
    assert tokenizer("<image>Output: a dog.<|endofchunk|>")["input_ids"] == [*start, size + 1, *piece, size]
    # saved (as the converted folder's processor saves it), it loads as the same tokenizer on either major
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    text = "<image> Hello<|endofchunk|><image>Output:"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert len(reloaded) == len(tokenizer) and reloaded.pad_token == "<PAD>"


@pytest.mark.skipif(not IS_V5, reason="transformers 4.x builds LLaMA's legacy pipeline, as 4.33 did")
def test_a_llama_sentencepiece_model_without_tokenizer_json_is_refused_on_v5(tmp_path):
    """5.x would build it without the legacy prefix space (other ids than the original's): refused, with the way out."""
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"not read")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(ConversionError, match="without tokenizer.json.*legacy prefix space.*transformers 4.57"):
        load_tokenizer(folder)


def test_v1_duplicates_that_differ(tmp_path):
    state = _variant("v1_duplicates", torch.load(FIXTURES / "tiny-llama" / "checkpoint.pt", weights_only=True))
    state["lang_encoder.gated_cross_attn_layers.3.ff.1.weight"] += 1
    path = tmp_path / "v1.pt"
    torch.save(state, path)
    with pytest.raises(ConversionError) as error:
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", checkpoint=path), output_dir=tmp_path / "o")
    message = str(error.value)
    assert str(path) in message and "'lang_encoder.gated_cross_attn_layers.3.ff.1.weight'" in message
    assert "'lang_encoder.model.layers.3.gated_cross_attn_layer.ff.1.weight'" in message


def test_no_progress_silences_the_checksum_bar(tmp_path, capsys, monkeypatch):
    """`--no-progress` silences the bar of the checksum check too (shown for files of 256 MiB and more: here for
    every file), which every released checkpoint.pt showed."""
    from modeling_openflamingo import checkpoint_conversion

    monkeypatch.setattr(checkpoint_conversion, "_CHECK_BAR_MIN_BYTES", 0)
    cli = load_cli()
    assert cli.main(cli_args("tiny-neox", tmp_path / "shown")) == 0
    assert "Checking checkpoint.pt" in capsys.readouterr().err
    assert cli.main([*cli_args("tiny-neox", tmp_path / "silent"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_reports_errors(tmp_path, capsys):
    cli = load_cli()
    args = cli_args("tiny-neox", tmp_path / "o", **{"--cross-attn-every-n-layers": "1"})
    assert cli.main(args) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_reports_bad_arguments_and_configs_without_a_traceback(tmp_path, capsys):
    cli = load_cli()
    for value in ("0", "-1"):  # refused with the arguments, before anything is read
        with pytest.raises(SystemExit) as exit_info:
            cli.main(cli_args("tiny-neox", tmp_path / "o", **{"--cross-attn-every-n-layers": value}))
        assert exit_info.value.code == 2
        assert "--cross-attn-every-n-layers must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--preset", "OpenFlamingo-5B", "--output-dir", str(tmp_path / "o")])
    assert "Unknown preset 'OpenFlamingo-5B'; choose one of" in capsys.readouterr().err
    # more than the LM's layers: the config's own error, as an error line
    assert cli.main(cli_args("tiny-neox", tmp_path / "o", **{"--cross-attn-every-n-layers": "99"})) == 1
    assert "error: `cross_attn_every_n_layers` must be an int in 1..4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_empty_and_integer_checkpoints_are_named(tmp_path):
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(ConversionError, match=rf"{empty} holds no tensors"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=empty), output_dir=tmp_path / "o")
    state = torch.load(FIXTURES / "tiny-mpt" / "checkpoint.pt", weights_only=True)
    key = next(k for k in state if "attn_gate" in k)
    state[key] = state[key].long()
    ints = tmp_path / "ints.pt"
    torch.save(state, ints)
    with pytest.raises(ConversionError, match=rf"key '{key}' is a torch.int64 tensor; .* is a floating-point weight"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=ints), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _json_variant(source: Path, folder: Path, name: str, edit) -> Path:
    """A copy of `source` (a folder) with its JSON file `name` replaced by `edit(contents)`."""
    shutil.copytree(source, folder)
    (folder / name).write_text(json.dumps(edit(json.loads((folder / name).read_text()))))
    return folder


def _open_clip_config(tmp_path: Path, edit) -> Path:
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps(edit(json.loads((FIXTURES / "tiny-mpt" / "open_clip_config.json").read_text()))))
    return path


def _with_vision_cfg(**settings):
    return lambda config: {**config, "vision_cfg": {**config["vision_cfg"], **settings}}


@pytest.mark.parametrize(
    "part, edit, says",
    [
        ("tokenizer_config.json", lambda c: [c], "tokenizer_config.json holds a JSON list, not an object"),
        ("special_tokens_map.json", lambda c: "<PAD>", "special_tokens_map.json holds a JSON str, not an object"),
        ("open_clip", lambda c: [c], "open_clip_config.json holds a JSON list, not an object"),
        ("open_clip", lambda c: {**c, "vision_cfg": None}, "vision_cfg is a NoneType, not an object"),
        ("open_clip", _with_vision_cfg(layers="2"), r"vision_cfg.layers='2': a positive integer is needed"),
        ("open_clip", _with_vision_cfg(head_width=0), r"vision_cfg.head_width=0: a positive integer is needed"),
        ("open_clip", _with_vision_cfg(mlp_ratio="4"), r"vision_cfg.mlp_ratio='4': a positive number is needed"),
    ],
)
def test_config_files_of_the_wrong_shape_are_named(part, edit, says, tmp_path):
    """Hand-edited or mixed-up config files end in an error that names the file and the setting (they raised
    AttributeError, TypeError, ZeroDivisionError or a transformers validation error, a traceback in the CLI)."""
    if part == "open_clip":
        kwargs = fixture_kwargs("tiny-mpt", open_clip_config=_open_clip_config(tmp_path, edit))
    else:
        tokenizer = _json_variant(FIXTURES / "tiny-mpt" / "tokenizer", tmp_path / "tokenizer", part, edit)
        kwargs = fixture_kwargs("tiny-mpt", tokenizer=tokenizer)
    with pytest.raises(ConversionError, match=says):
        convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda c: {**c, "vision_config": [1]}, "vision_config is a list, not an object"),
        (
            lambda c: {**c, "vision_config": {**c["vision_config"], "num_hidden_layers": None}},
            "num_hidden_layers",
        ),
        (lambda c: {**c, "vision_config": {**c["vision_config"], "hidden_size": "32"}}, "hidden_size"),
    ],
)
def test_a_transformers_clip_config_of_the_wrong_shape_is_named(edit, says, converted, tmp_path):
    make_transformers_clip_folder(converted("tiny-neox"), tmp_path / "clip")
    vision = _json_variant(tmp_path / "clip", tmp_path / "clip-edited", "config.json", edit)
    kwargs = fixture_kwargs("tiny-neox", open_clip_config=None, open_clip_weights=None, vision=vision)
    with pytest.raises(ConversionError, match=rf"{vision}: .*{says}"):
        convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")


@pytest.mark.parametrize(
    "entry, says",
    [
        ((3, torch.zeros(1)), "entry 3 is named by a int; a state dict's names are strings"),
        ("sparse", "entry 'perceiver.latents' is a torch.sparse_coo tensor"),
        ("meta", "entry 'perceiver.latents' is a meta tensor, with no data"),
    ],
)
def test_checkpoint_entries_that_are_no_named_dense_tensors_are_named(entry, says, tmp_path):
    """A non-string name raised AttributeError, a sparse tensor NotImplementedError; a meta tensor was reported as a
    parameter that no input provides."""
    state = torch.load(FIXTURES / "tiny-mpt" / "checkpoint.pt", weights_only=True)
    if entry == "sparse":
        state["perceiver.latents"] = state["perceiver.latents"].to_sparse()
    elif entry == "meta":
        state["perceiver.latents"] = torch.empty(state["perceiver.latents"].shape, device="meta")
    else:
        state[entry[0]] = entry[1]
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    with pytest.raises(ConversionError, match=rf"{path}: {says}"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=path), output_dir=tmp_path / "o")


def _without(*fragments):
    return lambda tensors: {k: v for k, v in tensors.items() if not any(f in k for f in fragments)}


@pytest.mark.parametrize(
    "weights, config, says",
    [
        (_without("perceiver."), None, r"lacks 69 tensors of the released checkpoint format .*'perceiver.latents'"),
        (_without("embed_in"), None, r"lacks 1 tensors .*\['lang_encoder.gpt_neox.embed_in.weight'\]"),
        (_without("gated_cross_attn_layers.3."), None, r"lacks \d+ tensors .*gpt_neox.layers.3.gated_cross_attn"),
        (lambda t: {**t, "foo.weight": torch.zeros(1)}, None, r"keys \['foo.weight'\] have no place"),
        (None, lambda c: {k: v for k, v in c.items() if k != "text_config"}, "The model config has no text_config"),
        (None, lambda c: [c], "holds a JSON list, not an object"),
    ],
)
def test_reverse_conversion_refuses_an_export_the_original_would_load_half(weights, config, says, converted, tmp_path):
    """The original reads checkpoint.pt with `load_state_dict(..., strict=False)`: a folder whose weights lack the
    Perceiver, a gated block or the trained embedding rows was exported without them (exit 0), and the original would
    have run with those left random or untrained. A config without text_config raised KeyError."""
    folder = tmp_path / "model"
    shutil.copytree(converted("tiny-neox"), folder)
    if weights is not None:
        save_file(weights(load_file(str(folder / "model.safetensors"))), str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config(json.loads((folder / "config.json").read_text()))))
    with pytest.raises(ConversionError, match=says):
        convert_hf_to_openflamingo(folder, tmp_path / "checkpoint.pt", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_reverse_conversion_refuses_a_folder_and_the_models_own_files(converted, tmp_path, capsys):
    cli = load_reverse_cli()
    model = converted("tiny-mpt")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert cli.main(["--model", str(model), "--output", str(folder), "--overwrite", "--no-progress"]) == 1
    assert f"{folder} is a folder; the output is the checkpoint file to write" in capsys.readouterr().err
    config = Path(model) / "config.json"
    before = config.read_bytes()
    assert cli.main(["--model", str(model), "--output", str(config), "--overwrite", "--no-progress"]) == 1
    assert "the model this conversion reads: --overwrite does not replace it" in capsys.readouterr().err
    assert config.read_bytes() == before
    assert cli.main(["--model", str(model), "--output", str(Path(model) / "new.pt"), "--no-progress"]) == 0
    (Path(model) / "new.pt").unlink()


def test_an_output_under_a_file_is_refused_before_anything_is_read(converted, tmp_path, monkeypatch):
    """An output path whose parent is a file fails at once, with the path named, not after the whole conversion (for
    a 9B model, ~33 GB read) with a bare "File exists"; both directions."""
    from modeling_openflamingo import checkpoint_conversion

    a_file = tmp_path / "a_file"
    a_file.write_text("x")

    def refuse(*args, **kwargs):
        raise AssertionError("read before the output path was checked")

    monkeypatch.setattr(checkpoint_conversion, "resolve_inputs", refuse)
    monkeypatch.setattr(checkpoint_conversion, "export_openflamingo_state_dict", refuse)
    with pytest.raises(ConversionError, match=rf"{a_file} is a file, so {a_file / 'sub' / 'o'} cannot be made"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=a_file / "sub" / "o")
    with pytest.raises(ConversionError, match=rf"{a_file} is a file, so {a_file / 'checkpoint.pt'} cannot be made"):
        checkpoint_conversion.convert_hf_to_openflamingo(converted("tiny-mpt"), a_file / "checkpoint.pt")
    assert a_file.read_text() == "x"


def test_refuses_to_overwrite(converted, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=out)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_folder_that_appears_while_converting_is_not_replaced_without_overwrite(tmp_path, monkeypatch):
    """Without `--overwrite`, a folder made at the output path during the conversion (a second conversion into it,
    or the user's files) is kept, and the conversion fails; `~` in the output paths is the home folder."""
    out = tmp_path / "o"

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        out.mkdir()
        (out / "mine.txt").write_text("precious")

    with pytest.raises(FileExistsError, match="appeared while converting"):
        save_atomically(out, write, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary sibling left
    # with --overwrite too: it replaces an earlier conversion found at the start, not what appears meanwhile
    out = tmp_path / "p"
    real_save = OpenFlamingoProcessor.save_pretrained

    def save_and_meanwhile(self, *args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "mine.txt").write_text("precious")
        return real_save(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(OpenFlamingoProcessor, "save_pretrained", save_and_meanwhile)
        with pytest.raises(FileExistsError, match="replaces only an earlier conversion that was there at the start"):
            convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    monkeypatch.setenv("HOME", str(tmp_path))
    made = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir="~/home-out")
    assert made == tmp_path / "home-out" and (made / "config.json").is_file()
    assert convert_hf_to_openflamingo("~/home-out", "~/home.pt", progress=False) == tmp_path / "home.pt"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConversionError, match="is a PEFT adapter folder"):
        convert_hf_to_openflamingo("~/adapter", tmp_path / "a.pt", progress=False)
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "nowhere.pt")
    with pytest.raises(FileExistsError, match="exists"):  # at the start, not after the export
        convert_hf_to_openflamingo(made, dangling, progress=False)
    # the way back: a checkpoint file that appears meanwhile is kept too
    target = tmp_path / "back.pt"
    real_save = torch.save

    def save_and_meanwhile(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        target.write_text("theirs")

    monkeypatch.setattr(torch, "save", save_and_meanwhile)
    with pytest.raises(FileExistsError, match="appeared while converting"):
        convert_hf_to_openflamingo(made, target, progress=False)
    assert target.read_text() == "theirs" and not list(tmp_path.glob(".back.pt.tmp-*"))


def test_overwrite_replaces_an_earlier_conversion_only(converted, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="is not an earlier conversion"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    shutil.copytree(converted("tiny-mpt"), tmp_path / "earlier")
    (tmp_path / "earlier" / "merges.txt").write_text("from before")  # an earlier conversion's tokenizer file
    (tmp_path / "earlier" / "model-00001-of-00002.safetensors").write_text("from before")  # its shards
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "earlier")  # a symlink: the folder it names is replaced
    again = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=link, overwrite=True)
    assert again == (tmp_path / "earlier").resolve() and link.is_symlink()
    assert not (again / "merges.txt").exists() and not (again / "model-00001-of-00002.safetensors").exists()
    assert_same_tensors(folder_tensors(again), folder_tensors(converted("tiny-mpt")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "link", "o"]  # no temporary sibling left
    # a conversion with what no conversion writes (a hub repository's git clone, the user's notes): refused, kept
    (again / ".git").mkdir()
    (again / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (again / "NOTES.md").write_text("mine")
    with pytest.raises(ConversionError, match=r"holds what a conversion does not write \(\.git, NOTES\.md\)"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=again, overwrite=True)
    assert (again / ".git" / "HEAD").is_file() and (again / "NOTES.md").read_text() == "mine"
    # files of the kinds a conversion writes (*.txt, *.json, *.py) but not of its names: the user's too (were deleted)
    shutil.rmtree(again / ".git")
    (again / "NOTES.md").unlink()
    mine = {"notes.txt": "mine", "eval_results.json": '{"cider": 74.1}', "train.py": "print('mine')"}
    # modules of this package that a conversion does not copy (named as a user's own may be): were deleted too
    mine |= {"data_collator.py": "# mine", "optimization.py": "# mine"}
    for name, text in mine.items():
        (again / name).write_text(text)
    does_not_write = r"\(data_collator\.py, eval_results\.json, notes\.txt, optimization\.py, train\.py\)"
    with pytest.raises(ConversionError, match=rf"holds what a conversion does not write {does_not_write}"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=again, overwrite=True)
    assert all((again / name).read_text() == text for name, text in mine.items())


def test_overwrite_refuses_to_delete_an_input(converted, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(converted("tiny-mpt"), out)
    shutil.copy(FIXTURES / "tiny-mpt" / "checkpoint.pt", out / "checkpoint.pt")
    with pytest.raises(ConversionError, match="is an input of this conversion"):
        convert_openflamingo_checkpoint(
            **fixture_kwargs("tiny-mpt", checkpoint=out / "checkpoint.pt"), output_dir=out, overwrite=True
        )
    assert (out / "checkpoint.pt").is_file()


def test_outputs_have_the_umasks_permissions(converted, tmp_path):
    """Temporary folders and files are owner-only; what is moved into place is not."""
    umask = os.umask(0o022)
    try:
        out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=tmp_path / "o")
        ckpt = convert_hf_to_openflamingo(out, tmp_path / "checkpoint.pt", progress=False)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert ckpt.stat().st_mode & 0o777 == 0o644
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()}
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, oct(0o644))  # every file, the weights that transformers writes included


def test_cli_stopped_by_sigterm_leaves_the_old_folder_and_no_temporary_one(converted, tmp_path):
    import signal

    out = tmp_path / "o"
    shutil.copytree(converted("tiny-mpt"), out)
    args = cli_args("tiny-mpt", out) + ["--overwrite"]
    child = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import load_cli
import modeling_openflamingo.processing_openflamingo as processing
def slow(self, *args, **kwargs):
    print("WRITING", flush=True)
    time.sleep(60)
processing.OpenFlamingoProcessor.save_pretrained = slow
cli = load_cli()
cli.raise_on_termination()
sys.exit(cli.main({args!r}))
"""
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stdout:
        if "WRITING" in line:
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-mpt")))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="a file-size limit for a child process (POSIX)")
def test_cli_writes_that_fail_midway_end_in_one_error_line(converted, tmp_path):
    """A write that fails midway (here a file-size limit; a full disk fails the same way) ends both CLIs with their
    one-line error naming the output, not the writing library's traceback, and leaves nothing behind (not the folders
    it made for the output either)."""
    import resource

    def limited() -> None:  # 200 KB per file: the tiny model's weights do not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"
    reverse = [
        str(ROOT / "conversion" / "convert_hf_to_openflamingo.py"),
        *("--model", str(converted("tiny-mpt")), "--output", str(out / "sub" / "checkpoint.pt"), "--include-lm"),
    ]  # (`sub` made by the converter, and removed again)
    forward = [str(ROOT / "conversion" / "convert_openflamingo_checkpoint.py"), *cli_args("tiny-mpt", out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command, target in ((forward, out), (reverse, out / "sub" / "checkpoint.pt")):
        out.mkdir(exist_ok=True)
        result = subprocess.run(
            [sys.executable, *command, "--no-progress"], preexec_fn=limited, env=env, capture_output=True, text=True
        )
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert f"error: Writing {target} failed (" in result.stderr and "ulimit -f" in result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.iterdir())
        out.rmdir()


def test_an_existing_empty_output_folder_is_filled_in_place(converted, tmp_path, monkeypatch):
    """An existing empty `--output-dir` (a mounted volume, which cannot be moved or replaced: `EBUSY`) is kept and
    filled, `config.json` last; a failed write leaves it empty again. It was moved aside at the end of the whole
    conversion, which failed there for a mount point."""
    import errno

    out = tmp_path / "volume"
    out.mkdir()
    inode = out.stat().st_ino
    replace, order = os.replace, []

    def like_a_mount_point(source, target):  # the folder itself cannot be renamed, its files can
        if Path(source) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(source))
        order.append(Path(target).name)
        return replace(source, target)

    monkeypatch.setattr(os, "replace", like_a_mount_point)
    assert load_cli().main([*cli_args("tiny-mpt", out), "--no-progress"]) == 0
    assert out.stat().st_ino == inode and order[-1] == "config.json"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in converted("tiny-mpt").iterdir())
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-mpt")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]

    empty = tmp_path / "empty"
    empty.mkdir()

    def stopped(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomically(empty, stopped)
    assert list(empty.iterdir()) == []
    # a new volume's lost+found stays; what a fill stopped by SIGKILL left is removed; the folder still counts as empty
    (empty / "lost+found").mkdir()
    (empty / ".tmp-0123abcd").mkdir()
    (empty / ".tmp-0123abcd" / "model.safetensors").write_bytes(b"half")
    assert convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=empty) == empty
    names = sorted(p.name for p in empty.iterdir())
    assert names == sorted(["lost+found", *(p.name for p in converted("tiny-mpt").iterdir())])


def test_save_atomically_names_the_output_of_a_failed_write_and_keeps_the_old_folder(tmp_path):
    output = tmp_path / "o"
    output.mkdir()
    (output / "kept.txt").write_text("old")

    def write(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(ConversionError, match=r"Writing .*o failed \(RuntimeError: \[enforce fail") as error:
        save_atomically(output, write)
    assert isinstance(error.value.__cause__, RuntimeError) and "make room" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"] and (output / "kept.txt").read_text() == "old"

    def write_a_bad_tensor(folder: Path) -> None:  # not the disk: no advice to make room
        raise ValueError("You are trying to save a non contiguous tensor")

    with pytest.raises(ConversionError, match=r"failed \(ValueError: You are trying .*\)\. Nothing was left") as error:
        save_atomically(output, write_a_bad_tensor)
    assert "make room" not in str(error.value) and "GB free" not in str(error.value)
    # the folders it made above the output are removed again (those that were there stay)
    with pytest.raises(ConversionError):
        save_atomically(tmp_path / "deep" / "a" / "o", write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_write_whose_partial_files_cannot_be_removed_names_them(converted, tmp_path, monkeypatch, capsys):
    """A target that turns read-only mid-write (or goes away): the hidden temporary folder / file cannot be removed.
    The error said "Nothing was left in its place" (a 9B model's tens of GB stayed hidden); the way back lost the
    write's own error to the clean-up's OSError and kept the folder it made. Now each names what stayed."""
    import errno

    import modeling_openflamingo.checkpoint_conversion as conversion

    def read_only(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(conversion.shutil, "rmtree", lambda *args, **kwargs: None)  # as on a read-only file system
    for output in (tmp_path / "o", tmp_path / "empty"):
        if output.name == "empty":
            output.mkdir()  # filled in place, from a hidden folder inside it
        with pytest.raises(ConversionError, match="Its partial files could not be removed: delete .*yourself") as error:
            save_atomically(output, read_only)
        left = Path(str(error.value).split("delete ")[1].split(" yourself")[0])
        assert left.is_dir() and left.name.startswith((".o.tmp-", ".tmp-")) and "Nothing was left" not in str(error)
        assert "Writing" in str(error.value) and "Read-only file system" in str(error.value)
    with pytest.raises(KeyboardInterrupt) as stopped:  # an interruption stays one, with a note
        save_atomically(tmp_path / "p", lambda folder: (_ for _ in ()).throw(KeyboardInterrupt))
    if sys.version_info >= (3, 11):
        assert "Its partial files could not be removed" in stopped.value.__notes__[0]

    class NoNotes(KeyboardInterrupt):  # as on Python 3.10, which has no add_note (its AttributeError replaced this)
        def __getattribute__(self, name):
            if name == "add_note":
                raise AttributeError(name)
            return super().__getattribute__(name)

    capsys.readouterr()
    with pytest.raises(NoNotes):
        save_atomically(tmp_path / "q", lambda folder: (_ for _ in ()).throw(NoNotes))
    assert "Its partial files could not be removed: delete" in capsys.readouterr().err
    monkeypatch.undo()

    def save_then_read_only(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:747] . open file failed with strerror: Read-only")

    def unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(torch, "save", save_then_read_only)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(ConversionError, match=r"Writing .*c\.pt failed \(RuntimeError: .*Its partial files could"):
        convert_hf_to_openflamingo(converted("tiny-neox"), tmp_path / "sub" / "c.pt", progress=False)
    monkeypatch.undo()
    assert [p.name[:10] for p in (tmp_path / "sub").iterdir()] == [".c.pt.tmp-"]  # named above


def test_a_stop_while_the_old_folder_is_deleted_leaves_no_hidden_copy(converted, tmp_path, monkeypatch):
    """`--overwrite` moves the earlier conversion aside and deletes it once the new one is in place; SIGTERM or Ctrl-C
    during that deletion left the old folder as a hidden `.NAME.old-*` (a full copy of the model)."""
    import modeling_openflamingo.checkpoint_conversion as conversion

    out = tmp_path / "o"
    shutil.copytree(converted("tiny-mpt"), out)
    real_remove = conversion._remove

    def stopped_midway(path: Path, missing_ok: bool = False) -> None:
        if path.name.startswith(".o.old-"):
            (path / "README.md").unlink()
            raise SystemExit(143)  # SIGTERM, as raise_on_termination() turns it into
        real_remove(path, missing_ok)

    monkeypatch.setattr(conversion, "_remove", stopped_midway)
    with pytest.raises(SystemExit):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-mpt")))


def test_cli_names_the_lm_config_that_lacks_a_key(tmp_path, capsys):
    lm = tmp_path / "lm"
    shutil.copytree(FIXTURES / "tiny-mpt-1b-redpajama-200b" / "lm", lm)
    config = json.loads((lm / "config.json").read_text())
    del config["d_model"]
    (lm / "config.json").write_text(json.dumps(config))
    args = cli_args("tiny-mpt-1b-redpajama-200b", tmp_path / "o", **{"--lm": str(lm)})
    assert load_cli().main(args) == 1
    assert f"error: {lm / 'config.json'}: the LM config lacks 'd_model'." in capsys.readouterr().err


def test_open_clip_options_that_change_the_tower_are_refused(tmp_path):
    """open_clip options that `CLIPVisionModel` does not have and that change what the tower computes or which tokens
    the original takes from it (`global_average_pool`: all of them, the CLS one too) are refused, by the conversion as
    well, rather than converted into another model; defaults spelled out are not."""
    from modeling_openflamingo.checkpoint_conversion import open_clip_vision_config

    config = json.loads((FIXTURES / "tiny-mpt" / "open_clip_config.json").read_text())
    for option, value in (
        ("global_average_pool", True),
        ("pool_type", "avg"),
        ("attentional_pool", True),
        ("input_patchnorm", True),
        ("ls_init_value", 1e-5),
        ("no_ln_pre", True),
        ("pos_embed_type", "sin_cos_2d"),
        ("norm_kwargs", {"eps": 1e-6}),
        ("act_kwargs", {"approximate": "tanh"}),
        ("timm_model_name", "vit_base_patch16_224"),
    ):
        changed = {**config, "vision_cfg": {**config["vision_cfg"], option: value}}
        with pytest.raises(ConversionError, match=f"a vision tower with {option}=.* is not supported"):
            open_clip_vision_config(changed)
    defaults = {"global_average_pool": False, "pool_type": "tok", "ls_init_value": None, "patch_dropout": 0.0}
    spelled_out = {**config, "vision_cfg": {**config["vision_cfg"], **defaults}}
    assert open_clip_vision_config(spelled_out).to_dict() == open_clip_vision_config(config).to_dict()
    changed = {**config, "vision_cfg": {**config["vision_cfg"], "global_average_pool": True}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(changed))
    with pytest.raises(ConversionError, match="global_average_pool=True is not supported"):
        convert_openflamingo_checkpoint(
            **fixture_kwargs("tiny-mpt", open_clip_config=tmp_path / "open_clip_config.json"),
            output_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_dry_run_refuses_vision_options_it_would_not_read(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_cli().parse_args(["--preset", "OpenFlamingo-3B-vitl-mpt1b", "--dry-run", "--vision", "openai/clip"])
    assert (
        exit_.value.code == 2
        and "--vision, --open-clip-weights and --quick-gelu are not read" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "args, error",
    [
        (["--output-dir", "o", "--manifest", "m.json"], "--manifest goes with --dry-run"),
        (["--dry-run", "--push-to-hub", "me/x"], "nothing for --push-to-hub to upload"),
    ],
)
def test_cli_refuses_options_that_would_go_unread(args, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_cli().parse_args(["--preset", "OpenFlamingo-3B-vitl-mpt1b", *args])
    assert exit_.value.code == 2 and error in capsys.readouterr().err


def test_the_working_directory_is_not_replaced(tmp_path, monkeypatch):
    """An output folder that is (or holds) the working directory and would be replaced (an earlier conversion, with
    --overwrite) is refused before any input is read (for a 9B model, ~33 GB); an empty one is filled in place, so the
    working directory stays."""
    from modeling_openflamingo import checkpoint_conversion

    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=tmp_path / "out")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=".") == here
    assert Path.cwd() == here and (here / "config.json").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("read before the output path was checked")

    monkeypatch.setattr(checkpoint_conversion, "resolve_inputs", refuse)
    monkeypatch.chdir(out)
    with pytest.raises(ConversionError, match="is the working directory"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=out, overwrite=True)
    assert Path.cwd() == out and sorted(tmp_path.iterdir()) == [here, out]


def test_an_open_clip_config_without_its_weights_is_refused(tmp_path):
    kwargs = fixture_kwargs("tiny-mpt", open_clip_weights=None)
    with pytest.raises(ConversionError, match="--open-clip-config is the config of --open-clip-weights"):
        convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_checks_the_shard_size_before_reading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_cli().parse_args(
            ["--preset", "OpenFlamingo-3B-vitl-mpt1b", "--output-dir", "o", "--max-shard-size", "5XB"]
        )
    assert exit_.value.code == 2 and "--max-shard-size" in capsys.readouterr().err
    assert load_cli().parse_args(["--dry-run", "--max-shard-size", "1000"]).max_shard_size == 1000


# --------------------------------------------------------------------------------------------------------------------
# Presets and the hub
# --------------------------------------------------------------------------------------------------------------------


def test_preset_downloads_every_part_from_the_hub(fake_hub, tmp_path):
    family = "tiny-mpt-1b-redpajama-200b"  # MosaicGPT, N=1: the OpenFlamingo-3B layout
    fake_hub.add("openflamingo/OpenFlamingo-3B-vitl-mpt1b", {"checkpoint.pt": FIXTURES / family / "checkpoint.pt"})
    fake_hub.add("anas-awadalla/mpt-1b-redpajama-200b", lm_repo_files(family))
    fake_hub.add("timm/vit_large_patch14_clip_224.openai", open_clip_repo_files(family))
    out = tmp_path / "out"
    assert load_cli().main(["--preset", "OpenFlamingo-3B-vitl-mpt1b", "--output-dir", str(out), "--no-progress"]) == 0

    assert ("file", "openflamingo/OpenFlamingo-3B-vitl-mpt1b", "checkpoint.pt") in fake_hub.calls
    snapshots = [call[1:] for call in fake_hub.calls if call[0] == "snapshot"]
    lm_repo = "anas-awadalla/mpt-1b-redpajama-200b"
    assert (lm_repo, ("config.json", "model.safetensors")) in snapshots  # the LM: config and weights only
    assert (lm_repo, ("config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")) in snapshots
    vision_files = ("open_clip_config.json", "open_clip_pytorch_model.bin")  # not timm's own model.safetensors
    assert ("timm/vit_large_patch14_clip_224.openai", vision_files) in snapshots
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert model.config.vision_config.hidden_act == "quick_gelu"
    assert reference_logits_error(model, family) < 1e-4
    card = (out / "README.md").read_text()
    assert "77.3 (0.3)" in card and "93.0 (0.6)" in card and "Table 11" in card  # COCO 4- and 32-shot of OF-3B
    assert "AutoModelForVision2Seq" in card and "AutoModelForImageTextToText" in card
    assert "Apache-2.0" in card and "MIT" in card
    assert "| vision tower: CLIP ViT-L/14 (OpenAI weights) |" in card
    assert "but with another" not in card  # every part is the preset's own
    # `license: other` names its license and links the file that holds each part's (the hub shows both)
    front_matter = card.split("---\n")[1].splitlines()
    assert {"license: other", "license_name: openflamingo-parts", "license_link: LICENSE.md"} <= set(front_matter)
    licenses = (out / "LICENSE.md").read_text()
    assert licenses.startswith("# Licenses: OpenFlamingo-3B (CLIP ViT-L/14, MPT-1B)\n")
    table = [line for line in licenses.splitlines() if line.startswith("| ")]
    assert len(table) == 5 and all(line in card for line in table)  # the card's License section: the same table
    assert "| language model | [anas-awadalla/mpt-1b-redpajama-200b]" in licenses and "| Apache-2.0 |" in licenses
    size = model.config.vision_config.image_size
    assert f"`pixel_values` is `(batch, num_images, 3, {size}, {size})`" in card


def test_preset_parts_can_be_overridden(fake_hub, tmp_path):
    """MPT-7B preset (N=4) with every part overridden: local files and another hub repo."""
    family = "tiny-mpt"
    fake_hub.add("someone/my-mpt", lm_repo_files(family))
    out = tmp_path / "out"
    args = [
        "--preset", "OpenFlamingo-9B-vitl-mpt7b",
        "--checkpoint", str(FIXTURES / family / "checkpoint.pt"),
        "--lm", "someone/my-mpt",
        "--open-clip-config", str(FIXTURES / family / "open_clip_config.json"),
        "--open-clip-weights", str(FIXTURES / family / "open_clip.pt"),
        "--cross-attn-every-n-layers", "1",
        "--output-dir", str(out),
        "--no-progress",
    ]  # fmt: skip
    assert load_cli().main(args) == 0
    assert [c[1] for c in fake_hub.calls if c[0] == "snapshot"] == ["someone/my-mpt", "someone/my-mpt"]
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert reference_logits_error(model, family) < 1e-4
    card = (out / "README.md").read_text()  # another vision tower: not called OpenAI's ViT-L/14
    assert "OpenAI weights" not in card and "see the vision tower's own license" in card
    checkpoint, vision = FIXTURES / family / "checkpoint.pt", FIXTURES / family / "open_clip_config.json"
    assert (
        "> Converted with `--preset OpenFlamingo-9B-vitl-mpt7b` but with another checkpoint "
        f"`{checkpoint}`, another language model [someone/my-mpt](https://huggingface.co/someone/my-mpt), another "
        f"vision tower `{vision.parent}"
    ) in card.replace("\n", " ")


def test_v1_preset_needs_the_lm(tmp_path, capsys):
    assert load_cli().main(["--preset", "OpenFlamingo-9B", "--output-dir", str(tmp_path / "o")]) == 1
    assert "--lm" in capsys.readouterr().err


def test_unknown_hub_repo_is_reported(fake_hub, tmp_path):
    with pytest.raises(ConversionError, match="nobody/nothing is no local path, and downloading it"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", lm="nobody/nothing"), output_dir=tmp_path / "o")


def test_a_mistyped_local_path_that_reads_as_a_hub_id_says_so(fake_hub, tmp_path, monkeypatch):
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    typo = "runs/my-run/checkpoint_3.pt"  # the file is not there: read as repo runs/my-run, file checkpoint_3.pt
    with pytest.raises(ConversionError, match=r"runs/ is a local folder: if runs/my-run/checkpoint_3.pt was meant"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt", checkpoint=typo), output_dir=tmp_path / "o")


def make_transformers_clip_folder(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The vision weights of a converted folder in transformers' CLIPModel layout (as openai/clip-vit-large-patch14)."""
    tensors = folder_tensors(base)
    prefix = "vision_model.vision_model."
    clip = {"vision_model." + k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
    clip["visual_projection.weight"] = torch.zeros(4, 32)
    clip["text_projection.weight"] = torch.zeros(4, 4)
    clip["logit_scale"] = torch.zeros(())
    folder.mkdir(parents=True)
    save_file(clip, str(folder / "model.safetensors"))
    vision_config = json.loads((base / "config.json").read_text())["vision_config"]
    (folder / "config.json").write_text(
        json.dumps({"model_type": "clip", "projection_dim": 4, "vision_config": vision_config, "text_config": {}})
    )
    return tensors


def test_vision_from_a_transformers_clip_folder(converted, tmp_path):
    """The same weights in transformers' CLIPModel layout (e.g. openai/clip-vit-large-patch14) give the same model."""
    tensors = make_transformers_clip_folder(converted("tiny-neox"), tmp_path / "clip")
    kwargs = fixture_kwargs("tiny-neox", open_clip_config=None, open_clip_weights=None, vision=tmp_path / "clip")
    out = convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    assert_same_tensors(folder_tensors(out), tensors)


def test_vision_from_a_transformers_clip_hub_repo(converted, fake_hub, tmp_path):
    tensors = make_transformers_clip_folder(converted("tiny-neox"), tmp_path / "clip")
    files = {p.name: p for p in (tmp_path / "clip").iterdir()}
    fake_hub.add("openai/clip-tiny", {**files, "pytorch_model.bin": "not needed", "tf_model.h5": "not needed"})
    kwargs = fixture_kwargs("tiny-neox", open_clip_config=None, open_clip_weights=None, vision="openai/clip-tiny@main")
    out = convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    assert_same_tensors(folder_tensors(out), tensors)
    assert ("snapshot", "openai/clip-tiny", ("config.json", "model.safetensors")) in fake_hub.calls


def test_an_open_clip_config_that_does_not_say_the_activation_needs_quick_gelu_given(tmp_path):
    """A local copy of timm's OpenAI ViT-L/14 repo (its config has no `quick_gelu`) under a name without "openai":
    an error asking for --quick-gelu / --no-quick-gelu, not a GELU tower silently wrong for OpenAI's weights; with
    the flag, or under a name that says openai, it converts with QuickGELU."""
    for name in ("vitl", "vit_large_patch14_clip_224.openai"):
        folder = tmp_path / name
        folder.mkdir()
        for file, content in open_clip_repo_files("tiny-mpt").items():
            if isinstance(content, Path):
                shutil.copy(content, folder / file)
            elif file.endswith(".json"):
                (folder / file).write_text(content)
    kwargs = fixture_kwargs("tiny-mpt", open_clip_config=None, open_clip_weights=None, vision=tmp_path / "vitl")
    with pytest.raises(ConversionError, match=r"no 'quick_gelu' key\): pass quick_gelu=True \(--quick-gelu\)"):
        convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    expected = folder_tensors(convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=tmp_path / "r"))
    for vision, quick_gelu in ((tmp_path / "vitl", True), (tmp_path / "vit_large_patch14_clip_224.openai", None)):
        out = tmp_path / f"o-{vision.name}"
        convert_openflamingo_checkpoint(**{**kwargs, "vision": vision, "quick_gelu": quick_gelu}, output_dir=out)
        assert json.loads((out / "config.json").read_text())["vision_config"]["hidden_act"] == "quick_gelu"
        assert_same_tensors(folder_tensors(out), expected)
    out = tmp_path / "gelu"
    convert_openflamingo_checkpoint(**{**kwargs, "quick_gelu": False}, output_dir=out)
    assert json.loads((out / "config.json").read_text())["vision_config"]["hidden_act"] == "gelu"


def test_the_output_dtype_is_checked_before_anything_is_read(converted, tmp_path):
    """The Python API's `dtype`: a floating-point torch dtype or its name; "auto", an integer dtype or anything else is
    a ConversionError before any input is read (an int8 `checkpoint.pt` of truncated weights was written)."""
    out = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-mpt"), output_dir=tmp_path / "b", dtype="bfloat16")
    assert {t.dtype for t in folder_tensors(out).values()} == {torch.bfloat16}
    written = convert_hf_to_openflamingo(out, tmp_path / "f.pt", dtype="torch.float16", progress=False)
    assert {t.dtype for t in torch.load(written, weights_only=True).values()} == {torch.float16}
    missing = fixture_kwargs("tiny-mpt", checkpoint=tmp_path / "no-such-file.pt")  # (not reached)
    for dtype in ("auto", "int8", torch.int8, torch.bool, 16):
        with pytest.raises(ConversionError, match=r"the converted weights take a floating-point dtype"):
            convert_openflamingo_checkpoint(**missing, output_dir=tmp_path / "o", dtype=dtype)
        with pytest.raises(ConversionError, match=r"the converted weights take a floating-point dtype"):
            convert_hf_to_openflamingo(out, tmp_path / "i.pt", dtype=dtype, progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "i.pt").exists()


def test_a_tokenizer_with_its_own_pad_token_is_named_in_the_vocabulary_error(tmp_path):
    """A tokenizer that already has a pad token gets no <PAD> (as in the original): one row fewer than the checkpoint's
    matrix; the error says so rather than that <PAD> was added."""
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(FIXTURES / "tiny-llama" / "tokenizer", tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|endoftext|>"}))
    with pytest.raises(ConversionError, match=r"when it has no pad token of its own, <PAD>.*gives one row fewer"):
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-llama", tokenizer=tokenizer), output_dir=tmp_path / "o")


def test_hub_ids():
    from modeling_openflamingo.conversion_hub import HubSpec, parse_hub_spec

    assert parse_hub_spec("openflamingo/OpenFlamingo-3B-vitl-mpt1b") == HubSpec(
        "openflamingo/OpenFlamingo-3B-vitl-mpt1b"
    )
    assert parse_hub_spec("org/repo/sub/ckpt.pt@v1.0") == HubSpec("org/repo", "sub/ckpt.pt", "v1.0")
    assert parse_hub_spec("/abs/path/file.pt") is None and parse_hub_spec("file.pt") is None


def test_checkpoint_file_inside_a_hub_repo(fake_hub, converted, tmp_path):
    fake_hub.add("me/runs", {"checkpoint_7.pt": FIXTURES / "tiny-mpt" / "checkpoint.pt"})
    kwargs = fixture_kwargs("tiny-mpt", checkpoint="me/runs/checkpoint_7.pt@main")
    out = convert_openflamingo_checkpoint(**kwargs, output_dir=tmp_path / "o")
    assert ("file", "me/runs", "checkpoint_7.pt") in fake_hub.calls
    assert_same_tensors(folder_tensors(out), folder_tensors(converted("tiny-mpt")))


def test_push_to_hub(monkeypatch, tmp_path):
    api = mock.MagicMock()
    api.upload_folder.return_value = SimpleNamespace(commit_url="https://huggingface.co/me/of-tiny/commit/abc")
    hf_api = mock.MagicMock(return_value=api)
    monkeypatch.setattr(huggingface_hub, "HfApi", hf_api)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    out = tmp_path / "o"
    args = cli_args("tiny-llama", out) + ["--push-to-hub", "me/of-tiny", "--private", "--no-progress"]
    assert load_cli().main(args) == 0
    api.create_repo.assert_called_once_with(repo_id="me/of-tiny", repo_type="model", private=True, exist_ok=True)
    api.upload_folder.assert_called_once()
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(out.absolute())
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/of-tiny"
    assert 'from_pretrained("me/of-tiny"' in (out / "README.md").read_text()
    # without --private the hub's default visibility (an organization's may be private), not a forced public repo
    api.reset_mock()
    assert (
        load_cli().main([*cli_args("tiny-llama", out), "--overwrite", "--push-to-hub", "me/of-tiny", "--no-progress"])
        == 0
    )
    api.create_repo.assert_called_once_with(repo_id="me/of-tiny", repo_type="model", private=None, exist_ok=True)


class FakeHubRepo:
    """`HfApi` over local folders, with the hub's semantics: `create_repo(exist_ok=True)` keeps an existing repo's
    visibility, `upload_folder` adds and replaces files and deletes only what `delete_patterns` match (and was not
    uploaded in the same commit)."""

    def __init__(self, root: Path) -> None:
        self.root, self.private, self.commits = root, {}, []

    def __call__(self, token=None):
        return self

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        if repo_id not in self.private:
            (self.root / repo_id).mkdir(parents=True)
            self.private[repo_id] = bool(private)

    def repo_info(self, repo_id, repo_type=None):
        return SimpleNamespace(private=self.private[repo_id])

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None, delete_patterns=None):
        repo, added = self.root / repo_id, {p.name for p in Path(folder_path).iterdir()}
        for path in list(repo.iterdir()):
            if path.name not in added and any(fnmatch.fnmatch(path.name, p) for p in delete_patterns or ()):
                path.unlink()
        for name in added:
            shutil.copy(Path(folder_path) / name, repo / name)
        self.commits.append(commit_message)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(self.commits)}")


def test_a_push_replaces_the_weights_of_an_earlier_upload_and_keeps_a_public_repo_public(monkeypatch, tmp_path):
    """Pushed again with other shards (here one file, then 4 shards), the repo kept the first upload's
    `model.safetensors`, which transformers loads ahead of the new shards' index: the old weights. `--private` on a
    repo that exists as a public one uploaded to it (the hub ignores `private` for an existing repo)."""
    from modeling_openflamingo.conversion_hub import push_folder_to_hub

    hub = FakeHubRepo(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    first = convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox"), output_dir=tmp_path / "first")
    (first / "mine.txt").write_text("a file of the repo's owner")  # not a weight: stays in the repo
    push_folder_to_hub(first, "me/of-tiny")
    state = load_file(str(first / "model.safetensors"))
    state["perceiver.latents"] = state["perceiver.latents"] + 100  # a fine-tuned model, converted again sharded
    second = tmp_path / "second"
    shutil.copytree(first, second)
    (second / "model.safetensors").unlink()
    save_file(state, str(second / "model.safetensors"), metadata={"format": "pt"})
    second = convert_hf_to_openflamingo(second, tmp_path / "second.pt", progress=False)
    second = convert_openflamingo_checkpoint(
        **fixture_kwargs("tiny-neox", checkpoint=second), output_dir=tmp_path / "sharded", max_shard_size="800KB"
    )
    assert not (second / "model.safetensors").exists()
    push_folder_to_hub(second, "me/of-tiny")
    repo = tmp_path / "hub" / "me" / "of-tiny"
    assert not (repo / "model.safetensors").exists() and (repo / "mine.txt").is_file()
    latents = AutoModelForImageTextToText.from_pretrained(repo).perceiver.latents
    assert torch.equal(latents, state["perceiver.latents"])
    with pytest.raises(ConversionError, match="exists and is public, and --private does not change an existing repo"):
        push_folder_to_hub(second, "me/of-tiny", private=True)
    assert len(hub.commits) == 2
    push_folder_to_hub(second, "me/private-tiny", private=True)  # a new repo: made private
    assert hub.private["me/private-tiny"] and len(hub.commits) == 3


def test_a_push_deletes_only_the_top_level_weights_of_an_earlier_upload():
    """huggingface_hub matches `delete_patterns` against the whole path with fnmatch (`*` matches `/`): the patterns
    were `*.safetensors`, which deleted an adapter, an ONNX export or the original checkpoint that the repo's owner
    keeps in a subfolder. Matched here as `upload_folder` matches them (both huggingface_hub majors)."""
    from huggingface_hub.utils import filter_repo_objects

    from modeling_openflamingo.conversion_hub import STALE_ON_THE_HUB

    remote = [
        "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json",
        "adapter/adapter_model.safetensors", "onnx/model.safetensors", "original/model-00001-of-00002.safetensors",
        "original/model.safetensors.index.json", "notes.safetensors",
    ]  # fmt: skip
    deleted = sorted(filter_repo_objects(remote, allow_patterns=STALE_ON_THE_HUB))
    assert deleted == ["model-00001-of-00002.safetensors", "model.safetensors", "model.safetensors.index.json"]


def test_push_to_hub_that_cannot_work_is_refused_before_converting(monkeypatch, tmp_path, capsys):
    """A repo id the hub refuses, the hub switched off, or no token: refused at once (the upload came after the whole
    conversion, and its error asked whether one is logged in whatever the cause); nothing is read or written."""
    monkeypatch.setattr(huggingface_hub, "HfApi", mock.MagicMock(side_effect=AssertionError("no upload")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    out = tmp_path / "o"
    args = [*cli_args("tiny-llama", out, **{"--checkpoint": str(tmp_path / "missing.pt")}), "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        load_cli().main([*args, "--push-to-hub", "my org/OpenFlamingo tiny"])
    assert exit_.value.code == 2 and "Repo id must use alphanumeric chars" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        load_cli().main([*args, "--push-to-hub", "me/of-tiny"])
    assert "the hub is switched off here (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SystemExit):
        load_cli().main([*args, "--push-to-hub", "me/of-tiny"])
    assert "no hub token to upload with: log in (`hf auth login`)" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_upload_says_where_the_folder_is_and_asks_for_a_login_only_when_refused(monkeypatch, tmp_path):
    from modeling_openflamingo.conversion_hub import push_folder_to_hub

    folder = tmp_path / "o"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for status, login in ((401, True), (500, False), (None, False)):
        error = RuntimeError("it failed")
        error.response = SimpleNamespace(status_code=status) if status else None
        api = mock.MagicMock()
        api.upload_folder.side_effect = error
        monkeypatch.setattr(huggingface_hub, "HfApi", mock.MagicMock(return_value=api))
        with pytest.raises(ConversionError) as raised:
            push_folder_to_hub(folder, "me/of-tiny")
        message = str(raised.value)
        assert f"upload it later with `hf upload me/of-tiny {folder} .`" in message
        assert ("hf auth login" in message) == login, (status, message)
    # asked for a private repo (which the failure may have left uncreated): so is the command it suggests
    with pytest.raises(ConversionError, match=rf"`hf upload me/of-tiny {re.escape(str(folder))} \. --private`"):
        push_folder_to_hub(folder, "me/of-tiny", private=True)


def test_list_presets(capsys):
    assert load_cli().main(["--list-presets"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{name}: {preset.title}\n" in printed for name, preset in PRESETS.items())
    assert "lm: anas-awadalla/mpt-1b-redpajama-200b-dolly  [mosaic_gpt, instruction-tuned]\n" in printed
    assert "lm: anas-awadalla/mpt-1b-redpajama-200b  [mosaic_gpt]\n" in printed
    assert get_preset("openflamingo/OpenFlamingo-9B").name == "OpenFlamingo-9B-deprecated"
    # an unknown name is the conversion's own error (a ValueError, as every other bad input), through the API too
    with pytest.raises(ConversionError, match=r"^Unknown preset 'OpenFlamingo-3B'; choose one of: OpenFlamingo-3B"):
        preset_config("OpenFlamingo-3B")


# --------------------------------------------------------------------------------------------------------------------
# Dry run: the six presets against manifests derived from the documented checkpoint format
# --------------------------------------------------------------------------------------------------------------------

# From docs/openflamingo-facts.md ("The released models", "The released checkpoint format") and lm-backbones.md.
DOCUMENTED = {
    "OpenFlamingo-3B-vitl-mpt1b": ("transformer.blocks", 2048, 24, 1, 50280, ["transformer.wte.weight"]),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": ("transformer.blocks", 2048, 24, 1, 50280, ["transformer.wte.weight"]),
    "OpenFlamingo-4B-vitl-rpj3b": (
        "gpt_neox.layers",
        2560,
        32,
        2,
        50280,
        ["gpt_neox.embed_in.weight", "embed_out.weight"],
    ),
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": (
        "gpt_neox.layers",
        2560,
        32,
        2,
        50280,
        ["gpt_neox.embed_in.weight", "embed_out.weight"],
    ),
    "OpenFlamingo-9B-vitl-mpt7b": ("transformer.blocks", 4096, 32, 4, 50280, ["transformer.wte.weight"]),
    "OpenFlamingo-9B-deprecated": ("model.layers", 4096, 32, 4, 32003, ["model.embed_tokens.weight"]),
}


def documented_manifest(layers, d, num_layers, n, vocab, embeddings, vision=1024, inner=512, v1_duplicates=False):
    m = {"perceiver.latents": (64, vision), "perceiver.norm.weight": (vision,), "perceiver.norm.bias": (vision,)}
    for j in range(6):
        p = f"perceiver.layers.{j}."
        for norm in ("norm_media", "norm_latents"):
            m[f"{p}0.{norm}.weight"] = m[f"{p}0.{norm}.bias"] = (vision,)
        m[f"{p}0.to_q.weight"], m[f"{p}0.to_kv.weight"] = (inner, vision), (2 * inner, vision)
        m[f"{p}0.to_out.weight"] = (vision, inner)
        m[f"{p}1.0.weight"] = m[f"{p}1.0.bias"] = (vision,)
        m[f"{p}1.1.weight"], m[f"{p}1.3.weight"] = (4 * vision, vision), (vision, 4 * vision)
    for i in range(num_layers):
        if (i + 1) % n:
            continue
        blocks = [f"lang_encoder.{layers}.{i}.gated_cross_attn_layer."]
        if v1_duplicates:
            blocks.append(f"lang_encoder.gated_cross_attn_layers.{i}.")
        for g in blocks:
            m[f"{g}attn.norm.weight"] = m[f"{g}attn.norm.bias"] = (d,)
            m[f"{g}attn.to_q.weight"], m[f"{g}attn.to_kv.weight"] = (inner, d), (2 * inner, vision)
            m[f"{g}attn.to_out.weight"] = (d, inner)
            m[f"{g}attn_gate"] = m[f"{g}ff_gate"] = (1,)
            m[f"{g}ff.0.weight"] = m[f"{g}ff.0.bias"] = (d,)
            m[f"{g}ff.1.weight"], m[f"{g}ff.3.weight"] = (4 * d, d), (d, 4 * d)
    for name in embeddings:
        m[f"lang_encoder.{name}"] = (vocab, d)
    return m


@pytest.mark.parametrize("name", list(PRESETS))
def test_dry_run_matches_the_documented_checkpoint_format(name):
    documented = documented_manifest(*DOCUMENTED[name])
    report = dry_run(name)
    assert report.checkpoint_manifest == documented
    # and a checkpoint of exactly that format passes every check (the v1 one with its duplicate blocks too)
    checked = dry_run(name, checkpoint=TensorSource.from_manifest("documented", documented))
    assert checked.plan.tensors.keys() == report.plan.tensors.keys()
    if name == "OpenFlamingo-9B-deprecated":
        v1 = documented_manifest(*DOCUMENTED[name], v1_duplicates=True)
        assert len(dry_run(name, checkpoint=TensorSource.from_manifest("v1", v1)).plan.aliases) == 8 * 11
        assert report.plan.invented_rows == ["language_model.lm_head.weight"]


def test_dry_run_reports_a_checkpoint_that_does_not_fit():
    documented = documented_manifest(*DOCUMENTED["OpenFlamingo-4B-vitl-rpj3b"])
    with pytest.raises(ConversionError, match=r"key 'lang_encoder\.gpt_neox\.layers\.1\.gated_cross_attn_layer"):
        dry_run("OpenFlamingo-4B-vitl-rpj3b-langinstruct", checkpoint=TensorSource.from_manifest("x", documented),
                cross_attn_every_n_layers=4)  # fmt: skip
    with pytest.raises(ConversionError, match=r"key 'lang_encoder\.gpt_neox\..*GPT-NeoX.*LLaMA"):
        dry_run("OpenFlamingo-9B", checkpoint=TensorSource.from_manifest("x", documented))


@pytest.mark.parametrize(
    "override, error",
    [
        ({"cross_attn_every_n_layers": 2}, r"trained with N=1: pass --cross-attn-every-n-layers 1"),
        ({"lm": FIXTURES / "tiny-neox" / "lm"}, r"belongs to a MosaicGPT or MPT language model.*GPT-NeoX"),
        ({"tokenizer": FIXTURES / "tiny-llama" / "tokenizer"}, r"is the tokenizer the one the checkpoint was trained"),
        ({"vision_config": FIXTURES / "tiny-mpt" / "open_clip_config.json"}, r"perceiver.*has shape"),
    ],
)
def test_dry_run_checks_overrides_against_the_presets_released_checkpoint(override, error):
    """Without a local file, the preset's released format is the one its own parts give: an overridden part that
    does not fit it fails the dry run, as it fails the real conversion."""
    with pytest.raises(ConversionError, match=error):
        dry_run("OpenFlamingo-3B-vitl-mpt1b", **override)


def test_dry_run_cli_writes_the_manifest(tmp_path, capsys):
    manifest = tmp_path / "manifest.json"
    args = ["--preset", "OpenFlamingo-4B-vitl-rpj3b", "--dry-run", "--manifest", str(manifest)]
    assert load_cli().main(args) == 0
    assert "Dry run" in capsys.readouterr().out
    written = {k: tuple(v) for k, v in json.loads(manifest.read_text()).items()}
    assert written == documented_manifest(*DOCUMENTED["OpenFlamingo-4B-vitl-rpj3b"])


@pytest.mark.parametrize("family", FAMILIES)
def test_dry_run_checks_a_local_checkpoint(family):
    src = FIXTURES / family
    report = dry_run(
        checkpoint=src / "checkpoint.pt",
        lm=src / "lm",
        tokenizer=src / "tokenizer",
        vision_config=src / "open_clip_config.json",
        cross_attn_every_n_layers=spec_of(family)["cross_attn_every_n_layers"],
    )
    assert report.checked_file == str(src / "checkpoint.pt")
    assert set(report.checkpoint_manifest) == set(torch.load(src / "checkpoint.pt", weights_only=True))
    count = len(report.checkpoint_manifest)
    assert f"checkpoint.pt must hold {count} tensors; {src / 'checkpoint.pt'} holds {count}" in report.summary()


def test_dry_run_says_what_a_local_checkpoint_lacks(tmp_path):
    src = FIXTURES / "tiny-neox"
    state = torch.load(src / "checkpoint.pt", weights_only=True)
    del state["lang_encoder.embed_out.weight"]  # the one tensor with a fallback (the LM's own head)
    torch.save(state, tmp_path / "checkpoint.pt")
    report = dry_run(
        checkpoint=tmp_path / "checkpoint.pt",
        lm=src / "lm",
        tokenizer=src / "tokenizer",
        vision_config=src / "open_clip_config.json",
        cross_attn_every_n_layers=2,
    )
    count = len(report.checkpoint_manifest)
    assert f"holds {count - 1}" in report.summary()
    assert "absent from it, taken from the other inputs: ['lang_encoder.embed_out.weight']" in report.summary()


@pytest.mark.parametrize(
    ("part", "dropped", "ours"),
    [
        ("checkpoint", "perceiver.layers.0.0.norm_media.weight", "perceiver.layers.0.attn.norm_media.weight"),
        (
            "checkpoint",
            "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.ff_gate",
            "gated_cross_attn_layers.1.ff_gate",
        ),
        (
            "lm",
            "gpt_neox.layers.2.mlp.dense_h_to_4h.weight",
            "language_model.gpt_neox.layers.2.mlp.dense_h_to_4h.weight",
        ),
        ("vision", "visual.transformer.resblocks.1.ln_1.weight", "vision_model.encoder.layers.1.layer_norm1.weight"),
    ],
)
def test_a_missing_tensor_is_named_as_its_file_names_it(tmp_path, part, dropped, ours):
    """The error names the key the user can look for in that file (and the converted model's name beside it)."""
    src = FIXTURES / "tiny-neox"
    if part == "lm":
        shutil.copytree(src / "lm", tmp_path / "lm")
        state = load_file(tmp_path / "lm" / "model.safetensors")
        del state[dropped]
        save_file(state, tmp_path / "lm" / "model.safetensors", metadata={"format": "pt"})
        overrides = {"lm": tmp_path / "lm"}
    else:
        file, argument = {
            "checkpoint": ("checkpoint.pt", "checkpoint"),
            "vision": ("open_clip.pt", "open_clip_weights"),
        }[part]
        state = torch.load(src / file, weights_only=True)
        del state[dropped]
        torch.save(state, tmp_path / file)
        overrides = {argument: tmp_path / file}
    with pytest.raises(ConversionError, match="lacks 1 tensors") as error:
        convert_openflamingo_checkpoint(**fixture_kwargs("tiny-neox", **overrides), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    message = str(error.value)
    assert repr(dropped) in message and ours in message, message  # (4.x nests the tower: vision_model.vision_model.)


# --------------------------------------------------------------------------------------------------------------------
# The converted folder
# --------------------------------------------------------------------------------------------------------------------


def test_model_is_built_without_memory_and_loaded_without_copies():
    family = "tiny-llama"
    inputs = resolve_inputs(**{k: v for k, v in fixture_kwargs(family).items() if k != "progress"})
    empty = build_empty_model(_config_for(inputs))
    assert all(p.is_meta for p in empty.parameters())
    converted = build_converted_model(inputs, progress=False)
    # same dtype as the inputs: the model's tensors ARE the (memory-mapped) input tensors, not copies
    assert converted.model.perceiver.latents.data_ptr() == inputs.checkpoint.load("perceiver.latents").data_ptr()
    assert not any(p.is_meta for p in converted.model.parameters())


def _config_for(inputs):
    from modeling_openflamingo.checkpoint_conversion import make_config

    return make_config(inputs.lm_config, inputs.vision.config, inputs.cross_attn_every_n_layers, 403, 401, 400, 402)


def test_generation_config_and_processor(converted):
    folder = converted("tiny-mpt")
    spec = spec_of("tiny-mpt")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == spec["eoc_token_id"] and generation["pad_token_id"] == spec["pad_token_id"]
    config = json.loads((folder / "config.json").read_text())
    assert "AutoModelForImageTextToText" in config["auto_map"] and (folder / "modeling_openflamingo.py").is_file()
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_token_id == spec["media_token_id"]


@pytest.mark.filterwarnings("ignore:The class `AutoModelForVision2Seq` is deprecated")
def test_sharded_bfloat16_folder_loads_with_the_auto_classes(tmp_path):
    family = "tiny-llama"
    out = tmp_path / "bf16"
    args = cli_args(family, out, **{"--dtype": "bfloat16", "--max-shard-size": "100KB"}) + ["--no-progress"]
    assert load_cli().main(args) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    assert all(t.dtype == torch.bfloat16 for t in folder_tensors(out).values() if t.is_floating_point())
    auto_classes = [AutoModelForImageTextToText]
    if not IS_V5:
        auto_classes.append(transformers.AutoModelForVision2Seq)
    for auto in auto_classes:
        model = auto.from_pretrained(out, **({"dtype": "auto"} if IS_V5 else {"torch_dtype": "auto"})).eval()
        assert model.dtype == torch.bfloat16
        assert reference_logits_error(model, family) < 0.15


_REMOTE_CODE_SCRIPT = r"""
import json, sys
sys.modules["modeling_openflamingo"] = None  # unimportable, even where it is installed (CI's editable install)
try:
    import modeling_openflamingo  # noqa: F401
    raise SystemExit("modeling_openflamingo should not be importable here")
except ImportError:
    pass
import torch, transformers
from safetensors.torch import load_file
major = int(transformers.__version__.split(".")[0])
classes = [transformers.AutoModelForImageTextToText]
if major < 5:
    classes.append(transformers.AutoModelForVision2Seq)
results = []
for folder, reference in json.loads(sys.argv[1]):
    ref = load_file(reference)
    processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for auto in classes:
        kwargs = {"dtype": "auto"} if major >= 5 else {"torch_dtype": "auto"}
        model = auto.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
        with torch.no_grad():
            out = model(input_ids=ref["input_ids_right"], attention_mask=ref["attention_mask_right"],
                        pixel_values=ref["vision_x"])
        error = (out.logits.float() - ref["logits_right"]).abs().max().item()
        prompt = dict(input_ids=ref["input_ids_left"], attention_mask=ref["attention_mask_left"],
                      pixel_values=ref["vision_x"], max_new_tokens=8, min_new_tokens=8)
        greedy = model.generate(**prompt)
        fast_equal = None
        if major >= 5:
            # the folder's copy of the decoding fast path (`fast_decoding.py`), let run on the CPU (uncompiled)
            fast = sys.modules[type(model).__module__.rpartition(".")[0] + ".fast_decoding"]
            fast._StaticDecoder.run_on_cpu = True
            fast_greedy = model.generate(**prompt, cache_implementation="static")
            fast._StaticDecoder.run_on_cpu = False
            fast_equal = model in fast._STATIC_DECODERS and torch.equal(fast_greedy, greedy)
        results.append([folder, auto.__name__, type(model).__module__, str(model.dtype), error,
                        type(processor).__name__, torch.equal(greedy, ref["greedy"]), fast_equal])
print(json.dumps(results))
"""


def test_converted_folders_load_with_remote_code_without_the_package(converted, tmp_path):
    """A subprocess whose sys.path excludes the repo: only the code files inside the folders can be used. They give
    the original's logits and greedy ids, and on transformers 5.x the copy's decoding fast path gives `generate`'s."""
    sharded = tmp_path / "sharded-bf16"
    args = cli_args("tiny-neox", sharded, **{"--dtype": "bfloat16", "--max-shard-size": "100KB"}) + ["--no-progress"]
    assert load_cli().main(args) == 0
    jobs = [
        [
            str(converted("tiny-mpt-1b-redpajama-200b")),
            str(FIXTURES / "tiny-mpt-1b-redpajama-200b" / "reference.safetensors"),
        ],
        [str(sharded), str(FIXTURES / "tiny-neox" / "reference.safetensors")],
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", "-c", _REMOTE_CODE_SCRIPT, json.dumps(jobs)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * (1 if IS_V5 else 2)
    for folder, _auto, module, dtype, error, processor, greedy_equal, fast_equal in rows:
        assert module.startswith("transformers_modules"), module
        assert processor == "OpenFlamingoProcessor"
        assert fast_equal is (True if IS_V5 else None)  # the copy's fast path ran and gave `generate`'s ids
        if folder == str(sharded):
            assert dtype == "torch.bfloat16" and error < 0.15
        else:
            assert dtype == "torch.float32" and error < 1e-4 and greedy_equal


_IMPORT_IN_FOLDER_SCRIPT = r"""
import os, sys
if sys.argv[1] == "not-installed":  # the package cannot be found outside the folder
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_openflamingo" and "" not in sys.path:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Hide())
import modeling_openflamingo
from transformers import AutoModelForImageTextToText, AutoProcessor
print(modeling_openflamingo.__file__)
model = AutoModelForImageTextToText.from_pretrained(".")
AutoProcessor.from_pretrained(".")
print(type(model).__module__, type(model) is modeling_openflamingo.OpenFlamingoForConditionalGeneration)
"""


def test_import_inside_a_converted_folder_is_the_package(converted, tmp_path):
    """A converted folder carries `modeling_openflamingo.py` (for `trust_remote_code`), the package's name: Python
    started in that folder (a REPL, a notebook, `python -c`) finds it first. It hands over to the installed package;
    without one, a clear error says what the file is and how to load the folder."""
    folder = tmp_path / "model"
    shutil.copytree(converted("tiny-mpt"), folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = functools.partial(subprocess.run, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    result = run([sys.executable, "-c", _IMPORT_IN_FOLDER_SCRIPT, "installed"])
    assert result.returncode == 0, result.stderr[-3000:]
    package_file, line = result.stdout.strip().splitlines()[-2:]
    assert Path(package_file) == ROOT / "modeling_openflamingo" / "__init__.py"
    assert line == "modeling_openflamingo.modeling_openflamingo True"
    result = run([sys.executable, "-c", _IMPORT_IN_FOLDER_SCRIPT, "not-installed"])
    assert result.returncode == 1
    assert "is a saved OpenFlamingo folder's copy of the model code, not the package" in result.stderr
    assert "trust_remote_code=True" in result.stderr


def test_failed_conversion_leaves_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConversionError):
            convert_openflamingo_checkpoint(
                **fixture_kwargs("tiny-neox", cross_attn_every_n_layers=1), output_dir=tmp_path / "o"
            )
    assert list(tmp_path.iterdir()) == []


def test_model_card_counts_a_pinned_revision_or_file_of_the_presets_repo_as_its_own():
    from types import SimpleNamespace

    from modeling_openflamingo.conversion_model_card import _replaced_parts_note
    from modeling_openflamingo.conversion_presets import DEFAULT_VISION, get_preset

    preset = get_preset("OpenFlamingo-3B-vitl-mpt1b")
    for checkpoint in (preset.checkpoint, f"{preset.checkpoint}@main", f"{preset.checkpoint}/checkpoint.pt"):
        inputs = SimpleNamespace(
            checkpoint_origin=checkpoint, lm_origin=preset.lm, vision=SimpleNamespace(origin=DEFAULT_VISION)
        )
        assert _replaced_parts_note(preset, inputs) == []
    inputs.checkpoint_origin = "someone/fine-tuned@v2"
    assert "another checkpoint [someone/fine-tuned@v2]" in _replaced_parts_note(preset, inputs)[0]


@pytest.mark.parametrize(
    ("blocks", "every_n", "words"),
    [
        (4, 1, "4 gated cross-attention blocks, one before each decoder layer"),
        (16, 2, "16 gated cross-attention blocks, before every 2nd decoder layer"),
        (1, 3, "1 gated cross-attention block, before every 3rd decoder layer"),
        (8, 4, "8 gated cross-attention blocks, before every 4th decoder layer"),
        (2, 11, "2 gated cross-attention blocks, before every 11th decoder layer"),
        (1, 22, "1 gated cross-attention block, before every 22nd decoder layer"),
    ],
)
def test_model_card_says_where_the_blocks_are(blocks, every_n, words):
    assert _placement(blocks, every_n) == words


def test_model_cards_of_the_fixtures_place_their_blocks(converted):
    card = (converted("tiny-mpt") / "README.md").read_text()
    assert "- 4 gated cross-attention blocks, one before each decoder layer (`cross_attn_every_n_layers=1`)" in card
    card = (converted("tiny-neox") / "README.md").read_text()
    assert "- 2 gated cross-attention blocks, before every 2nd decoder layer (`cross_attn_every_n_layers=2`)" in card


def test_an_lm_deeper_than_the_checkpoints_is_named():
    """A GPT-NeoX LM of 6 layers with a checkpoint trained on one of 4 (N=2 inferred): the error says the LM is
    deeper than the checkpoint's blocks fit, not only that N places them elsewhere."""
    src = FIXTURES / "tiny-neox"
    with pytest.raises(
        ConversionError, match=r"has 6 decoder layers, more than the checkpoint's blocks fit \(an LM of 4 to 5\)"
    ):
        dry_run(
            checkpoint=src / "checkpoint.pt",
            lm=FIXTURES / "sweep-neox-s202-l6-n4-parallel" / "lm",
            tokenizer=src / "tokenizer",
            vision_config=src / "open_clip_config.json",
        )
