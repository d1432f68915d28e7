"""The README.md model card and the LICENSE.md written next to a converted model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .conversion_presets import CODE_URL, DEFAULT_VISION, EVAL_METRICS, PAPER, PAPER_URL, SHOTS, Preset

if TYPE_CHECKING:
    from .checkpoint_conversion import ConvertedModel

LICENSE_FILE = "LICENSE.md"  # the card's `license_link`: the licenses of the folder's parts
LICENSE_NAME = "openflamingo-parts"  # the card's `license_name` (`license: other`: the parts' terms differ)

_LM_TITLES = {"mosaic_gpt": "MosaicGPT", "mpt": "MPT", "gpt_neox": "GPT-NeoX", "llama": "LLaMA"}


def _link(origin: str) -> str:
    """A hub id as a link; local paths as code."""
    from .conversion_hub import is_local, parse_hub_spec

    spec = None if is_local(origin) else parse_hub_spec(origin)
    return f"[{origin}](https://huggingface.co/{spec.repo_id})" if spec else f"`{origin}`"


def _format_count(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _placement(blocks: int, every_n: int) -> str:
    """Where the gated blocks are, in words: "16 gated cross-attention blocks, before every 2nd decoder layer"."""
    what = f"{blocks} gated cross-attention block{'' if blocks == 1 else 's'}"
    if every_n == 1:
        return f"{what}, one before each decoder layer"
    suffix = "th" if every_n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(every_n % 10, "th")
    return f"{what}, before every {every_n}{suffix} decoder layer"


def _vit_name(vision: object) -> str:
    known = {
        (1024, 24, 14): "ViT-L/14",
        (768, 12, 16): "ViT-B/16",
        (768, 12, 32): "ViT-B/32",
        (1280, 32, 14): "ViT-H/14",
    }
    key = (vision.hidden_size, vision.num_hidden_layers, vision.patch_size)
    return known.get(key, "ViT")


def _evaluation(preset: Preset) -> list[str]:
    if not preset.evaluation:
        return []
    lines = [
        "## Evaluation",
        "",
        f"From {preset.evaluation_source}. These are the original implementation's numbers, not re-measured with "
        "this port (which reproduces the original's logits; see the openflamingo-hf README).",
        "",
        "| Benchmark (metric) | " + " | ".join(f"{s}-shot" for s in SHOTS) + " |",
        "|---|" + "---|" * len(SHOTS),
    ]
    for dataset, values in preset.evaluation.items():
        lines.append(f"| {dataset} ({EVAL_METRICS[dataset]}) | " + " | ".join(values) + " |")
    return [*lines, ""]


def _license_table(preset: Preset | None, lm_origin: str, vision_origin: str) -> list[str]:
    """Each part's license: the card's License section and LICENSE.md."""
    lm_license = preset.lm_license if preset else "see the language model's own license"
    if vision_origin == DEFAULT_VISION:  # the released models' tower
        vision = f"| vision tower: CLIP ViT-L/14 (OpenAI weights) | {_link(vision_origin)} | MIT |"
    else:
        vision = f"| vision tower | {_link(vision_origin)} | see the vision tower's own license |"
    lines = [
        "This folder combines parts released under different terms; the most restrictive applies to the whole:",
        "",
        "| part | source | license |",
        "|---|---|---|",
        f"| OpenFlamingo code and modules (perceiver, gated cross-attention) | [open_flamingo]({CODE_URL})"
        + (f", [{preset.checkpoint}]({preset.hub_url})" if preset else "")
        + " | MIT (code); see the original model card for the weights' terms |",
        f"| language model | {_link(lm_origin)} | {lm_license} |",
        vision,
        "| this port (openflamingo-hf) | | MIT |",
        "",
    ]
    if preset is not None and preset.lm_family == "llama":
        lines += ["LLaMA's license restricts use to non-commercial research.", ""]
    return lines


def render_license(converted: ConvertedModel) -> str:
    """LICENSE.md of a converted folder (the card's `license_link`): the license of each of its parts."""
    inputs = converted.inputs
    title = inputs.preset.title if inputs.preset else "OpenFlamingo (converted)"
    table = _license_table(inputs.preset, inputs.lm_origin, inputs.vision.origin)
    return "\n".join([f"# Licenses: {title}", "", *table])


def _of_repo(origin: str, repo_id: str) -> bool:
    """Whether `origin` names hub repo `repo_id` (a file in it or a revision of it too), not a local path."""
    from .conversion_hub import is_local, parse_hub_spec

    spec = None if is_local(origin) else parse_hub_spec(origin)
    return spec is not None and spec.repo_id == repo_id


def _replaced_parts_note(preset: Preset, inputs: object) -> list[str]:
    """A note naming the parts given in place of `preset`'s own hub files (a local copy of one counts: it cannot be
    told apart from other weights), for which the card's title, evaluation and licenses may not hold."""
    parts = (
        ("checkpoint", inputs.checkpoint_origin, preset.checkpoint),
        ("language model", inputs.lm_origin, preset.lm),
        ("vision tower", inputs.vision.origin, DEFAULT_VISION),
    )
    replaced = [
        f"{name} {_link(origin)}" for name, origin, own in parts if own is not None and not _of_repo(origin, own)
    ]
    if not replaced:
        return []
    return [
        f"> Converted with `--preset {preset.name}` but with another {', another '.join(replaced)} than its own "
        "hub files: the title, evaluation and licenses below are the released model's, and hold for this folder only "
        "if those are copies of its files.\n"
    ]


def render_model_card(converted: ConvertedModel, repo_id: str | None = None) -> str:
    """The model card (README.md) of a converted folder: usage on both transformers majors, architecture, how it was
    converted, the paper's evaluation of this model, and the licenses of its parts."""
    inputs, model, preset = converted.inputs, converted.model, converted.inputs.preset
    config = model.config
    text, vision = config.text_config, config.vision_config
    name = preset.name if preset else "OpenFlamingo"
    title = preset.title if preset else "OpenFlamingo (converted)"
    path = repo_id or f"path/to/{name}"
    dtype = str(converted.dtype).removeprefix("torch.")
    n = config.cross_attn_every_n_layers
    blocks = len(config.cross_attn_layer_indices)
    lm_title = preset.lm_title if preset else f"{_LM_TITLES.get(inputs.lm_family, inputs.lm_family)} language model"
    tags = ["openflamingo", "flamingo", "image-text-to-text", "multimodal", "few-shot"]

    def _config_only(part: str) -> str:
        """For a part whose weights the checkpoint held (a full state dict): its own file gave the config only."""
        return " (its config; the weights are the checkpoint's)" if part in converted.plan.checkpoint_parts else ""

    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "license: other",
        f"license_name: {LICENSE_NAME}",
        f"license_link: {LICENSE_FILE}",
        "tags:",
        *[f"- {tag}" for tag in tags],
        *(["base_model:", f"- {preset.checkpoint}"] if preset else []),
        "---",
        "",
        f"# {title}, for transformers",
        "",
        f"[OpenFlamingo]({CODE_URL}) ([paper]({PAPER_URL})) converted into a transformers model by "
        "openflamingo-hf (`OpenFlamingoForConditionalGeneration`): load it with the Auto "
        "classes, generate with `generate()`, fine-tune with `Trainer` or PEFT. Its outputs match the original "
        "implementation (`open_flamingo==2.0.1`).",
        "",
        *(f"> {note}\n" for note in (preset.notes if preset else ())),
        *(_replaced_parts_note(preset, inputs) if preset else []),
        "## Usage",
        "",
        "The folder carries its modeling code (`trust_remote_code=True`); with the openflamingo-hf package installed "
        "(`pip install -e .` in its source tree) and `import modeling_openflamingo`, the installed code is used "
        "instead (on transformers 4.x only when loading without `trust_remote_code=True`, which there picks the "
        "folder's copy).",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{path}", trust_remote_code=True, dtype="auto")',
        f'processor = AutoProcessor.from_pretrained("{path}", trust_remote_code=True)',
        "",
        'images = [[Image.open("cat.jpg"), Image.open("sink.jpg"), Image.open("bus.jpg")]]',
        'prompt = ["<image>Output:Two cats.<|endofchunk|><image>Output:A bathroom sink.<|endofchunk|><image>Output:"]',
        "inputs = processor(images=images, text=prompt)",
        "with torch.no_grad():",
        "    out = model.generate(**inputs, max_new_tokens=20, num_beams=3)",
        'print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "On transformers 4.57, `AutoModelForVision2Seq` works too:",
        "",
        "```python",
        "from transformers import AutoModelForVision2Seq, AutoProcessor",
        "",
        f'model = AutoModelForVision2Seq.from_pretrained("{path}", trust_remote_code=True, dtype="auto")',
        f'processor = AutoProcessor.from_pretrained("{path}", trust_remote_code=True)',
        "```",
        "",
        "Each `<image>` token marks where an image goes and `<|endofchunk|>` ends the text that belongs to it; "
        f"`pixel_values` is `(batch, num_images, 3, {vision.image_size}, {vision.image_size})`. Generation stops at "
        "`<|endofchunk|>` by default "
        "(`generation_config.json`), as in the original.",
        "",
        "## Architecture",
        "",
        f"- vision tower: CLIP {_vit_name(vision)} at {vision.image_size} px ({vision.num_hidden_layers} layers, "
        f"width {vision.hidden_size}, patch {vision.patch_size}, {vision.hidden_act}), frozen; features: the patch "
        "tokens of the last layer, without `post_layernorm`",
        f"- Perceiver Resampler: {config.perceiver_depth} layers, {config.perceiver_num_latents} latents per image",
        f"- language model: {lm_title} ({text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary "
        f"{text.vocab_size} incl. `<|endofchunk|>`={config.eoc_token_id}, `<image>`={config.media_token_id}, "
        f"`<PAD>`={config.pad_token_id})",
        f"- {_placement(blocks, n)} (`cross_attn_every_n_layers={n}`)",
        f"- {_format_count(sum(p.numel() for p in model.parameters()))} parameters, stored in {dtype}",
        "",
        "## Conversion",
        "",
        "Converted with `conversion/convert_openflamingo_checkpoint.py`"
        + (f" `--preset {preset.name}`" if preset else "")
        + " from:",
        "",
        "- checkpoint (perceiver, gated cross-attention, token embeddings"
        + "".join(f", {part}" for part in converted.plan.checkpoint_parts)
        + f"): {_link(inputs.checkpoint_origin)}",
        f"- language model{_config_only('language model')}: {_link(inputs.lm_origin)}; tokenizer: "
        f"{_link(inputs.tokenizer_origin)}",
        f"- vision tower{_config_only('vision tower')}: {_link(inputs.vision.origin)} ({inputs.vision.kind} layout)",
        "",
        "The token embedding rows come from the checkpoint (where it has them). "
        + (
            "The rows of the added tokens in LLaMA's untied `lm_head` are in no released file (the original drew "
            "them at random at every load); here each is the mean of the LM's existing output rows."
            if converted.plan.invented_rows
            else "No row of any embedding matrix had to be made up."
        ),
        "",
        "`conversion/convert_hf_to_openflamingo.py` turns this folder (or a fine-tuned copy) back into the "
        "original's `checkpoint.pt`.",
        "",
        *(_evaluation(preset) if preset else []),
        "## License",
        "",
        *_license_table(preset, inputs.lm_origin, inputs.vision.origin),
        f"The same table is in [{LICENSE_FILE}]({LICENSE_FILE}).",
        "",
        "## Citation",
        "",
        "```bibtex",
        "@article{awadalla2023openflamingo,",
        "  title={OpenFlamingo: An Open-Source Framework for Training Large Autoregressive Vision-Language Models},",
        "  author={Anas Awadalla and Irena Gao and Josh Gardner and Jack Hessel and Yusuf Hanafy and Wanrong Zhu and "
        "Kalyani Marathe and Yonatan Bitton and Samir Gadre and Shiori Sagawa and Jenia Jitsev and Simon Kornblith "
        "and Pang Wei Koh and Gabriel Ilharco and Mitchell Wortsman and Ludwig Schmidt},",
        f"  journal={{arXiv preprint {PAPER}}},",
        "  year={2023}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["LICENSE_FILE", "render_license", "render_model_card"]
