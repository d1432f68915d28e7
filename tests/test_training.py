"""Training: the original's recipe (`freeze_for_training`), the data collator, Trainer, gradient checkpointing, PEFT
and FSDP (2 CPU processes)."""

from __future__ import annotations

import collections
import copy
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from modeling_openflamingo import OpenFlamingoDataCollator, attention_mask_without_host_sync
from modeling_openflamingo import modeling_openflamingo as modeling
from modeling_openflamingo.modeling_openflamingo import OpenFlamingoNewTokenEmbeddings, find_decoder_layers

try:
    from . import conftest as shared
    from .conftest import EOC, FIXTURES, MEDIA, PAD, ROOT, example_module, lm_cache_of, sample_inputs
except ImportError:  # run as a script: the FSDP worker under torchrun
    import conftest as shared
    from conftest import EOC, FIXTURES, MEDIA, PAD, ROOT, example_module, lm_cache_of, sample_inputs

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

EXAMPLES = ROOT / "examples"
TRAINED_PREFIXES = ("perceiver.", "gated_cross_attn_layers.", "new_token_embeddings.")
CAPTIONS = ["A cat on a mat.", "Two dogs.", "A red bus in the rain.", "A sink."]


@pytest.fixture(autouse=True)
def fresh_trainer_environment():
    """Each test starts from the same environment: transformers 4.x's `TrainingArguments(bf16=True)` sets
    `ACCELERATE_MIXED_PRECISION=bf16` for the whole process, and later Trainers would run in bf16 autocast."""
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def load(converted, family: str):
    path = converted(family)
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def caption_dataset():
    """LAION-style rows with a `datasets` `Image` feature (decoded to PIL by datasets)."""
    rows = {
        "images": [[str(FIXTURES / "tiny_images" / f"image_{i}.png")] for i in range(len(CAPTIONS))],
        "text": [f"<image>{caption}<|endofchunk|>" for caption in CAPTIONS],
    }
    return datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        weight_decay=0.1,  # applies to trainable parameters only: the frozen embedding matrix must not decay
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


# ---- the recipe: freeze_for_training ----


@pytest.mark.parametrize("family, tied", [("tiny-mpt", True), ("tiny-neox", False)])
def test_freeze_for_training_trains_only_the_recipe(converted, family, tied):
    model, _ = load(converted, family)
    inputs = sample_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    model.freeze_for_training()
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"perceiver", "gated_cross_attn_layers", "new_token_embeddings"}
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.new_token_embeddings.token_id_list == [EOC, MEDIA, PAD]
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert len(model.get_output_embeddings()._forward_hooks) == (1 if tied else 0)
    with torch.no_grad():
        after = model(**inputs).logits
    # The rows start as copies of the matrix's rows. Logits of the other tokens are untouched; tied, the new tokens'
    # are recomputed by a product with 3 output columns, whose additions the BLAS may order otherwise than in the
    # full matrix's product (MKL on an AMD EPYC: 2.4e-7 apart), so they are equal up to fp32 rounding.
    new_ids = model.new_token_embeddings.token_ids
    others = torch.ones(before.shape[-1], dtype=torch.bool)
    others[new_ids] = False
    assert torch.equal(before[..., others], after[..., others])
    torch.testing.assert_close(after[..., new_ids], before[..., new_ids], rtol=0, atol=1e-6)
    if not tied:
        assert torch.equal(before, after)

    model.freeze_for_training(train_new_token_embeddings=False)
    assert "new_token_embeddings" not in model._modules
    assert not model.get_input_embeddings()._forward_hooks
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {
        "perceiver",
        "gated_cross_attn_layers",
    }


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_new_token_rows_get_the_gradient_of_the_originals_masked_embedding(converted, family):
    """The original trained the whole (tied) matrix and zeroed the gradient of all other rows after backward."""
    inputs = sample_inputs()
    ours, _ = load(converted, family)
    ours.freeze_for_training(new_token_ids=[MEDIA, EOC])
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()

    original, _ = load(converted, family)
    original.requires_grad_(False)
    original.perceiver.requires_grad_(True)
    original.gated_cross_attn_layers.requires_grad_(True)
    original.get_input_embeddings().requires_grad_(True)
    original(**inputs, labels=inputs["input_ids"]).loss.backward()
    matrix_grad = original.get_input_embeddings().weight.grad

    rows = sorted([MEDIA, EOC])  # (held in ascending order)
    torch.testing.assert_close(ours.new_token_embeddings.weight.grad, matrix_grad[rows], rtol=1e-5, atol=1e-7)
    assert ours.new_token_embeddings.weight.grad.abs().sum() > 0


def test_freeze_for_training_errors(converted):
    model, _ = load(converted, "tiny-neox")
    with pytest.raises(ValueError, match="outside the embedding matrix"):
        model.freeze_for_training(new_token_ids=[5000])
    model.config.eoc_token_id = model.config.media_token_id = model.config.pad_token_id = None
    with pytest.raises(ValueError, match="No token ids to train"):
        model.freeze_for_training()
    with pytest.raises(ValueError, match="Pass input_ids and inputs_embeds"):
        OpenFlamingoNewTokenEmbeddings(torch.zeros(4, 2), [1])(input_ids=torch.tensor([1]))


def test_training_parameter_groups_decay_as_the_original(converted):
    """The original's rule on its own names (open_flamingo 2.0.1's `train.py`, `get_grouped_params`: `"gated_cross_attn"
    in name`), through the key map: every parameter of the gated blocks, gates, biases and LayerNorms included."""
    from modeling_openflamingo.checkpoint_conversion import native_key_to_checkpoint

    def original_rule(x: str) -> bool:
        return "gated_cross_attn" in x

    model, _ = load(converted, "tiny-mpt")
    model.freeze_for_training()
    decay, no_decay = model.training_parameter_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    for name in decayed | {names[id(p)] for p in no_decay["params"]}:
        original = native_key_to_checkpoint(name, "mpt")
        assert (name in decayed) == original_rule(original or name), (name, original)
    block = "gated_cross_attn_layers.0."
    in_block = {n.removeprefix(block) for n, p in model.named_parameters() if n.startswith(block) and p.requires_grad}
    assert {n.removeprefix(block) for n in decayed if n.startswith(block)} == in_block
    assert {"attn_gate", "ff_gate", "attn.norm.weight", "attn.norm.bias", "ff.norm.bias"} <= in_block
    assert {names[id(p)].split(".")[0] for p in no_decay["params"]} == {"perceiver", "new_token_embeddings"}


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_trained_rows_are_saved_into_the_matrix_and_restored_on_load(converted, family, tmp_path):
    model, _ = load(converted, family)
    original = model.get_input_embeddings().weight.detach().clone()
    model.freeze_for_training()
    with torch.no_grad():
        model.new_token_embeddings.weight.add_(torch.randn_like(model.new_token_embeddings.weight))
    inputs = sample_inputs()
    with torch.no_grad():
        trained = model(**inputs).logits

    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    assert "new_token_embeddings" not in reloaded._modules
    saved = reloaded.get_input_embeddings().weight
    changed = (saved != original).any(dim=-1).nonzero().flatten().tolist()
    assert changed == [EOC, MEDIA, PAD]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=1e-5)

    # a state dict without the rows (e.g. a Trainer checkpoint being resumed) gives them from its matrix
    resumed, _ = load(converted, family)
    resumed.freeze_for_training()
    result = resumed.load_state_dict(reloaded.state_dict(), strict=False)
    assert "new_token_embeddings.weight" not in result.missing_keys
    assert torch.equal(resumed.new_token_embeddings.weight, model.new_token_embeddings.weight)

    # folding in place
    model.merge_new_token_embeddings()
    assert "new_token_embeddings" not in model._modules and not model.get_input_embeddings()._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, trained, rtol=0, atol=1e-5)


def load_with_part_on_disk(path: Path, part: str, offload_folder: Path):
    """The model at `path` with its `part` (a top-level module) offloaded to disk by a device map, the rest on the
    CPU."""
    parts = ("vision_model", "perceiver", "gated_cross_attn_layers", "language_model")
    device_map = {name: "disk" if name == part else "cpu" for name in parts}
    return AutoModelForImageTextToText.from_pretrained(path, device_map=device_map, offload_folder=offload_folder)


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_trained_rows_are_saved_from_a_model_with_offloaded_parts(converted, family, tmp_path):
    """A model loaded with parts offloaded by a device map (here the vision tower to disk, as `device_map="auto"`
    does when memory runs out): its state dict holds placeholders for them, which are read back for the save
    (transformers 4.x failed with "Cannot copy out of meta tensor" once the trained rows were folded in)."""
    model = load_with_part_on_disk(converted(family), "vision_model", tmp_path / "offload")
    model.freeze_for_training()
    with torch.no_grad():
        model.new_token_embeddings.weight.add_(1.0)
        trained = model(**sample_inputs()).logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**sample_inputs()).logits, trained, rtol=0, atol=1e-5)


def test_training_rows_of_offloaded_input_embeddings_is_refused(converted, tmp_path):
    """freeze_for_training() copies the rows it trains out of the input embeddings: offloaded (here to disk), they are
    placeholders (the rows came out on the meta device, and the forward failed)."""
    model = load_with_part_on_disk(converted("tiny-neox"), "language_model", tmp_path / "offload")
    with pytest.raises(ValueError, match="input embeddings are offloaded"):
        model.freeze_for_training()
    model.freeze_for_training(train_new_token_embeddings=False)
    assert "new_token_embeddings" not in model._modules


def test_deepcopy_of_a_model_in_training_is_independent(converted):
    model, _ = load(converted, "tiny-mpt")
    model.freeze_for_training()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.new_token_embeddings.weight.add_(1.0)
    inputs = sample_inputs()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, twin(**inputs).logits)
    twin.merge_new_token_embeddings()
    assert len(model.get_input_embeddings()._forward_hooks) == 1  # the original keeps its hooks


# ---- data collator ----


def expected_labels(tokenizer, segments: list[tuple[str, bool]], length: int) -> list[int]:
    """Hand-made labels: (text, kept_in_loss) segments, then -100 padding; position 0 is never a target."""
    labels = []
    for text, kept in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels += ids if kept else [-100] * len(ids)
    labels[0] = -100
    return labels + [-100] * (length - len(labels))


def test_collator_laion_style_labels(converted):
    _, processor = load(converted, "tiny-mpt")
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    images = caption_dataset()[:2]["images"]  # decoded by datasets: lists of PIL images
    features = [
        {"images": images[0], "text": "<image>A cat on a mat.<|endofchunk|>"},
        {"images": images[1][0], "text": "<image>Two dogs playing in a big garden.<|endofchunk|>"},
    ]
    batch = OpenFlamingoDataCollator(processor)(features)
    length = batch["input_ids"].shape[1]
    assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)
    for row, caption in enumerate(["A cat on a mat.", "Two dogs playing in a big garden."]):
        segments = [("<image>", False), (caption, True), ("<|endofchunk|>", True), (eos, True)]  # eos in the loss
        assert batch["labels"][row].tolist() == expected_labels(tokenizer, segments, length)
    real = len(tokenizer("<image>A cat on a mat.<|endofchunk|>" + eos)["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * real + [0] * (length - real)  # right padding
    assert (batch["input_ids"][0, real:] == PAD).all()


def test_collator_keeps_eos_in_the_loss_when_the_pad_token_is_eos(converted):
    """`tokenizer.pad_token = tokenizer.eos_token` (a common setup): padding is found by the attention mask, so the
    caption's eos stays a target and only the padding is masked."""
    from modeling_openflamingo import OpenFlamingoProcessor

    _, processor = load(converted, "tiny-mpt")
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    processor = OpenFlamingoProcessor(processor.image_processor, tokenizer)
    images = caption_dataset()[:2]["images"]
    features = [
        {"images": images[0], "text": "<image>A cat.<|endofchunk|>"},
        {"images": images[1][0], "text": "<image>Two dogs playing in a big garden.<|endofchunk|>"},
    ]
    batch = OpenFlamingoDataCollator(processor)(features)
    length = batch["input_ids"].shape[1]
    segments = [("<image>", False), ("A cat.", True), ("<|endofchunk|>", True), (tokenizer.eos_token, True)]
    assert batch["labels"][0].tolist() == expected_labels(tokenizer, segments, length)
    real = int(batch["attention_mask"][0].sum())
    assert real < length and (batch["input_ids"][0, real:] == tokenizer.eos_token_id).all()  # eos as the padding


def test_collator_mmc4_style_labels(converted, tiny_images):
    _, processor = load(converted, "tiny-mpt")
    tokenizer = processor.tokenizer
    text = "An intro. <image>A cat.<|endofchunk|>Some text between. <image>A dog.<|endofchunk|>"
    features = [
        {"images": tiny_images[:2], "text": text},
        {"images": [], "text": "Text without images."},
    ]
    batch = OpenFlamingoDataCollator(processor, interleaved=True)(features)
    length = batch["input_ids"].shape[1]
    segments = [
        ("An intro. ", False),  # before the first <image>
        ("<image>", False),
        ("A cat.", True),
        ("<|endofchunk|>", True),
        ("Some text between. ", False),  # between <|endofchunk|> and the next <image>
        ("<image>", False),
        ("A dog.", True),
        ("<|endofchunk|>", True),
        (tokenizer.eos_token, False),  # after the last <|endofchunk|>: masked, as in the original
    ]
    assert batch["labels"][0].tolist() == expected_labels(tokenizer, segments, length)
    assert (batch["labels"][1] == -100).all()  # no image: everything is "before the first <image>"
    assert batch["pixel_values"].shape == (2, 2, 3, 32, 32)
    assert (batch["pixel_values"][1] == 0).all()
    # which image each token follows, made on the CPU: the model's own (the forward then skips its host-side check)
    model, _ = load(converted, "tiny-mpt")
    expected = model._image_indices(batch["input_ids"], 2)
    assert torch.equal(batch["image_indices"], expected) and batch["image_indices"][0].max() == 2
    assert (batch["image_indices"][1] == 0).all()
    with torch.no_grad():
        given = model(**batch).loss
        batch.pop("image_indices")
        torch.testing.assert_close(model(**batch).loss, given, atol=0, rtol=0)


@pytest.mark.parametrize("data_format", ["torch", "numpy"])
def test_collator_reads_datasets_torch_and_numpy_formats(converted, data_format):
    """`with_format("torch" / "numpy")` gives a row's images of one size as one 4-D stack (CHW / HWC), and of
    different sizes as a list ("torch") or a 1-D array of arrays ("numpy"): the same batch as from the decoded PIL
    images."""
    _, processor = load(converted, "tiny-mpt")
    image, other = (str(FIXTURES / "tiny_images" / f"image_{i}.png") for i in (0, 1))
    texts = ["<image>A.<|endofchunk|>", "<image>B.<|endofchunk|><image>C.", "<image>D.<|endofchunk|><image>E."]
    rows = {"images": [[image], [image, image], [image, other]], "text": texts}
    dataset = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    assert dataset[2]["images"][0].size != dataset[2]["images"][1].size
    collator = OpenFlamingoDataCollator(processor)
    formatted = dataset.with_format(data_format)
    assert formatted[1]["images"].ndim == 4
    expected, got = collator(list(dataset)), collator(list(formatted))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("num_images", [1, 2, 5])
def test_collator_reads_datasets_numpy_grayscale_stacks(converted, num_images):
    """`with_format("numpy")` gives a row's grayscale images of one size as one `(n, H, W)` array: n images, as the
    decoded PIL images give them (one image when n is 1, a 1-channel CHW one)."""
    _, processor = load(converted, "tiny-mpt")
    gray = Image.open(FIXTURES / "tiny_images" / "image_0.png").convert("L")
    text = "".join(f"<image>{i}.<|endofchunk|>" for i in range(num_images))
    dataset = datasets.Dataset.from_dict({"images": [[gray] * num_images], "text": [text]})
    dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image()))
    formatted = dataset.with_format("numpy")
    assert formatted[0]["images"].shape == (num_images, *gray.size[::-1])
    collator = OpenFlamingoDataCollator(processor)
    expected, got = collator(list(dataset)), collator(list(formatted))
    assert got["pixel_values"].shape[1] == num_images
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_collator_refuses_an_array_that_is_one_image_or_a_grayscale_stack(converted):
    """`(3, H, W)` for a text with three `<image>`s is one CHW RGB image or three grayscale images: a clear error, not
    a guess (one image for one `<image>` is read as such)."""
    _, processor = load(converted, "tiny-mpt")
    array = np.zeros((3, 20, 30), dtype=np.uint8)
    collator = OpenFlamingoDataCollator(processor)
    with pytest.raises(ValueError, match=r"Sample 0: its images are one array of shape \(3, 20, 30\) for 3 <image>"):
        collator([{"text": "<image>a<image>b<image>c", "images": array}])
    assert collator([{"text": "<image>a", "images": array}])["pixel_values"].shape[:2] == (1, 1)


def test_collator_decodes_an_undecoded_datasets_image_as_datasets_does(converted, tmp_path):
    """A `datasets` `Image(decode=False)` value (`{"bytes", "path"}`) gives the pixels of the decoded feature, which
    `datasets` turns upright by the EXIF orientation (a photo taken sideways was fed rotated); a path is opened as it is
    stored, as the original's data pipelines open theirs (and as a PIL image the caller opened is used)."""
    datasets = pytest.importorskip("datasets")
    _, processor = load(converted, "tiny-mpt")
    pixels = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    path = tmp_path / "sideways.jpg"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    rows = datasets.Dataset.from_dict({"images": [[str(path)]], "text": ["<image>x<|endofchunk|>"]})
    decoded = rows.cast_column("images", datasets.Sequence(datasets.Image()))
    undecoded = rows.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    assert decoded[0]["images"][0].size == (40, 64) and isinstance(undecoded[0]["images"][0], dict)
    collator = OpenFlamingoDataCollator(processor)
    expected = collator([decoded[0]])["pixel_values"]
    assert torch.equal(collator([undecoded[0]])["pixel_values"], expected)
    as_stored = collator([{"text": "<image>x<|endofchunk|>", "images": str(path)}])["pixel_values"]
    with Image.open(path) as opened:
        assert torch.equal(as_stored, collator([{"text": "<image>x<|endofchunk|>", "images": opened}])["pixel_values"])
    assert not torch.equal(as_stored, expected)


def test_collator_reads_an_undecoded_datasets_image_at_a_url(converted, tiny_images, tmp_path):
    """A `datasets` `Image(decode=False)` value whose path is an http(s) URL (which `datasets` decodes) is fetched, as
    a URL given as a string is (PIL was handed the URL as a file name: FileNotFoundError)."""
    import functools
    import http.server
    import threading

    _, processor = load(converted, "tiny-mpt")
    tiny_images[0].save(tmp_path / "image.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/image.png"
        collator = OpenFlamingoDataCollator(processor)
        got = collator([{"text": "<image>x", "images": [{"bytes": None, "path": url}]}])["pixel_values"]
    finally:
        server.shutdown()
    expected = collator([{"text": "<image>x", "images": [str(tmp_path / "image.png")]}])["pixel_values"]
    assert torch.equal(got, expected)


def test_collator_inputs_and_errors(converted, tiny_images, tmp_path):
    _, processor = load(converted, "tiny-llama")
    path = tmp_path / "image.png"
    tiny_images[0].save(path)
    collator = OpenFlamingoDataCollator(processor, image_column="picture", text_column="caption", max_length=6)
    batch = collator(
        [
            {"picture": str(path), "caption": "Photo: <image>A very long caption.<|endofchunk|>"},
            {"picture": {"bytes": path.read_bytes(), "path": None}, "caption": "<image>Hi.<|endofchunk|>"},
        ]
    )
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0, 0] != MEDIA and batch["labels"][0, 0] == -100  # position 0: never a target
    assert batch["labels"][0, 1] == batch["input_ids"][0, 1]  # caption mode: text before the image is in the loss
    with pytest.raises(ValueError, match="has no 'text' field") as error:
        OpenFlamingoDataCollator(processor)([{"caption": "x"}])
    assert "remove_unused_columns" not in str(error.value)
    with pytest.raises(ValueError, match=r"has no 'text' field .*remove_unused_columns=False"):  # what Trainer left
        OpenFlamingoDataCollator(processor)([{}])
    with pytest.raises(ValueError, match="cannot read an image"):
        OpenFlamingoDataCollator(processor)([{"images": [3], "text": "<image>x"}])
    with pytest.raises(ValueError, match=r"Sample 0 has <image> tokens but no 'images' \(or 'image'\) field"):
        OpenFlamingoDataCollator(processor)([{"text": "<image>x", "photo": tiny_images[0]}])
    with pytest.raises(ValueError, match="1 <image> tokens but 0 images"):  # the field is there, empty
        OpenFlamingoDataCollator(processor)([{"text": "<image>x", "images": []}])
    with pytest.raises(ValueError, match="takes a list of samples .* got a dict"):  # a batched dict, not samples
        OpenFlamingoDataCollator(processor)({"text": ["<image>x"], "images": [[tiny_images[0]]]})
    with pytest.raises(ValueError, match="Sample 0 is a str, not a mapping"):
        OpenFlamingoDataCollator(processor)(["<image>x"])
    with pytest.raises(ValueError, match="Every text of the batch is empty once tokenized"):
        OpenFlamingoDataCollator(processor, append_eos=False)([{"text": ""}])
    for name, bad in (("max_length", 0), ("max_length", True), ("pad_to_multiple_of", 0), ("pad_to_multiple_of", -3)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            OpenFlamingoDataCollator(processor, **{name: bad})
    # numpy integers are integers (a length computed with numpy)
    numpy_sized = OpenFlamingoDataCollator(processor, max_length=np.int64(16), pad_to_multiple_of=np.int32(8))
    assert (numpy_sized.max_length, numpy_sized.pad_to_multiple_of) == (16, 8)
    assert type(numpy_sized.max_length) is int
    with pytest.raises(ValueError, match=r"max_length \(30\) must be a multiple of pad_to_multiple_of \(8\)"):
        OpenFlamingoDataCollator(processor, max_length=30, pad_to_multiple_of=8)  # (failed at the first batch)
    # encoded image bytes (a binary column) are opened as the processor opens them
    encoded = path.read_bytes()
    expected = processor(images=[encoded], text="<image>x" + processor.tokenizer.eos_token, return_labels=True)
    for value in (encoded, [encoded], [bytearray(encoded)]):
        got = OpenFlamingoDataCollator(processor)([{"text": "<image>x", "images": value}])
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["input_ids"], expected["input_ids"])
    # arrays are images, as the processor reads them
    array = np.asarray(tiny_images[0].convert("RGB"))
    from_array = OpenFlamingoDataCollator(processor)([{"text": "<image>x", "images": [array]}])
    from_pil = OpenFlamingoDataCollator(processor)([{"text": "<image>x", "images": [tiny_images[0].convert("RGB")]}])
    assert torch.equal(from_array["pixel_values"], from_pil["pixel_values"])


# ---- Trainer ----


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_trainer_lowers_the_loss_and_changes_only_the_recipe(converted, family, tmp_path):
    model, processor = load(converted, family)
    model.freeze_for_training()
    dataset = caption_dataset()
    collator = OpenFlamingoDataCollator(processor)
    batch = collator([dataset[i] for i in range(len(dataset))])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loss_before = batch_loss(model, batch)

    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset, data_collator=collator)
    trainer.train()

    assert batch_loss(model, batch) < loss_before - 0.1
    after = model.state_dict()
    for name, tensor in after.items():
        if name.startswith(TRAINED_PREFIXES):
            assert not torch.equal(tensor, before[name]), f"{name} is trainable but did not change"
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed but is frozen"
    # the saved model: the embedding matrix differs from the original in the added tokens' rows only
    trainer.save_model(str(tmp_path / "final"))
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "final").get_input_embeddings().weight
    original = before[next(k for k in before if k.endswith(("wte.weight", "embed_in.weight")))]
    changed = set((saved != original).any(dim=-1).nonzero().flatten().tolist())
    assert {EOC, MEDIA} <= changed <= {EOC, MEDIA, PAD}  # <PAD>: weight decay, and a tied output row's gradient


def test_trainer_predictions_are_the_logits_alone(converted, tmp_path):
    """`Trainer.predict` / `evaluate` keep the logits, not the caches and image features the forward also returns
    (`config.keys_to_ignore_at_inference`), which would pile up over an evaluation set."""
    model, processor = load(converted, "tiny-neox")
    dataset = caption_dataset()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=dataset,
        data_collator=OpenFlamingoDataCollator(processor),
    )
    predictions = trainer.predict(dataset).predictions
    assert not isinstance(predictions, tuple)
    assert predictions.shape[0] == len(dataset) and predictions.shape[-1] == model.config.text_config.vocab_size


def test_trainer_resumes_from_a_checkpoint_with_the_trained_rows(converted, tmp_path):
    """Checkpoints hold the rows inside the embedding matrix; resuming takes them back out (load_state_dict hook),
    without `Trainer`'s missing-keys warning for the tied output matrix. The vision tower trains too: checkpoints
    store it under transformers 4.x's names (`vision_model.vision_model.*`), which `load_state_dict` (Trainer's
    resume) maps back onto transformers 5's `CLIPVisionModel`."""

    def train(resume_from_checkpoint=None):
        model, processor = load(converted, "tiny-mpt")
        model.freeze_for_training()
        model.vision_model.requires_grad_(True)
        args = training_args(tmp_path, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        collator = OpenFlamingoDataCollator(processor)
        trainer = Trainer(model=model, args=args, train_dataset=caption_dataset(), data_collator=collator)
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return model

    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    straight = train()
    initial = load(converted, "tiny-mpt")[0].vision_model.state_dict()
    assert any(not torch.equal(t, initial[n]) for n, t in straight.vision_model.state_dict().items())
    with CaptureLogger(logging.get_logger("transformers.trainer")) as captured:
        resumed = train(str(tmp_path / "trainer" / "checkpoint-2"))
    # MPT's output matrix, tied to the embeddings and saved once: re-tied, not reported missing
    assert "missing keys" not in captured.out and "unexpected keys" not in captured.out, captured.out
    straight.merge_new_token_embeddings()
    resumed.merge_new_token_embeddings()
    resumed_state = resumed.state_dict()
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=0, atol=1e-6, msg=name)


def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a process that no launcher (torchrun, accelerate, MPI) started."""
    for name in ("LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_sharded_checkpoint_resume_reports_what_the_load_fills_in(converted, family, tmp_path):
    """A sharded checkpoint (transformers 4.x shards a folder over 5 GB: every released model in fp32) is resumed by
    `load_sharded_checkpoint`, which compares the index's names with `state_dict()` before the load hooks run: it
    reports the tied output matrix, the trained rows (in the saved embedding matrix) and, on 5.x, the vision tower's and
    GPT-NeoX's renamed names. `saved_names_load_report` counts what the load fills in, and `FlamingoTrainer` warns with
    it: nothing, for a checkpoint that loads whole; a name really absent is still reported."""
    try:
        from transformers.trainer_utils import load_sharded_checkpoint
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import load_sharded_checkpoint
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    finetune = example_module("finetune")

    model, _ = load(converted, family)
    model.freeze_for_training()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    model.save_pretrained(tmp_path / "checkpoint", max_shard_size="30KB")
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").exists()
    target, _ = load(converted, family)
    target.freeze_for_training()
    result = load_sharded_checkpoint(target, str(tmp_path / "checkpoint"), strict=False)
    assert result.missing_keys  # transformers' own comparison, before the hooks
    loaded = target.state_dict()
    assert torch.equal(loaded["new_token_embeddings.weight"], model.new_token_embeddings.weight)
    for name, tensor in model.state_dict().items():
        if name not in target._new_token_embedding_keys():  # (saved with the trained rows folded in)
            assert torch.equal(loaded[name], tensor), name
    index = json.loads((tmp_path / "checkpoint" / "model.safetensors.index.json").read_text())
    assert target.saved_names_load_report(index["weight_map"]) == ([], [])
    absent = [name for name in index["weight_map"] if "gated_cross_attn" in name][:1]
    missing, unexpected = target.saved_names_load_report([n for n in index["weight_map"] if n not in absent])
    assert (len(missing), unexpected) == (1, []) and missing[0].endswith(absent[0].rsplit(".", 3)[-1])

    args = training_args(tmp_path, report_to=[])
    trainer = finetune.FlamingoTrainer(model=target, args=args)
    logger = logging.get_logger("transformers.trainer")
    with CaptureLogger(logger) as captured:
        trainer._issue_warnings_after_load(result)
    assert "missing keys" not in captured.out and "unexpected keys" not in captured.out, captured.out
    with CaptureLogger(logger) as captured:
        trainer._issue_warnings_after_load(type(result)(result.missing_keys + missing, result.unexpected_keys))
    assert f"missing keys in the checkpoint model loaded: {missing}" in captured.out, captured.out


@pytest.mark.parametrize("freeze", [False, True])
def test_safetensors_save_model_and_load_model_round_trip_a_tied_model(converted, freeze, tmp_path):
    """`safetensors.torch.save_model` / `load_model` (what accelerate's `save_state` / `load_state` use) on MPT's tied
    embedding and output matrix: `save_model` stores it once, `load_model` expects the other name reported missing
    (`load_state_dict(strict=False)`, as torch and transformers' own models report it) and loads the same weights."""
    from safetensors.torch import load_model, save_model

    model, _ = load(converted, "tiny-mpt")
    target, _ = load(converted, "tiny-mpt")
    if freeze:
        model.freeze_for_training()
        target.freeze_for_training()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    save_model(model, str(tmp_path / "model.safetensors"))
    missing, unexpected = load_model(target, str(tmp_path / "model.safetensors"))
    assert (sorted(missing), unexpected) == ([], [])
    loaded = target.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_keys_to_ignore_on_save_follow_the_tie(converted, tmp_path):
    """MPT's output matrix, tied to the embeddings, is named in `_keys_to_ignore_on_save` (what `save_pretrained`
    leaves out and `Trainer` re-ties on resume) only while it is tied: untied, it is saved and loads back."""
    from safetensors.torch import load_file

    model, _ = load(converted, "tiny-mpt")
    assert model._keys_to_ignore_on_save == {"language_model.lm_head.weight"}
    head = model.language_model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach() + 1.0)  # untied
    assert model._keys_to_ignore_on_save == set()
    model.config.text_config.tie_word_embeddings = False
    model.save_pretrained(tmp_path / "untied")
    saved = load_file(tmp_path / "untied" / "model.safetensors")
    assert torch.equal(saved["language_model.lm_head.weight"], head.weight.detach())


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-mpt-1b-redpajama-200b"])
def test_tie_word_embeddings_false_unties_a_tied_folder(converted, family, tmp_path):
    """`from_pretrained(tied folder, tie_word_embeddings=False)` unties the output matrix as the bare LM's kwarg does:
    it starts as the embeddings (same logits), trains apart, and its folder reloads untied. A tied model whose config
    was set untied after building still saves a folder that reloads (the matrix stored once, the folder tied)."""
    from safetensors.torch import load_file

    path = converted(family)
    tied, processor = load(converted, family)
    inputs = sample_inputs()
    untied = AutoModelForImageTextToText.from_pretrained(path, tie_word_embeddings=False)
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(untied(**inputs).logits, tied(**inputs).logits, rtol=0, atol=0)
        untied.get_output_embeddings().weight.add_(0.5)
    untied.save_pretrained(tmp_path / "untied")
    assert "language_model.lm_head.weight" in load_file(tmp_path / "untied" / "model.safetensors")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "untied")
    assert again.get_output_embeddings().weight is not again.get_input_embeddings().weight
    assert torch.equal(again.get_output_embeddings().weight, untied.get_output_embeddings().weight)
    tied.config.tie_word_embeddings = False  # the matrices are still one
    tied.save_pretrained(tmp_path / "still-tied")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "still-tied")
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, tied(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", shared.FAMILIES)
def test_load_state_dict_takes_a_saved_folders_weights(converted, family, tmp_path):
    """A saved folder's `model.safetensors` loads with `load_state_dict` (as `Trainer` resumes) without missing or
    unexpected names: the vision tower in this transformers' layout, tied output weights filled from their source,
    and the LM's names as `from_pretrained` renames them (transformers 5.x saves GPT-NeoX's `lm_head` as `embed_out`,
    and a resumed run read the pretrained one, silently, until the load renamed it)."""
    from safetensors.torch import load_file

    model, _ = load(converted, family)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    target, _ = load(converted, family)
    with torch.no_grad():
        for parameter in target.parameters():
            parameter.normal_()
    result = target.load_state_dict(saved, strict=True)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    loaded = target.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_trainer_bf16_and_gradient_checkpointing(converted, tmp_path):
    model, processor = load(converted, "tiny-llama")
    model.freeze_for_training()
    dataset = caption_dataset()
    collator = OpenFlamingoDataCollator(processor)
    batch = collator([dataset[i] for i in range(len(dataset))])
    loss_before = batch_loss(model, batch)
    args = training_args(tmp_path, bf16=True, **shared.checkpointing_training_arguments(use_reentrant=False))
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    assert batch_loss(model, batch) < loss_before - 0.1


@pytest.mark.parametrize("checkpoint_kwargs", [None, {"use_reentrant": True}])
@pytest.mark.parametrize("tower", ["language", "vision", "perceiver", "to_kv"])
def test_gradient_checkpointing_trains_a_first_layer(converted, checkpoint_kwargs, tower):
    """With the embeddings frozen, nothing that enters the LM's first layer (before the first gated block, N=2), the
    vision tower's first layer or the Perceiver (the frozen tower's features, made without gradients) needs a
    gradient, nor the gated blocks' keys and values of the latents: a reentrant checkpoint would give their trainable
    weights (e.g. LoRA's) none, silently. The default is non-reentrant on every transformers version; asked for
    reentrant, the output of both towers' input embeddings and the Perceiver's input are made to need one (on
    transformers 4.x the vision tower's was not; on every version the Perceiver's was not)."""
    model, _ = load(converted, "tiny-neox")
    assert "0" not in model.gated_cross_attn_layers
    model.requires_grad_(False)
    if tower == "language":
        first = find_decoder_layers(model.language_model, model.config.text_config.num_hidden_layers)[0]
    elif tower == "vision":
        first = find_decoder_layers(model.vision_model, model.config.vision_config.num_hidden_layers)[0]
    elif tower == "perceiver":
        first = model.perceiver.layers[0]
    else:
        first = next(iter(model.gated_cross_attn_layers.values())).attn.to_kv
    first.requires_grad_(True)
    model.train()
    shared.enable_checkpointing(model, **(checkpoint_kwargs or {}))
    inputs = sample_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for p in first.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_reentrant_checkpointing_of_the_recipe_warns_of_nothing(converted, family):
    """The recipe's trainables with reentrant checkpointing: the frozen vision tower runs without gradients, so its
    layers run as they are (on transformers 4.x they were checkpointed all the same, and warned at every step that
    none of their inputs needs a gradient); every other checkpointed layer has an input that needs one."""
    model, _ = load(converted, family)
    model.freeze_for_training()
    model.train()
    shared.enable_checkpointing(model, use_reentrant=True)
    inputs = sample_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert not [str(w.message) for w in caught if "requires_grad" in str(w.message)]
    trained = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(g is not None for g in trained.values()), [k for k, g in trained.items() if g is None]


@pytest.mark.skipif(
    not modeling._CHECKPOINTS_WITHOUT_GRADIENTS, reason="the override exists for transformers < 5.24 only"
)
def test_checkpointing_override_passes_later_keywords_on(converted, monkeypatch):
    """transformers 5.18-5.23 call `_set_gradient_checkpointing(..., every_n_layers=...)`: the override for versions
    whose checkpointed layers also checkpoint without gradients failed with a TypeError.
    Simulated here on 4.x with a base method of that signature: the keyword reaches it, and checkpointing works."""
    seen = {}
    base = transformers.PreTrainedModel._set_gradient_checkpointing

    def with_a_later_keyword(self, enable=True, gradient_checkpointing_func=None, every_n_layers=None):
        seen["every_n_layers"] = every_n_layers
        return base(self, enable, gradient_checkpointing_func)

    monkeypatch.setattr(transformers.PreTrainedModel, "_set_gradient_checkpointing", with_a_later_keyword)
    model, _ = load(converted, "tiny-neox")
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    model._set_gradient_checkpointing(True, checkpoint, every_n_layers=2)
    assert seen == {"every_n_layers": 2} and model.is_gradient_checkpointing
    model.train()
    inputs = sample_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_gradient_checkpointing_covers_all_three_and_changes_nothing(converted, family):
    """LM decoder layers, gated cross-attention blocks and Perceiver layers each run under a (non-reentrant)
    checkpoint: recomputed once in backward; loss and gradients are those without checkpointing."""
    inputs = sample_inputs()

    def run(checkpointing: bool):
        model, _ = load(converted, family)
        model.freeze_for_training()
        model.train()
        runs = collections.Counter()
        if checkpointing:
            shared.enable_checkpointing(model, use_reentrant=False)
            for module in model.modules():
                if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
                    checkpoint, name = module._gradient_checkpointing_func, type(module).__name__

                    def counting(function, *args, _checkpoint=checkpoint, _name=name, **kwargs):
                        def counted(*inner_args, **inner_kwargs):
                            runs[_name] += 1
                            return function(*inner_args, **inner_kwargs)

                        return _checkpoint(counted, *args, **kwargs)

                    module._gradient_checkpointing_func = counting
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        forward_runs = dict(runs)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        layer = find_decoder_layers(model.language_model, model.config.text_config.num_hidden_layers)[0]
        return loss.detach(), grads, forward_runs, dict(runs), type(layer).__name__, model

    loss, grads, _, _, _, _ = run(False)
    loss_gc, grads_gc, forward_runs, all_runs, layer_name, model = run(True)
    num_blocks = len(model.gated_cross_attn_layers)
    num_layers = model.config.text_config.num_hidden_layers
    # each block runs twice per forward: its keys/values over the images, then on the text
    assert forward_runs[layer_name] == num_layers and all_runs[layer_name] == 2 * num_layers
    assert forward_runs["OpenFlamingoGatedCrossAttentionBlock"] == 2 * num_blocks
    assert all_runs["OpenFlamingoGatedCrossAttentionBlock"] == 4 * num_blocks
    assert all_runs["OpenFlamingoPerceiverLayer"] == 2 * forward_runs["OpenFlamingoPerceiverLayer"] > 0
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=1e-6)
    assert grads_gc.keys() == grads.keys() and all(g is not None for g in grads_gc.values())
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_split_modules_name_the_fsdp_units(converted):
    model, _ = load(converted, "tiny-neox")
    present = {type(module).__name__ for module in model.modules()}
    assert set(model._no_split_modules) <= present  # accelerate's auto-wrap rejects absent names
    assert {
        "GPTNeoXLayer",
        "OpenFlamingoGatedCrossAttentionBlock",
        "OpenFlamingoPerceiverLayer",
        "CLIPEncoderLayer",
    } <= set(model._no_split_modules)


# ---- PEFT ----


def test_lora_on_mosaic_gpt_wqkv_goes_through_the_qk_layernorm(converted, tmp_path):
    """MosaicGPT's q_ln/k_ln must see base + LoRA output of Wqkv: the adapter model equals the merged model."""
    family = "tiny-mpt-1b-redpajama-200b"
    base, _ = load(converted, family)
    inputs = sample_inputs()
    with torch.no_grad():
        plain = base(**inputs).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        adapted = model(**inputs).logits
    attention = model.base_model.model.language_model.transformer.blocks[0].attn
    assert attention._qk_ln_target is attention.Wqkv  # the LayerNorm hook sits on the LoRA layer
    assert (adapted - plain).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(load(converted, family)[0], tmp_path / "adapter")
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=0, atol=1e-5)
    # with the LayerNorm applied to the base output only, the adapter model would not equal the merged one
    for block in merged.language_model.transformer.blocks:
        assert isinstance(block.attn.Wqkv, torch.nn.Linear) and block.attn._qk_ln_target is block.attn.Wqkv


def test_lora_on_the_cross_attention_save_load_merge(converted, tmp_path):
    base, _ = load(converted, "tiny-neox")
    inputs = sample_inputs()
    targets = r".*(gated_cross_attn_layers|perceiver)\..*\.(to_q|to_kv|to_out|fc1|fc2)"
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    lora_modules = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert lora_modules and not any("vision_model" in name or "gpt_neox" in name for name in lora_modules)
    with torch.no_grad():
        adapted = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(load(converted, "tiny-neox")[0], tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, adapted)
        torch.testing.assert_close(reloaded.merge_and_unload()(**inputs).logits, adapted, rtol=0, atol=1e-5)


def test_the_recipe_and_peft_in_the_wrong_order_are_refused(converted):
    """`freeze_for_training()` after `get_peft_model` would freeze the adapter and train base weights that the adapter
    does not save; an adapter on the input embeddings with the recipe's new-token rows would lose its change to those
    rows when merged. Both are refused with what to do instead."""
    model, _ = load(converted, "tiny-llama")
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="call it before get_peft_model"):
        adapted.freeze_for_training()
    assert all(p.requires_grad for n, p in adapted.named_parameters() if "lora_" in n)
    model, _ = load(converted, "tiny-llama")
    model.freeze_for_training()
    config = peft.LoraConfig(r=4, target_modules=["embed_tokens"], modules_to_save=model.peft_modules_to_save())
    adapted = peft.get_peft_model(model, config)
    with pytest.raises(ValueError, match="adapter on the input embeddings together with freeze_for_training"):
        adapted(**sample_inputs())


def test_the_recipe_refuses_quantized_trainables():
    """transformers' quantization integrations convert the Perceiver and the gated blocks unless told not to: the
    recipe cannot train them (torchao's weights took `requires_grad` and got no gradient, bitsandbytes' refused it
    half-way through; helper-67). Refused before anything changes, naming the modules to leave out."""
    from .test_core import quantized_int8, tiny_model

    model, _ = quantized_int8(tiny_model("llama"), parts=("gated_cross_attn_layers",))  # bitsandbytes: int8 data
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"weights are quantized.*'perceiver', 'gated_cross_attn_layers', 'lm_head'"):
        model.freeze_for_training()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before

    class PackedWeight(torch.Tensor):  # a float tensor subclass standing for quantized values, as torchao's
        pass

    model = tiny_model("llama")
    to_q = model.perceiver.layers[0].attn.to_q
    plain = to_q.weight
    to_q.weight = torch.nn.Parameter(plain.detach().as_subclass(PackedWeight), requires_grad=False)  # as torchao's
    with pytest.raises(ValueError, match=r"1 of their weights are quantized \(e.g. 'perceiver.layers.0.attn.to_q"):
        model.freeze_for_training()
    to_q.weight = plain  # plain again: the recipe applies
    model.freeze_for_training()
    assert to_q.weight.requires_grad
    # bitsandbytes' 4-bit weights stored in bf16 (`bnb_4bit_quant_storage`, as for FSDP): known by their quant_state
    model = tiny_model("llama")
    model.perceiver.layers[0].ff.fc1.weight.quant_state = object()
    with pytest.raises(ValueError, match=r"1 of their weights are quantized \(e.g. 'perceiver.layers.0.ff.fc1"):
        model.freeze_for_training()
    # torch's own subclasses are not quantized weights: a model built under FakeTensorMode (memory estimators)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = tiny_model("llama")
        model.freeze_for_training()
    assert model.perceiver.latents.requires_grad and not next(model.vision_model.parameters()).requires_grad


@pytest.mark.parametrize(
    ("peft_version", "helper_answer", "expected"),
    [("0.21.2", None, True), ("0.22.0", "cache", False), ("0.22.0", "past_key_values", True), ("0.23.0", None, False)],
)
def test_which_cache_name_peft_reads(monkeypatch, peft_version, helper_answer, expected):
    """PEFT <= 0.21 reads the cache as `past_key_values`; 0.22 asks transformers for its name
    (`get_transformers_cache_name`); a later PEFT without that helper is taken to read transformers' name too."""
    import peft
    import peft.import_utils

    monkeypatch.setattr(peft, "__version__", peft_version)
    if helper_answer is None:
        monkeypatch.delattr(peft.import_utils, "get_transformers_cache_name", raising=False)
    else:
        monkeypatch.setattr(peft.import_utils, "get_transformers_cache_name", lambda: helper_answer, raising=False)
    modeling._peft_reads_past_key_values.cache_clear()
    try:
        assert modeling._peft_reads_past_key_values() is expected
    finally:
        modeling._peft_reads_past_key_values.cache_clear()


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mpt"])
def test_prompt_tuning_and_p_tuning(kind, family):
    """PEFT's prompt tuning and p-tuning: PEFT takes the first `PreTrainedModel` child for the backbone whose word
    embeddings it embeds the tokens with (the LM: registered before the vision tower), and prepends its virtual
    tokens' embeddings: the images are placed by the `<image>` embeddings, or by a collator's `image_indices`, which
    cover the tokens after the soft prompt (checked against those embeddings). The loss, the gradients (the prompt's
    only) and `generate` are the model's own with the soft prompt's embeddings prepended, on transformers >= 5.24 too
    (which names the cache `cache`, where peft 0.21 looks for `past_key_values`; peft 0.22 reads `cache`)."""
    from .test_core import MEDIA, PAD, inputs, tiny_model

    model = tiny_model(family)
    text = model.config.text_config
    keys = {"num_layers": text.num_hidden_layers, "token_dim": text.hidden_size}  # (MPT's names PEFT does not know)
    keys["num_attention_heads"] = text.num_attention_heads
    if kind == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **keys)
    else:
        config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16, **keys)
    adapted = peft.get_peft_model(model, config)
    assert adapted.word_embeddings is model.get_input_embeddings()
    ids, pixel_values = inputs(batch=2, seq=10)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2], ids[0, 2] = PAD, 0, MEDIA  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    image_indices = modeling.image_indices_from_input_ids(ids, MEDIA, pixel_values.shape[1])  # as the collator's
    loss = adapted(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    assert {name.split(".")[0] for name, p in adapted.named_parameters() if p.grad is not None} == {"prompt_encoder"}
    adapted.eval()
    prompt = adapted.get_prompt(batch_size=2).detach()
    embeds = torch.cat((prompt, model.get_input_embeddings()(ids)), dim=1)
    prompt_mask = torch.cat((torch.ones(2, 3, dtype=mask.dtype), mask), dim=1)
    with torch.no_grad():
        expected = model(
            inputs_embeds=embeds,
            attention_mask=prompt_mask,
            pixel_values=pixel_values,
            image_indices=torch.cat((torch.zeros(2, 3, dtype=torch.long), image_indices), dim=1),
            labels=torch.cat((torch.full((2, 3), -100), labels), dim=1),
        )
        for given in ({}, {"image_indices": image_indices}):
            got = adapted(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, labels=labels, **given)
            torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="do not number the <image> embeddings of those positions"):
            adapted(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_indices=image_indices.roll(1))
    # generate: PEFT drops position ids for prompt learning (the LM counts positions from 0, padding included), so
    # the rows are not padded here
    ids, pixel_values = inputs(batch=2, seq=10, seed=1)
    embeds = torch.cat((prompt, model.get_input_embeddings()(ids)), dim=1)
    settings = dict(pixel_values=pixel_values, max_new_tokens=5, min_new_tokens=5, output_logits=True)
    settings.update(return_dict_in_generate=True, pad_token_id=PAD)
    image_indices = modeling.image_indices_from_input_ids(ids, MEDIA, pixel_values.shape[1])
    for num_beams in (1, 3):
        got = adapted.generate(input_ids=ids, num_beams=num_beams, **settings)
        expected = model.generate(inputs_embeds=embeds, num_beams=num_beams, **settings)
        assert torch.equal(got.sequences[:, -5:], expected.sequences[:, -5:]), num_beams
        for a, b in zip(got.logits, expected.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # the images placed by indices of the positions after the soft prompt, as the forward takes them
        placed = model.generate(inputs_embeds=embeds, image_indices=image_indices, num_beams=num_beams, **settings)
        assert torch.equal(placed.sequences, expected.sequences), num_beams
    # chunked prefill: PEFT keeps only the last token of every chunk after the first (a plain LM goes wrong silently)
    with pytest.raises(ValueError, match="prefill_chunk_size with PEFT's prompt learning"):
        adapted.generate(input_ids=ids, prefill_chunk_size=4, **settings)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
def test_score_continuations_under_prompt_learning_is_the_models_own_and_forward_scores_the_adapter(kind):
    """README: PEFT hands `score_continuations` on to the model unchanged, and prompt learning adds its virtual tokens
    or prefix only in the wrapper's `forward` / `generate`: `peft_model.score_continuations` scores the model without
    them. The way README gives instead, the wrapper's forward over prompt + candidate, scores the adapted model: for
    prompt tuning, the model's own scores with the soft prompt's embeddings prepended."""
    from .test_core import MEDIA, inputs, tiny_model

    model = tiny_model("llama")
    text = model.config.text_config
    keys = {"num_layers": text.num_hidden_layers, "token_dim": text.hidden_size}
    keys["num_attention_heads"] = text.num_attention_heads
    config_class = peft.PromptTuningConfig if kind == "prompt_tuning" else peft.PrefixTuningConfig
    adapted = peft.get_peft_model(model, config_class(task_type="CAUSAL_LM", num_virtual_tokens=3, **keys)).eval()
    with torch.no_grad():
        adapted.prompt_encoder["default"].embedding.weight.normal_()
    ids, pixel_values = inputs(batch=2, seq=8)
    candidates = [[5, 6, 7], [8], [9, 10]]
    with torch.no_grad():
        own = model.score_continuations(ids, candidates, pixel_values=pixel_values)
        torch.testing.assert_close(adapted.score_continuations(ids, candidates, pixel_values=pixel_values), own)
        scores, expected = torch.zeros(2, 3), torch.zeros(2, 3)
        prompt = adapted.get_prompt(batch_size=2) if kind == "prompt_tuning" else None
        for k, candidate in enumerate(candidates):
            full = torch.cat((ids, torch.tensor([candidate]).expand(2, -1)), dim=1)
            targets = full[:, -len(candidate) :].unsqueeze(-1)
            image_indices = modeling.image_indices_from_input_ids(full, MEDIA, pixel_values.shape[1])
            logits = adapted(input_ids=full, pixel_values=pixel_values, image_indices=image_indices).logits
            log_probs = logits[:, -len(candidate) - 1 : -1].log_softmax(dim=-1)
            scores[:, k] = log_probs.gather(-1, targets).squeeze(-1).sum(-1)
            if prompt is not None:  # the model's own forward with the soft prompt's embeddings before the tokens
                embeds = torch.cat((prompt, model.get_input_embeddings()(full)), dim=1)
                logits = model(inputs_embeds=embeds, pixel_values=pixel_values, image_indices=image_indices).logits
                log_probs = logits[:, -len(candidate) - 1 : -1].log_softmax(dim=-1)
                expected[:, k] = log_probs.gather(-1, targets).squeeze(-1).sum(-1)
    assert (scores - own).abs().max() > 1e-2  # the adapter changes the scores
    if prompt is not None:
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["sequence", "original_kv_cache"])
def test_prefix_tuning_generates_as_the_model_does_after_the_prefix_tokens(conditioning):
    """PEFT's prefix tuning (its own `prepare_inputs_for_generation`, which does not name this model's generation
    state) with a prefix whose keys/values are those of real text tokens: `generate` gives what the model gives for
    those tokens followed by the prompt; on transformers >= 5.24 too, which names the cache `cache`, where peft 0.21
    looks for `past_key_values` (a plain LLaMA loses the prefix there): the model hands PEFT's prompt learning its
    cache under the old name."""
    from .test_core import MEDIA, tiny_model

    model = tiny_model("llama", generated_image_conditioning=conditioning)
    reference = copy.deepcopy(model)
    prefix = torch.randint(0, 400, (1, 3), generator=torch.Generator().manual_seed(5))
    adapted = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        out = reference(input_ids=prefix, use_cache=True)
        _, cache = lm_cache_of(out)
        layers = [(layer.keys, layer.values) for layer in cache.layers]  # (1, heads, 3, head_dim) each
        rows = torch.stack([t[0].transpose(0, 1) for kv in layers for t in kv], dim=1)  # (3, 2 * layers, heads, hd)
        adapted.prompt_encoder["default"].embedding.weight.copy_(rows.reshape(3, -1))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 400, (2, 8), generator=generator)
    ids[:, 2] = ids[:, 5] = MEDIA
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 402, 0  # left padding
    pixel_values = torch.randn(2, 2, 3, 32, 32, generator=generator)
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1)
    got = adapted.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **settings)
    assert got.shape == (2, ids.shape[1] + 6)  # (before: the generation state refused as an unused model kwarg)
    expected = reference.generate(
        input_ids=torch.cat((prefix.expand(2, -1), ids), dim=1),
        attention_mask=torch.cat((torch.ones(2, 3, dtype=torch.long), mask), dim=1),
        pixel_values=pixel_values,
        **settings,
    )
    assert torch.equal(got[:, -6:], expected[:, -6:])


def test_an_mpt_output_matrix_untied_at_the_top_stays_untied_when_reloaded(converted, tmp_path):
    """`config.tie_word_embeddings=False` with a separate MPT `lm_head` (as PEFT's merge of an adapted `wte` leaves
    it): saved and loaded, the output matrix is the saved one (transformers 4.x tied it to `wte` again by the LM's
    own flag)."""
    model, _ = load(converted, "tiny-mpt")
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(lm.lm_head.weight.detach() + 0.5 * torch.randn_like(lm.lm_head.weight))
    model.config.tie_word_embeddings = False
    inputs = sample_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)


def test_trainer_with_lora_on_the_lm_and_the_recipe(converted, tmp_path):
    """LoRA on the LM's native names + the recipe's modules trained in full (modules_to_save), tied MPT."""
    family = "tiny-mpt"
    model, processor = load(converted, family)
    model.freeze_for_training()
    config = peft.LoraConfig(r=4, target_modules=["Wqkv"], modules_to_save=model.peft_modules_to_save())
    model = peft.get_peft_model(model, config)
    dataset = caption_dataset()
    collator = OpenFlamingoDataCollator(processor)
    batch = collator([dataset[i] for i in range(len(dataset))])
    loss_before = batch_loss(model, batch)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=dataset, data_collator=collator)
    trainer.train()
    assert batch_loss(model, batch) < loss_before - 0.1
    inputs = sample_inputs()
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    # without `freeze_for_training()` the base has no `new_token_embeddings`: refused, not silently dropped
    with pytest.raises(ValueError, match=r"call `model.freeze_for_training\(\)` before loading"):
        peft.PeftModel.from_pretrained(load(converted, family)[0], tmp_path / "adapter")
    # so are transformers' own ways in (transformers 5 would drop them with a logged report)
    base, _ = load(converted, family)
    with torch.no_grad():
        plain_logits = base(**inputs).logits
    with pytest.raises(ValueError, match=r"call `model.freeze_for_training\(\)` before loading"):
        base.load_adapter(str(tmp_path / "adapter"))
    assert not getattr(base, "peft_config", None)  # refused before anything was loaded
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, plain_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"call `model.freeze_for_training\(\)` before loading"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "adapter")
    # rows trained for other ids: another number is refused by both routes, before anything is loaded
    mismatch = (
        r"new_token_embeddings\S* holds 3 trained embedding rows, but this model trains 2 \(token ids \[400, 401\]\)"
    )
    other, _ = load(converted, family)
    other.freeze_for_training(new_token_ids=[MEDIA, EOC])
    with pytest.raises(ValueError, match=mismatch):
        other.load_adapter(str(tmp_path / "adapter"))
    assert not getattr(other, "peft_config", None)
    with pytest.raises(ValueError, match=mismatch):
        peft.PeftModel.from_pretrained(other, tmp_path / "adapter")
    # the rows are held in ascending id order, however the ids are given: each goes back to its own token
    shuffled, _ = load(converted, family)
    shuffled.freeze_for_training(new_token_ids=[PAD, MEDIA, EOC])
    shuffled = peft.PeftModel.from_pretrained(shuffled, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(shuffled(**inputs).logits, adapted, rtol=0, atol=1e-6)
    base.freeze_for_training()  # the same model, as the error says
    base.load_adapter(str(tmp_path / "adapter"))
    base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, adapted, rtol=0, atol=1e-6)
    try:  # transformers' switches (on 5.x they need peft >= 0.22)
        base.disable_adapters()
    except ValueError as error:
        assert "peft" in str(error).lower(), error
    else:
        with torch.no_grad():
            torch.testing.assert_close(base(**inputs).logits, plain_logits, rtol=0, atol=1e-6)
            base.enable_adapters()  # the modules_to_save copies (Perceiver, gated blocks, rows) back on too
            torch.testing.assert_close(base(**inputs).logits, adapted, rtol=0, atol=1e-6)
    base, _ = load(converted, family)
    base.freeze_for_training()
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, adapted, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")  # the trained rows go into the saved embedding matrix
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, adapted, rtol=0, atol=1e-5)


# ---- the example ----


def test_finetune_example_runs(converted, tmp_path):
    finetune = example_module("finetune")
    argv = ["--model", str(converted("tiny-mpt-1b-redpajama-200b")), "--output-dir", str(tmp_path / "out")]
    result = finetune.main([*argv, "--max-steps", "6", "--learning-rate", "1e-2"])
    assert result["last_loss"] < result["first_loss"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    result = finetune.main([*argv, "--max-steps", "2", "--lora", "--gradient-checkpointing"])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    compile_args = ["--compile-blocks", "--compile-backend", "aot_eager", "--output-dir", str(tmp_path / "compiled")]
    compiled = finetune.main([*argv, "--max-steps", "6", "--learning-rate", "1e-2", *compile_args])
    assert compiled["last_loss"] < compiled["first_loss"]
    assert (tmp_path / "compiled" / "model.safetensors").is_file()
    torch._dynamo.reset()


def test_finetune_example_refuses_fsdp_without_a_launcher(monkeypatch, capsys):
    """`--fsdp` run with plain `python` (no torchrun): a usage error naming torchrun, before the model is loaded (it
    failed at the first step on the CPU, after loading, with torch's `RANK expected, but not set`)."""
    finetune = example_module("finetune")
    no_launcher(monkeypatch)
    loaded = []
    monkeypatch.setattr(finetune, "resolve_model", lambda model: loaded.append(model) or model)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(["--fsdp", "--max-steps", "1"])
    assert exit_info.value.code == 2 and not loaded
    assert "--fsdp shards the model across processes: launch with torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE"])
def test_finetune_example_takes_fsdp_under_an_mpi_launch_on_the_cpu(size, monkeypatch):
    """accelerate's multi-CPU state also comes from an MPI launch (`accelerate launch --cpu --mpirun_hostfile ...`,
    `mpirun -n 2`), which sets no LOCAL_RANK: `--fsdp` is not refused there (it trains, sharded, in 2 processes);
    on a GPU accelerate needs LOCAL_RANK, so there it still is."""
    finetune = example_module("finetune")
    no_launcher(monkeypatch)
    monkeypatch.setenv(size, "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert finetune.launched_as_one_of_several_processes()

    def past_the_check(model):
        raise RuntimeError("past the check")

    monkeypatch.setattr(finetune, "resolve_model", past_the_check)
    with pytest.raises(RuntimeError, match="past the check"):
        finetune.main(["--fsdp", "--max-steps", "1"])
    monkeypatch.setenv(size, "1")
    assert not finetune.launched_as_one_of_several_processes()
    monkeypatch.setenv(size, "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not finetune.launched_as_one_of_several_processes()


def test_finetune_example_checkpoints_and_resumes(converted, tmp_path):
    """`--save-steps` writes checkpoints; `--resume-from-checkpoint latest` (or a path) goes on from the newest one
    with the same losses as a run without the break."""
    finetune = example_module("finetune")

    def losses(result: dict) -> list[float]:
        return [entry["loss"] for entry in result["trainer"].state.log_history if "loss" in entry]

    argv = ["--model", str(converted("tiny-neox")), "--learning-rate", "1e-2", "--save-steps", "2"]
    straight = finetune.main([*argv, "--max-steps", "4", "--output-dir", str(tmp_path / "straight")])
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    broken = [*argv, "--output-dir", str(tmp_path / "broken"), "--resume-from-checkpoint", "latest"]
    # `latest` with no checkpoint yet (a resumable job's first run) starts from the beginning
    first = finetune.main([*broken, "--max-steps", "2"])
    assert losses(first) == pytest.approx(losses(straight)[:2], rel=1e-5)
    resumed = finetune.main([*broken, "--max-steps", "4"])
    assert len(losses(resumed)) == 4  # the resumed run's history holds the checkpoint's two steps, then two more
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)
    with pytest.raises(SystemExit):
        finetune.main([*argv, "--resume-from-checkpoint", str(tmp_path / "nowhere")])


def test_finetune_example_on_a_caption_dataset_with_an_image_column(converted, tiny_images, tmp_path):
    """`--caption-column` on the common layout (`image`, `caption`) without `--image-column`; a dataset with no image
    column gets a message naming the flag."""
    import datasets

    finetune = example_module("finetune")
    rows = {"image": [image.convert("RGB") for image in tiny_images[:4]], "caption": ["a b", "c", "d e f", "g"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "captions")
    argv = ["--model", str(converted("tiny-mpt-1b-redpajama-200b")), "--output-dir", str(tmp_path / "out")]
    argv += ["--dataset", str(tmp_path / "captions"), "--caption-column", "caption", "--max-steps", "2"]
    finetune.main(argv)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    datasets.Dataset.from_dict({"photo": rows["image"], "caption": rows["caption"]}).save_to_disk(tmp_path / "other")
    with pytest.raises(SystemExit, match="no image column 'images' \\(nor 'image'\\).*pass --image-column"):
        finetune.main([*argv[:-5], str(tmp_path / "other"), "--caption-column", "caption", "--max-steps", "2"])
    # the caption column forgotten: named before training starts, not by the collator at the first step
    with pytest.raises(SystemExit, match=r"has no column 'text'.*pass --text-column \(or --caption-column\)"):
        finetune.main([*argv[:-4], "--max-steps", "2"])


def test_finetune_example_skips_rows_without_a_caption(tiny_images, tmp_path, capsys):
    """A null or empty caption is not trained on as the text "None" (the original's LAION pipeline skips such
    samples, and strips the others' whitespace); a dataset without any caption is an error."""
    import argparse

    import datasets

    finetune = example_module("finetune")
    images = [image.convert("RGB") for image in tiny_images[:4]]
    rows = {"image": images, "caption": ["a cat", None, " ", "  a dog\n"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "captions")
    parser = argparse.ArgumentParser()
    finetune.add_training_arguments(parser)
    args = parser.parse_args(["--dataset", str(tmp_path / "captions"), "--caption-column", "caption"])
    dataset = finetune.load_training_dataset(args)
    assert dataset["text"] == ["<image>a cat<|endofchunk|>", "<image>a dog<|endofchunk|>"]
    assert "skipped 2 of 4 rows without a caption in 'caption'" in capsys.readouterr().out
    rows["caption"] = [None, "", None, ""]
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "none")
    args.dataset = str(tmp_path / "none")
    with pytest.raises(SystemExit, match="no row of .* has a caption in 'caption'"):
        finetune.load_training_dataset(args)


def test_finetune_example_seeds_the_lora_weights(converted, tmp_path, monkeypatch):
    """`--seed` is set before the model is built, so LoRA's weights (drawn before `Trainer` seeds the run) follow
    it: two runs with other random states before them train the same adapter."""
    from safetensors.torch import load_file

    finetune = example_module("finetune")
    argv = ["--model", str(converted("tiny-neox")), "--max-steps", "1", "--lora", "--seed", "3"]
    adapters = []
    for run, state in enumerate((1, 2)):
        torch.manual_seed(state)
        finetune.main([*argv, "--output-dir", str(tmp_path / str(run))])
        adapters.append(load_file(tmp_path / str(run) / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        assert torch.equal(adapters[0][name], adapters[1][name]), name


def test_finetune_trainer_label_smoothing_scores_the_next_token(converted, tmp_path):
    """`FlamingoTrainer` with `label_smoothing_factor`: the smoothed loss of the shifted labels (Trainer would score
    each position's own token: it shifts only for the causal LMs it knows)."""
    from transformers import TrainingArguments

    finetune = example_module("finetune")
    model, _ = load(converted, "tiny-mpt")
    inputs = sample_inputs()
    inputs["labels"] = inputs["input_ids"].clone()
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=1e-6, report_to=[], use_cpu=True)
    trainer = finetune.FlamingoTrainer(model=model, args=args)
    with torch.no_grad():
        expected = model(**inputs).loss
        smoothed = trainer.compute_loss(model, dict(inputs))
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    torch.testing.assert_close(smoothed, expected, rtol=1e-4, atol=1e-4)
    # the public loss is forward's: a mean over the targets, or their sum over `num_items_in_batch`
    loss = modeling.OpenFlamingoForConditionalGeneration.causal_lm_loss
    assert torch.equal(loss(logits, inputs["labels"]), expected)
    targets = inputs["labels"][:, 1:].ne(-100).sum()
    torch.testing.assert_close(loss(logits, inputs["labels"], num_items_in_batch=2 * targets), expected / 2)


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-neox"])
def test_finetune_trainer_label_smoothing_with_prompt_tuning(converted, family, tmp_path):
    """PEFT's prompt tuning prepends its virtual tokens' logits (their labels, -100, only in the model's own loss):
    `FlamingoTrainer`'s smoothed loss scores the batch's own tokens, as the model's loss does (it failed with
    "Expected input batch_size (18) to match target batch_size (12)"), and trains the prompt."""
    finetune = example_module("finetune")
    model, processor = load(converted, family)
    text = model.config.text_config
    keys = {"num_layers": text.num_hidden_layers, "token_dim": text.hidden_size}  # (MPT's names PEFT does not know)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, num_attention_heads=text.num_attention_heads, **keys
    )
    adapted = peft.get_peft_model(model, config)
    collator = OpenFlamingoDataCollator(processor)
    dataset = caption_dataset()
    batch = collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        expected = adapted(**batch).loss  # PEFT's -100 labels for the soft prompt
        outputs = adapted(**{k: v for k, v in batch.items() if k != "labels"})
        targets = batch["labels"][:, 1:].ne(-100).sum()
        for num_items_in_batch in (None, targets):
            got = finetune.next_token_label_smoothing(0.0)(outputs, batch["labels"], num_items_in_batch)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    prompt = adapted.prompt_encoder["default"].embedding.weight.detach().clone()
    args = training_args(tmp_path, label_smoothing_factor=0.1, max_steps=1, weight_decay=0.0)
    finetune.FlamingoTrainer(model=adapted, args=args, train_dataset=dataset, data_collator=collator).train()
    assert not torch.equal(adapted.prompt_encoder["default"].embedding.weight, prompt)


def smoothed_step_as_4x1_and_2x2(tmp_path, make_model, dataset, collator, **overrides) -> list[dict]:
    """One `FlamingoTrainer` step with label smoothing over 4 rows, as 4 x 1 and as 2 x 2 (gradient accumulation),
    each on a model from `make_model()`: the first log entry of each run."""
    finetune = example_module("finetune")
    logs = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = training_args(
            tmp_path / str(batch_size),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            label_smoothing_factor=0.1,
            max_steps=1,
            **overrides,
        )
        trainer = finetune.FlamingoTrainer(model=make_model(), args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        logs.append(trainer.state.log_history[0])
    return logs


def test_finetune_trainer_label_smoothing_with_gradient_accumulation(converted, tmp_path):
    """One step over 4 rows, as 4 x 1 or 2 x 2 (gradient accumulation): the same loss and gradient norm with label
    smoothing, on both transformers majors (4.x's own label smoother takes no `num_items_in_batch`: `FlamingoTrainer`
    gives its loss as a `compute_loss_func`)."""
    _, processor = load(converted, "tiny-mpt")

    def make_model():
        model, _ = load(converted, "tiny-mpt")
        model.freeze_for_training()
        return model

    logs = smoothed_step_as_4x1_and_2x2(
        tmp_path,
        make_model,
        caption_dataset(),
        OpenFlamingoDataCollator(processor),
        max_grad_norm=1e9,
        learning_rate=1e-3,
    )
    trained = [{k: v for k, v in log.items() if k in ("loss", "grad_norm")} for log in logs]
    assert trained[0].keys() == {"loss", "grad_norm"}
    # normalised by the accumulated batch's targets on both majors (not the mean of the micro-batches' means)
    assert trained[1] == pytest.approx(trained[0], rel=1e-4)


def test_finetune_trainer_counts_the_targets_the_loss_scores(converted, tmp_path):
    """Batches not made by the collator may hold a target at position 0, which the shifted loss never scores:
    transformers 4.x's `num_items_in_batch` counted it, 5.x does not. `FlamingoTrainer` counts `labels[..., 1:]` on
    both: the logged loss (label smoothing on, 4 x 1 and 2 x 2) is `LabelSmoother` over the shifted labels."""
    from transformers.trainer_pt_utils import LabelSmoother

    model, _ = load(converted, "tiny-mpt")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        row = {k: v[0] for k, v in sample_inputs(seed=i).items()}
        row["input_ids"] = torch.cat((torch.tensor([5]), row["input_ids"][:-1]))  # starts with text: a target
        labels = row["input_ids"].clone()
        labels[row["input_ids"] == model.config.media_token_id] = -100
        labels[len(labels) - 1 - i % 2 :] = -100  # other target counts per row; position 0 stays a target
        row["pixel_values"] = row["pixel_values"] + 0.1 * torch.randn(row["pixel_values"].shape, generator=generator)
        rows.append({**row, "labels": labels})

    def collate(batch):
        return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}

    with torch.no_grad():
        batch = collate(rows)
        expected = LabelSmoother(epsilon=0.1)(
            model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"], shift_labels=True
        )
    logs = smoothed_step_as_4x1_and_2x2(tmp_path, lambda: copy.deepcopy(model), rows, collate, learning_rate=0.0)
    for log, runs in zip(logs, ("4 x 1", "2 x 2"), strict=True):
        assert log["loss"] == pytest.approx(float(expected), rel=1e-4), runs


def test_cuda_graph_training_example_runs_its_step(converted, tmp_path):
    """The example's batches keep one shape (tokens padded to --length, images to --max-images) and its step trains;
    on this CPU the step runs eagerly (on a GPU it is captured once and replayed)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_cuda_graph
    finally:
        sys.path.remove(str(EXAMPLES))
    out = tmp_path / "out"
    model_dir = str(converted("tiny-mpt-1b-redpajama-200b"))
    argv = ["--model", model_dir, "--max-steps", "8", "--learning-rate", "1e-2", "--max-images", "2"]
    result = train_cuda_graph.main([*argv, "--length", "12", "--output-dir", str(out)])
    assert len(result["losses"]) == 8 and not result["graphed"]
    assert result["losses"][-1] < result["losses"][0]
    assert (out / "model.safetensors").is_file()
    # bf16 autocast: MixedPrecisionAdamW (bf16 Linear weights), and the fp32 master weights are what is saved
    mixed = train_cuda_graph.main([*argv, "--length", "12", "--bf16", "--output-dir", str(tmp_path / "bf16")])
    assert mixed["losses"][-1] < mixed["losses"][0]
    weight = "gated_cross_attn_layers.0.attn.to_q.weight"
    assert mixed["model"].get_parameter(weight).dtype == torch.bfloat16
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16").get_parameter(weight)
    assert saved.dtype == torch.float32 and not torch.equal(saved, saved.bfloat16().float())
    neox = train_cuda_graph.main(["--model", str(converted("tiny-neox")), "--max-steps", "3", "--length", "12"])
    assert len(neox["losses"]) == 3  # GPT-NeoX: the attention mask goes in as 4-D
    model, processor = load(converted, "tiny-mpt-1b-redpajama-200b")
    collate = train_cuda_graph.FixedShapeCollator(
        OpenFlamingoDataCollator(processor, max_length=12, pad_to_multiple_of=12), max_images=2, config=model.config
    )
    rows = [{"images": [], "text": "x"}]
    with pytest.raises(ValueError, match="without images"):
        collate(rows)
    short = collate([{"images": [Image.new("RGB", (8, 8))], "text": "<image>A cat."}])
    assert short["input_ids"].shape == (1, 12) and short["pixel_values"].shape[:2] == (1, 2)
    assert (short["pixel_values"][:, 1] == 0).all() and short["image_indices"].max() == 1
    assert short["attention_mask"].shape == (1, 12)  # MPT: the 2-D mask
    with pytest.raises(ValueError, match="raise --max-images"):
        collate([{"images": [Image.new("RGB", (8, 8))] * 3, "text": "<image>a<image>b<image>c"}])


# ---- FSDP: 2 CPU processes (gloo) ----


def fsdp_worker(model_dir: str, out_dir: str) -> None:
    """Run under torchrun: FSDP1 and FSDP2 gradients equal single-process ones; then Trainer's FSDP2 path."""
    import functools

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report: dict = {}
    inputs = sample_inputs()  # rows of equal length, no padding: the mean of the ranks' mean losses is the mean

    def fresh():
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
        model.freeze_for_training()
        shared.enable_checkpointing(model, use_reentrant=False)
        return model

    reference = fresh()
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    expected = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    local = {key: value[rank : rank + 1] for key, value in inputs.items()}
    unit_classes = None
    for version in (1, 2):
        model = fresh()
        unit_classes = {type(m) for m in model.modules() if type(m).__name__ in model._no_split_modules}
        if version == 1:
            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=unit_classes)
            wrapped = FullyShardedDataParallel(
                model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu")
            )
        else:
            for module in list(model.modules()):
                if type(module) in unit_classes:
                    fully_shard(module)
            wrapped = fully_shard(model)
        wrapped(**local, labels=local["input_ids"]).loss.backward()
        if version == 1:
            with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
                grads = {
                    name.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                    for name, p in wrapped.named_parameters()
                    if p.requires_grad
                }
        else:
            grads = {name: p.grad.full_tensor() for name, p in wrapped.named_parameters() if p.requires_grad}
        report[f"fsdp{version}_same_parameters"] = sorted(grads) == sorted(expected)
        report[f"fsdp{version}_max_grad_diff"] = max((grads[k] - expected[k]).abs().max().item() for k in expected)
    report["unit_classes"] = sorted(cls.__name__ for cls in unit_classes)

    # Trainer's own FSDP2 path (through the example, which has the CPU switch), gradient checkpointing and bf16 on
    sys.path.insert(0, str(EXAMPLES))
    import finetune

    output_dir = os.path.join(out_dir, "trained")
    argv = ["--model", model_dir, "--output-dir", output_dir, "--fsdp", "--gradient-checkpointing", "--bf16"]
    result = finetune.main([*argv, "--max-steps", "4", "--batch-size", "2", "--learning-rate", "1e-2"])
    trainer = result["trainer"]
    units = collections.Counter(
        type(m).__name__.removeprefix("FSDP") for m in trainer.model_wrapped.modules() if type(m).__name__[:4] == "FSDP"
    )
    report.update(
        is_fsdp=trainer.is_fsdp_enabled, units=dict(units), first=result["first_loss"], last=result["last_loss"]
    )
    if rank == 0:
        Path(out_dir, "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_two_cpu_processes(converted, tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model_dir = str(converted("tiny-mpt"))  # tied embeddings, new token rows trained
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, model_dir, str(tmp_path)]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for version in (1, 2):
        assert report[f"fsdp{version}_same_parameters"]
        assert report[f"fsdp{version}_max_grad_diff"] < 1e-5, report
    required = {"CLIPEncoderLayer", "MptBlock", "OpenFlamingoGatedCrossAttentionBlock", "OpenFlamingoPerceiverLayer"}
    assert required <= set(report["unit_classes"]), report["unit_classes"]  # 5.x adds CLIPVisionEmbeddings
    assert report["is_fsdp"]
    units = report["units"]
    assert units["MptBlock"] == 4 and units["OpenFlamingoGatedCrossAttentionBlock"] == 4
    assert units["CLIPEncoderLayer"] == 2 and units["OpenFlamingoPerceiverLayer"] > 0
    assert report["last"] < report["first"]
    # saved as this model's code, not as the FSDP2 class torch makes of it
    auto_map = json.loads((tmp_path / "trained" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageTextToText"] == "modeling_openflamingo.OpenFlamingoForConditionalGeneration"
    assert not list((tmp_path / "trained").glob("_fsdp*.py"))
    trained = AutoModelForImageTextToText.from_pretrained(tmp_path / "trained")
    original = AutoModelForImageTextToText.from_pretrained(model_dir)
    trained_state, original_state = trained.state_dict(), original.state_dict()
    for name, tensor in original_state.items():
        if name.startswith(TRAINED_PREFIXES):
            continue
        if name.endswith(("wte.weight", "lm_head.weight")):  # one tied matrix
            changed = set((trained_state[name] != tensor).any(dim=-1).nonzero().flatten().tolist())
            assert {EOC, MEDIA} <= changed <= {EOC, MEDIA, PAD}, changed  # tied: <PAD>'s output row learns
        else:
            assert torch.equal(trained_state[name], tensor), f"{name} changed but is frozen"
    assert not torch.equal(trained_state["perceiver.latents"], original_state["perceiver.latents"])


@pytest.mark.parametrize("only_attend_immediate_media", [True, False])
def test_a_text_only_batch_runs_the_image_path_on_a_blank_image_under_torch_distributed(
    monkeypatch, only_attend_immediate_media
):
    """With several ranks, a loss step without images runs the vision tower, the Perceiver and every block's
    cross-attention on one blank image that no token attends to (so that every rank runs the same modules): the same
    loss and logits as without it, bit for bit (with `only_attend_immediate_media=False` too, where tokens before the
    first image would otherwise average the blank's latents), and every trainable parameter gets a gradient. Not in
    generation, nor with one process."""
    from .test_core import MEDIA, inputs, tiny_model

    model = tiny_model("gpt_neox", only_attend_immediate_media=only_attend_immediate_media).train()
    model.freeze_for_training()
    ids = inputs(batch=2, seq=10)[0]
    ids = ids.masked_fill(ids == MEDIA, 7)  # no <image> token
    expected = model(input_ids=ids, labels=ids)
    assert not model._text_only_batches_run_the_image_path(ids)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *args, **kwargs: 2)
    tower_calls = []
    model.vision_model.register_forward_hook(lambda *args: tower_calls.append(1))
    model.zero_grad()
    got = model(input_ids=ids, labels=ids)
    got.loss.backward()
    assert tower_calls == [1]
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.logits, expected.logits)
    assert got.image_hidden_states is None and got.image_cache is None
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    with torch.no_grad():  # generation (no labels, no gradients) keeps the text-only path
        model.generate(input_ids=ids[:, :4], max_new_tokens=2, pad_token_id=0)
        model.eval()(input_ids=ids)
    assert tower_calls == [1]


def test_a_text_only_batch_on_one_rank_of_ddp_and_fsdp(tmp_path):
    """Rank 0 trains on a text-only batch, rank 1 on one with images (`tests/distributed_text_only_batch.py`, 2 CPU
    processes): DDP with `find_unused_parameters=False` (as `Trainer` sets it with gradient checkpointing) failed at
    the second step and FSDP2's collectives did not match; now both train, with the loss of the model alone."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    script, report = ROOT / "tests" / "distributed_text_only_batch.py", tmp_path / "ranks.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    for _ in range(2):  # once more after a failure: gloo's teardown aborted a process once in CI (before the barrier)
        report.unlink(missing_ok=True)
        process = subprocess.run([*command, str(report)], env=env, capture_output=True, text=True, timeout=240)
        if process.returncode == 0:
            break
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
    ranks = sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["blank"] and rank["ddp_missing_grads"] == [] and rank["trainable"] > 0
        assert rank["loss_ddp"] == rank["loss_alone"]
        assert abs(rank["loss_fsdp"] - rank["loss_alone"]) < 1e-6, rank


if __name__ == "__main__":  # the FSDP worker, started by test_fsdp_two_cpu_processes through torchrun
    fsdp_worker(sys.argv[1], sys.argv[2])


@pytest.mark.parametrize(
    "family, checkpointing",
    [("tiny-mpt-1b-redpajama-200b", False), ("tiny-neox", False), ("tiny-mpt-1b-redpajama-200b", True)],
)
def test_compile_repeated_blocks_changes_nothing_and_compiles_each_kind_once(converted, family, checkpointing):
    """Regional compilation: same loss and gradients as eager (also under gradient checkpointing), and each kind of
    block is compiled once, not once per instance (the backend here is "aot_eager": dynamo and AOTAutograd as on a
    GPU, without inductor's code)."""
    inputs = sample_inputs()

    def run(compiled: bool):
        model, _ = load(converted, family)
        model.freeze_for_training()
        model.train()
        if checkpointing:
            shared.enable_checkpointing(model, use_reentrant=False)
        if compiled:
            model.compile_repeated_blocks(backend="aot_eager", dynamic=False)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, model

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, grads, _ = run(False)
    loss_compiled, grads_compiled, model = run(True)
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-5, atol=1e-6)
    assert grads_compiled.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    blocks = model.repeated_blocks()
    kinds = {type(block) for block in blocks}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert len(blocks) > graphs >= len(kinds), (len(blocks), graphs, kinds)
    assert sum(1 for name, _ in model.named_parameters() if "_orig_mod" in name) == 0  # names unchanged
    torch._dynamo.reset()


class _HostSyncs(TorchDispatchMode):
    """Records the ops that make a CUDA device wait for the host (`.item()`, `bool(tensor)`)."""

    SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_a_4d_mask_equals_the_2d_mask_with_either_attention(family, attn_implementation):
    """`causal_attention_mask_4d`'s boolean mask goes to SDPA as it is; eager attention adds a 4-D mask to the scores,
    so the model makes it additive there (added as it was, True / False were +1 / +0: no causal or padding mask)."""
    from modeling_openflamingo import causal_attention_mask_4d

    from .test_core import inputs, tiny_model

    model = tiny_model(family, attn_implementation=attn_implementation)
    ids, pixel_values = inputs(seq=12)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, labels=labels)
        given = model(
            input_ids=ids, attention_mask=causal_attention_mask_4d(mask), pixel_values=pixel_values, labels=labels
        )
    torch.testing.assert_close(given.loss, expected.loss)
    torch.testing.assert_close(given.logits[0], expected.logits[0])
    torch.testing.assert_close(given.logits[1, :-3], expected.logits[1, :-3])


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt"])
def test_a_4d_mask_is_refused_for_mpt(family):
    """transformers' MPT reads 4-D masks in its own way (5.x: a boolean one with True as masked, the opposite of
    `causal_attention_mask_4d`; 4.x: other logits for an additive one too): a 4-D mask of the caller is refused,
    naming the 2-D mask; the masks `generate` gives MPT with a static cache (MPT's convention) still go through."""
    from modeling_openflamingo import causal_attention_mask_4d

    from .test_core import inputs, tiny_model

    model = tiny_model(family).eval()
    ids, pixel_values = inputs()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    boolean = causal_attention_mask_4d(mask)
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    for given in (boolean, additive):
        with pytest.raises(ValueError, match="4-D attention_mask with an MPT / MosaicGPT .* Pass the 2-D padding mask"):
            model(input_ids=ids, attention_mask=given, pixel_values=pixel_values)
    if modeling._TRANSFORMERS_MAJOR >= 5:  # (4.x's MPT has no static cache)
        kwargs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "max_new_tokens": 3}
        static = model.generate(**kwargs, cache_implementation="static")
        assert torch.equal(static, model.generate(**kwargs))


@pytest.mark.parametrize("family", ["mpt", "mosaic_gpt", "gpt_neox", "llama"])
def test_a_training_step_with_image_indices_makes_no_host_sync(family):
    """With `image_indices` (as the collator makes them) a training step never waits on the device: the host queues
    work ahead of it, and the step can be captured as a CUDA graph (`examples/train_cuda_graph.py`). transformers'
    GPT-NeoX and LLaMA check a 2-D attention mask on the host; given as 4-D (`causal_attention_mask_4d`, which
    `attention_mask_without_host_sync` picks for them) it is used as it is: no sync there either, and the same loss."""
    from modeling_openflamingo.modeling_openflamingo import image_indices_from_input_ids

    from .test_core import inputs, tiny_model

    model = tiny_model(family)
    model.freeze_for_training()  # the recipe: its trainable new-token rows take part as well
    model.train()
    ids, pixel_values = inputs()
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding, as the collator pads
    image_indices = image_indices_from_input_ids(ids, model.config.media_token_id, pixel_values.shape[1])
    given_mask = attention_mask_without_host_sync(mask, model.config)
    assert given_mask.dim() == (2 if family in ("mpt", "mosaic_gpt") else 4)
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "pixel_values": pixel_values, "labels": labels}
    with _HostSyncs() as syncs:
        loss = model(**batch, attention_mask=given_mask, image_indices=image_indices).loss
        loss.backward()
    assert syncs.count == 0
    torch.testing.assert_close(loss, model(**batch, attention_mask=mask).loss, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("family", "attention"),
    [("opt", "sdpa"), ("opt", "eager"), ("falcon", "eager"), ("bloom", "eager")],
)
def test_attention_mask_without_host_sync_keeps_the_2d_mask_for_other_lms(family, attention):
    """Only the LM families known to take `causal_attention_mask_4d`'s boolean 4-D mask as it is get it (GPT-NeoX,
    LLaMA, above). Others keep the 2-D mask and its host check rather than other numbers: OPT derives its positions
    and Bloom its ALiBi from the 2-D mask (a 4-D one fails inside them), and on transformers 4.x Falcon's eager
    attention adds the boolean mask to its scores (other logits, no error)."""
    from transformers import AutoConfig

    from .test_core import inputs, tiny_config

    sizes = {
        "opt": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=4, ffn_dim=64, word_embed_proj_dim=32),
        "falcon": dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=4),
        "bloom": dict(hidden_size=32, n_head=4, n_layer=4),
    }[family]
    torch.manual_seed(0)
    config = tiny_config(text_config=AutoConfig.for_model(family, vocab_size=403, **sizes))
    model = modeling.OpenFlamingoForConditionalGeneration._from_config(config, attn_implementation=attention).eval()
    ids, pixel_values = inputs()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding, as the collator pads
    given_mask = attention_mask_without_host_sync(mask, model.config)
    assert given_mask is mask
    with torch.no_grad():
        padded = model(ids, attention_mask=given_mask, pixel_values=pixel_values).logits[0, :-3]
        alone = model(ids[:1, :-3], pixel_values=pixel_values[:1]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
