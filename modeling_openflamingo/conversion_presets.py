"""The six released OpenFlamingo models: where their parts live, their full-size LM configs, licenses and evaluation.

Everything here is data. The LM configs are the hub `config.json` files of each LM (values from
`docs/lm-backbones.md`), embedded so that `--dry-run` builds the full-size model without downloading anything; a
real conversion reads the downloaded `config.json` instead, through the same code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .conversion_errors import ConversionError

# The vision tower of every released model: CLIP ViT-L/14 with OpenAI's weights (QuickGELU). The original loads it
# with open_clip (`ViT-L-14`, pretrained `openai`), which downloads the open_clip-format files of this hub repo.
# `openai/clip-vit-large-patch14` (transformers layout) holds the same weights and works as well (`--vision`).
DEFAULT_VISION = "timm/vit_large_patch14_clip_224.openai"
TRANSFORMERS_VISION = "openai/clip-vit-large-patch14"
CHECKPOINT_FILENAME = "checkpoint.pt"

PAPER = "arXiv:2308.01390"
PAPER_URL = "https://arxiv.org/abs/2308.01390"
CODE_URL = "https://github.com/mlfoundations/open_flamingo"

# ---- full-size LM configs (the LMs' hub config.json, as far as the conversion reads them) ----

MOSAIC_GPT_1B_CONFIG: dict[str, Any] = {
    "model_type": "mosaic_gpt",
    "d_model": 2048,
    "n_heads": 16,
    "n_layers": 24,
    "mlp_ratio": 4,
    "max_seq_len": 2048,
    "vocab_size": 50432,
    "alibi": True,
    "alibi_bias_max": 8,
    "attn_qk_ln": True,
    "attn_clip_qkv": None,
    "softmax_scale": None,
    "attn_pdrop": 0,
    "emb_pdrop": 0,
    "resid_pdrop": 0,
    "no_bias": True,
    "low_precision_layernorm": True,
    "logit_scale": None,
    "embedding_fraction": 1.0,
    "prefix_lm": False,
    "attn_uses_sequence_id": False,
    "attn_impl": "torch",
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
}

REDPAJAMA_INCITE_3B_CONFIG: dict[str, Any] = {
    "model_type": "gpt_neox",
    "hidden_size": 2560,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "intermediate_size": 10240,
    "max_position_embeddings": 2048,
    "vocab_size": 50432,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "use_parallel_residual": False,
    "tie_word_embeddings": False,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "use_cache": True,
}

MPT_7B_CONFIG: dict[str, Any] = {
    "model_type": "mpt",
    "d_model": 4096,
    "n_heads": 32,
    "n_layers": 32,
    "expansion_ratio": 4,
    "max_seq_len": 2048,
    "vocab_size": 50432,
    "attn_config": {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
    },
    "no_bias": True,
    "norm_type": "low_precision_layernorm",
    "logit_scale": None,
    "learned_pos_emb": True,
    "emb_pdrop": 0,
    "resid_pdrop": 0,
    "embedding_fraction": 1.0,
    "init_device": "cpu",
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "use_cache": False,
}

LLAMA_7B_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-6,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Token ids after the original adds `<|endofchunk|>`, `<image>` and `<PAD>` (in that order) to the LM tokenizer.
# Expected values (docs/lm-backbones.md); a real conversion reads them from the tokenizer and checks them against
# the checkpoint's embedding rows.
GPT_NEOX_20B_TOKENS = {"tokenizer_length": 50280, "eoc_token_id": 50277, "media_token_id": 50278, "pad_token_id": 50279}
LLAMA_TOKENS = {"tokenizer_length": 32003, "eoc_token_id": 32000, "media_token_id": 32001, "pad_token_id": 32002}

SHOTS = (0, 4, 8, 16, 32)
EVAL_METRICS = {
    "COCO": "CIDEr",
    "Flickr-30K": "CIDEr",
    "VQAv2": "accuracy",
    "OK-VQA": "accuracy",
    "TextVQA": "accuracy",
    "VizWiz": "accuracy",
    "HatefulMemes": "ROC AUC",
}
TABLE_11_SOURCE = (
    f"Table 11 of the OpenFlamingo technical report ([{PAPER}]({PAPER_URL})): demonstrations sampled uniformly at "
    "random, mean (standard deviation) over 3 evaluation seeds, measured with the original implementation"
)


@dataclass(frozen=True)
class Preset:
    """One released OpenFlamingo model: the hub ids of its parts and what the conversion needs to know about it."""

    name: str
    checkpoint: str  # hub repo holding `checkpoint.pt`
    lm: str | None  # hub id of the LM; None: the user supplies it (`--lm`)
    tokenizer: str | None  # hub id of the tokenizer; None: the LM's
    lm_family: str
    lm_config: Mapping[str, Any]
    lm_title: str
    lm_license: str
    cross_attn_every_n_layers: int
    tokens: Mapping[str, int]
    instruction_tuned: bool
    title: str
    evaluation: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    evaluation_source: str = TABLE_11_SOURCE
    aliases: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def hub_url(self) -> str:
        """The original model's hub page."""
        return f"https://huggingface.co/{self.checkpoint}"


PRESETS: dict[str, Preset] = {}


def _register(preset: Preset) -> None:
    PRESETS[preset.name] = preset


_register(
    Preset(
        name="OpenFlamingo-3B-vitl-mpt1b",
        title="OpenFlamingo-3B (CLIP ViT-L/14, MPT-1B)",
        checkpoint="openflamingo/OpenFlamingo-3B-vitl-mpt1b",
        lm="anas-awadalla/mpt-1b-redpajama-200b",
        tokenizer="anas-awadalla/mpt-1b-redpajama-200b",
        lm_family="mosaic_gpt",
        lm_config=MOSAIC_GPT_1B_CONFIG,
        lm_title="MPT-1B RedPajama-200B (MosaicGPT)",
        lm_license="Apache-2.0",
        cross_attn_every_n_layers=1,
        tokens=GPT_NEOX_20B_TOKENS,
        instruction_tuned=False,
        evaluation={
            "COCO": ("74.9 (0.2)", "77.3 (0.3)", "85.9 (0.6)", "89.8 (0.2)", "93.0 (0.6)"),
            "Flickr-30K": ("52.3 (1.0)", "57.2 (0.4)", "58.6 (1.1)", "59.2 (0.5)", "61.1 (1.3)"),
            "VQAv2": ("44.6 (0.0)", "45.8 (0.0)", "46.2 (0.0)", "46.6 (0.0)", "47.0 (0.1)"),
            "OK-VQA": ("28.2 (0.2)", "30.3 (0.5)", "31.1 (0.3)", "30.9 (0.3)", "31.0 (0.1)"),
            "TextVQA": ("24.2 (0.2)", "27.0 (0.3)", "27.7 (0.1)", "28.0 (0.2)", "28.3 (0.2)"),
            "VizWiz": ("23.7 (0.5)", "27.0 (0.3)", "32.1 (0.7)", "36.1 (0.3)", "39.8 (0.1)"),
            "HatefulMemes": ("51.2 (2.5)", "50.6 (0.8)", "52.0 (1.1)", "48.5 (0.7)", "50.2 (1.8)"),
        },
    )
)
_register(
    Preset(
        name="OpenFlamingo-3B-vitl-mpt1b-langinstruct",
        title="OpenFlamingo-3B (CLIP ViT-L/14, MPT-1B-Dolly)",
        checkpoint="openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
        lm="anas-awadalla/mpt-1b-redpajama-200b-dolly",
        tokenizer="anas-awadalla/mpt-1b-redpajama-200b-dolly",
        lm_family="mosaic_gpt",
        lm_config=MOSAIC_GPT_1B_CONFIG,
        lm_title="MPT-1B RedPajama-200B Dolly (MosaicGPT, instruction-tuned)",
        lm_license="CC-BY-SA-3.0",
        cross_attn_every_n_layers=1,
        tokens=GPT_NEOX_20B_TOKENS,
        instruction_tuned=True,
        evaluation={
            "COCO": ("74.4 (0.6)", "82.7 (0.7)", "87.8 (0.5)", "91.9 (0.3)", "94.8 (0.3)"),
            "Flickr-30K": ("51.2 (0.2)", "59.1 (0.3)", "60.7 (0.6)", "63.0 (0.4)", "64.5 (1.3)"),
            "VQAv2": ("44.1 (0.1)", "45.7 (0.1)", "45.9 (0.1)", "45.8 (0.0)", "44.8 (0.1)"),
            "OK-VQA": ("28.7 (0.1)", "30.6 (0.2)", "31.5 (0.3)", "30.7 (0.3)", "30.6 (0.1)"),
            "TextVQA": ("23.1 (0.2)", "28.1 (0.4)", "29.1 (0.1)", "29.1 (0.1)", "28.5 (0.1)"),
            "VizWiz": ("23.4 (0.3)", "27.7 (0.1)", "32.1 (0.6)", "35.3 (0.1)", "39.3 (0.4)"),
            "HatefulMemes": ("50.1 (2.2)", "49.5 (0.6)", "50.7 (1.8)", "48.7 (1.0)", "47.8 (2.2)"),
        },
    )
)
_register(
    Preset(
        name="OpenFlamingo-4B-vitl-rpj3b",
        title="OpenFlamingo-4B (CLIP ViT-L/14, RedPajama-INCITE-Base-3B)",
        checkpoint="openflamingo/OpenFlamingo-4B-vitl-rpj3b",
        lm="togethercomputer/RedPajama-INCITE-Base-3B-v1",
        tokenizer="togethercomputer/RedPajama-INCITE-Base-3B-v1",
        lm_family="gpt_neox",
        lm_config=REDPAJAMA_INCITE_3B_CONFIG,
        lm_title="RedPajama-INCITE-Base-3B-v1 (GPT-NeoX)",
        lm_license="Apache-2.0",
        cross_attn_every_n_layers=2,
        tokens=GPT_NEOX_20B_TOKENS,
        instruction_tuned=False,
        evaluation={
            "COCO": ("76.7 (0.2)", "81.8 (0.4)", "90.7 (0.3)", "93.9 (0.4)", "95.1 (0.3)"),
            "Flickr-30K": ("53.6 (0.9)", "60.7 (1.2)", "55.9 (1.3)", "56.8 (0.5)", "56.9 (0.7)"),
            "VQAv2": ("45.1 (0.1)", "49.0 (0.0)", "48.3 (0.0)", "45.5 (0.1)", "43.0 (0.2)"),
            "OK-VQA": ("30.7 (0.1)", "35.1 (0.0)", "33.9 (0.1)", "28.5 (0.2)", "26.4 (0.2)"),
            "TextVQA": ("21.0 (0.3)", "25.9 (0.0)", "21.3 (0.2)", "18.2 (0.4)", "14.1 (0.2)"),
            "VizWiz": ("18.8 (0.1)", "26.6 (0.5)", "28.8 (0.4)", "24.6 (0.2)", "23.1 (1.1)"),
            "HatefulMemes": ("52.3 (2.3)", "51.5 (1.4)", "55.2 (0.8)", "54.5 (1.3)", "52.2 (1.2)"),
        },
        notes=(
            "The `<image>` and `<|endofchunk|>` embeddings of the 4B models were frozen during training (random "
            "initial values); the paper (section 5.1) links this to their weaker few-shot scaling.",
        ),
    )
)
_register(
    Preset(
        name="OpenFlamingo-4B-vitl-rpj3b-langinstruct",
        title="OpenFlamingo-4B (CLIP ViT-L/14, RedPajama-INCITE-Instruct-3B)",
        checkpoint="openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
        lm="togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
        tokenizer="togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
        lm_family="gpt_neox",
        lm_config=REDPAJAMA_INCITE_3B_CONFIG,
        lm_title="RedPajama-INCITE-Instruct-3B-v1 (GPT-NeoX, instruction-tuned)",
        lm_license="Apache-2.0",
        cross_attn_every_n_layers=2,
        tokens=GPT_NEOX_20B_TOKENS,
        instruction_tuned=True,
        evaluation={
            "COCO": ("81.2 (0.3)", "85.8 (0.5)", "94.8 (0.2)", "98.0 (0.3)", "99.2 (0.3)"),
            "Flickr-30K": ("55.6 (1.3)", "61.2 (0.5)", "59.0 (1.0)", "54.8 (1.0)", "53.0 (0.5)"),
            "VQAv2": ("46.9 (0.0)", "49.0 (0.0)", "47.4 (0.0)", "45.1 (0.1)", "47.3 (0.0)"),
            "OK-VQA": ("31.7 (0.1)", "34.6 (0.0)", "33.7 (0.2)", "31.3 (0.1)", "34.7 (0.3)"),
            "TextVQA": ("21.1 (0.4)", "27.2 (0.3)", "25.1 (0.2)", "23.2 (0.1)", "23.2 (0.2)"),
            "VizWiz": ("21.5 (0.2)", "26.5 (0.4)", "29.1 (0.2)", "31.0 (0.6)", "31.3 (0.2)"),
            "HatefulMemes": ("53.1 (2.2)", "54.9 (1.1)", "58.5 (0.3)", "56.9 (1.5)", "54.9 (1.1)"),
        },
        notes=(
            "The `<image>` and `<|endofchunk|>` embeddings of the 4B models were frozen during training (random "
            "initial values); the paper (section 5.1) links this to their weaker few-shot scaling.",
        ),
    )
)
_register(
    Preset(
        name="OpenFlamingo-9B-vitl-mpt7b",
        title="OpenFlamingo-9B (CLIP ViT-L/14, MPT-7B)",
        checkpoint="openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        lm="anas-awadalla/mpt-7b",
        tokenizer="anas-awadalla/mpt-7b",
        lm_family="mpt",
        lm_config=MPT_7B_CONFIG,
        lm_title="MPT-7B",
        lm_license="Apache-2.0",
        cross_attn_every_n_layers=4,
        tokens=GPT_NEOX_20B_TOKENS,
        instruction_tuned=False,
        evaluation={
            "COCO": ("79.5 (0.2)", "89.0 (0.3)", "96.3 (0.1)", "98.8 (0.7)", "99.5 (0.1)"),
            "Flickr-30K": ("59.5 (1.0)", "65.8 (0.6)", "62.9 (1.0)", "62.8 (1.0)", "61.3 (0.7)"),
            "VQAv2": ("52.7 (0.2)", "54.8 (0.0)", "54.8 (0.0)", "54.3 (0.0)", "53.3 (0.1)"),
            "OK-VQA": ("37.8 (0.2)", "40.1 (0.1)", "41.1 (0.2)", "42.7 (0.2)", "42.4 (0.0)"),
            "TextVQA": ("24.2 (0.5)", "28.2 (0.4)", "29.1 (0.1)", "27.3 (0.1)", "23.8 (0.2)"),
            "VizWiz": ("27.5 (0.2)", "34.1 (0.7)", "38.5 (0.1)", "42.5 (0.4)", "44.0 (0.5)"),
            "HatefulMemes": ("51.6 (1.8)", "54.0 (2.0)", "54.7 (2.8)", "53.9 (3.1)", "53.8 (2.1)"),
        },
    )
)
_register(
    Preset(
        name="OpenFlamingo-9B-deprecated",
        title="OpenFlamingo-9B v1 (CLIP ViT-L/14, LLaMA-7B; deprecated)",
        checkpoint="openflamingo/OpenFlamingo-9B-deprecated",
        lm=None,
        tokenizer=None,
        lm_family="llama",
        lm_config=LLAMA_7B_CONFIG,
        lm_title="LLaMA-7B (HF format, supplied by the user)",
        lm_license="LLaMA license (non-commercial research use)",
        cross_attn_every_n_layers=4,
        tokens=LLAMA_TOKENS,
        instruction_tuned=False,
        # Not part of the paper's Table 11 (v1 predates it): the numbers of the v1 model card (validation sets).
        evaluation={
            "COCO": ("65.52", "74.28", "79.26", "81.84", "84.52"),
            "VQAv2": ("43.55", "44.05", "47.5", "48.87", "50.34"),
        },
        evaluation_source=(
            "the original OpenFlamingo-9B (v1) model card (validation sets of COCO and VQAv2; this early model is "
            f"not part of the evaluation in {PAPER})"
        ),
        aliases=("OpenFlamingo-9B", "OpenFlamingo-9B-v1"),
        notes=(
            "Deprecated by the OpenFlamingo team in favour of the v2 models; intended for academic research only "
            "(LLaMA's non-commercial license).",
            "LLaMA's `lm_head` is untied and not in the checkpoint, so the output rows of the 3 added tokens "
            "(`<|endofchunk|>`, `<image>`, `<PAD>`) exist in no released file (the original re-drew them at random "
            "at every load). This conversion sets each of them to the mean of LLaMA's 32000 output rows, "
            "deterministically.",
        ),
    )
)


def get_preset(name: str) -> Preset:
    """The preset named `name` (case-insensitive; the `openflamingo/` prefix and the v1 aliases are accepted); a
    `ConversionError` listing the presets for any other name."""
    wanted = name.strip().lower().removeprefix("openflamingo/")
    for preset in PRESETS.values():
        if wanted in {preset.name.lower(), *(alias.lower() for alias in preset.aliases)}:
            return preset
    raise ConversionError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")


__all__ = [
    "CHECKPOINT_FILENAME",
    "DEFAULT_VISION",
    "EVAL_METRICS",
    "PRESETS",
    "SHOTS",
    "TRANSFORMERS_VISION",
    "Preset",
    "get_preset",
]
