"""Data collator for OpenFlamingo training on image-caption pairs and interleaved image-text documents."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

from .configuration_openflamingo import _as_int, _is_int
from .image_processing_openflamingo import _CHANNELS_TO_MODE, open_image
from .modeling_openflamingo import image_indices_from_input_ids
from .processing_openflamingo import IMAGE_TOKEN, _is_image_batch

__all__ = ["OpenFlamingoDataCollator", "attention_mask_without_host_sync", "causal_attention_mask_4d"]

# LM families (`model_type`) known (tested) to take `causal_attention_mask_4d`'s boolean 4-D mask as it is, on both
# transformers majors and with either attention; every other LM gets the 2-D mask, which is always read correctly
# (MPT and MosaicGPT read it on the device; for the others only the host sync is kept). Not "every LM but MPT": on
# transformers 4.x Falcon's eager attention adds the boolean mask to its scores (other logits, no error), and OPT,
# Bloom and 4.x's XGLM fail on it.
_TAKE_BOOLEAN_4D_MASK = ("gpt_neox", "llama")


def causal_attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch, seq)` padding mask -> `(batch, 1, seq, seq)` bool, True where a query may attend to a key (causal and
    not padding): the form transformers' LMs with SDPA attention (GPT-NeoX, LLaMA, ...) take as it is, without the
    host-side check they make of a 2-D mask (the model makes it additive for eager attention). (MPT and MosaicGPT take
    the 2-D mask, which they read without one.)"""
    seq = attention_mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    return causal & attention_mask.bool()[:, None, None, :]


def attention_mask_without_host_sync(attention_mask: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """`(batch, seq)` padding mask -> the form in which `config`'s LM uses it without a host sync (what a training
    step captured as a CUDA graph needs, where the LM has one): GPT-NeoX and LLaMA check a 2-D mask on the host, so
    they get [`causal_attention_mask_4d`]; every other LM gets the 2-D mask as it is (MPT and MosaicGPT read it on the
    device; an LM not known to take the boolean 4-D mask keeps its host check rather than risk other numbers).
    `config`: the `OpenFlamingoConfig` or its `text_config`."""
    text_config = getattr(config, "text_config", config)
    if text_config.model_type in _TAKE_BOOLEAN_4D_MASK:
        return causal_attention_mask_4d(attention_mask)
    return attention_mask


class OpenFlamingoDataCollator:
    r"""
    Batches samples of interleaved images and text for training, with labels made as the original's training code
    makes them.

    Each sample is a mapping with a text (`text_column`, default `"text"`): a string with one `<image>` where each image
    goes and `<|endofchunk|>` after each image's text, e.g. `"<image>A photo of two cats.<|endofchunk|>"` (LAION-style)
    or `"An intro.<image>A caption. More text.<|endofchunk|><image>Another.<|endofchunk|>"` (MMC4-style, laid out as the
    original's `preprocess_interleaved`: `<|endofchunk|>` right before each later `<image>`; with `interleaved=True`,
    text between an `<|endofchunk|>` and the next `<image>` is not trained on); and its
    images (`image_column`, default `"images"`, else `"image"`): a list of images in the order of the `<image>`
    tokens, one image, or nothing. An image is a `PIL.Image.Image`, a path, encoded image bytes (a binary column), an
    array or tensor (HW, HWC or CHW; a 4-D one holds several, as `datasets`' "torch" / "numpy" formats give them, and
    so does a 3-D array that cannot be one image: "numpy"'s `(n, H, W)` stack of grayscale images; those formats give
    a palette image's indices, not its colours: keep such a column unformatted), or a `datasets` `Image` feature's
    undecoded `{"bytes": ..., "path": ...}`; decoded `Image` features (PIL images) work as they are.

    The batch is built by the processor (`return_labels=True`, right padding) and holds `input_ids`,
    `attention_mask`, `labels` and, when any sample has images, `pixel_values` `(batch, max_images, 3, H, W)`
    (zero-padded) and `image_indices` `(batch, seq)`: which image each token follows, made here on the CPU, so that
    the model's forward skips its own check of the `<image>` tokens (a device-to-host sync). Labels are the input ids
    with -100 for padding and `<image>`; with `interleaved=True` also for every token before the first `<image>` and
    for the tokens after each `<|endofchunk|>` up to the next `<image>`.
    `<|endofchunk|>` stays in the loss, as in the original, and so does eos, but for the one appended after an
    interleaved document's last `<|endofchunk|>` (masked as above). Position 0 is also set to -100: labels are
    shifted inside the model, so it is never a target, and this keeps `Trainer`'s `num_items_in_batch` count exact.

    With `Trainer`, pass `remove_unused_columns=False` in `TrainingArguments` (the columns are `text` and `images`,
    not model inputs).

    Args:
        processor ([`OpenFlamingoProcessor`]): the model's processor.
        interleaved (`bool`, defaults to `False`): mask labels as for MMC4-style interleaved documents.
        max_length (`int`, *optional*): truncate each text to this many tokens (images whose `<image>` is cut off are
            dropped). The original used 32 for LAION and 256 for MMC4. With `interleaved=True`, a document whose
            first `<image>` falls after the cut keeps no label (everything before the first `<image>` is masked); the
            original's MMC4 loader skips documents left without images, so filter such documents out of the dataset
            beforehand (a batch of only such rows has no token to train on).
        append_eos (`bool`, defaults to `True`): append the tokenizer's eos token to each text that does not end with
            it, as the original's data pipeline did.
        text_column (`str`, defaults to `"text"`), image_column (`str`, defaults to `"images"`): the sample keys.
        pad_to_multiple_of (`int`, *optional*): pad the sequence length to a multiple of this (with `max_length`, a
            divisor of it).
    """

    def __init__(
        self,
        processor: Any,
        interleaved: bool = False,
        max_length: int | None = None,
        append_eos: bool = True,
        text_column: str = "text",
        image_column: str = "images",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if not callable(processor) or getattr(processor, "tokenizer", None) is None:
            raise ValueError("OpenFlamingoDataCollator needs the model's OpenFlamingoProcessor (with a tokenizer).")
        max_length, pad_to_multiple_of = _as_int(max_length), _as_int(pad_to_multiple_of)  # numpy's too
        for name, value, what in (
            ("max_length", max_length, "tokens per text"),
            ("pad_to_multiple_of", pad_to_multiple_of, "the padded length's multiple"),
        ):
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int ({what}) or None; got {value!r}.")
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of:
            # (the tokenizer refuses it too, but only at the first batch, once training has started)
            raise ValueError(
                f"max_length ({max_length}) must be a multiple of pad_to_multiple_of ({pad_to_multiple_of}): a "
                "truncated text is padded to a multiple of it."
            )
        self.processor = processor
        self.interleaved = interleaved
        self.max_length = max_length
        self.append_eos = append_eos
        self.text_column = text_column
        self.image_column = image_column
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Collate `features` (mappings with a text and images) into a batch of model inputs with `labels`."""
        if isinstance(features, Mapping) or isinstance(features, (str, bytes)):
            raise ValueError(
                "OpenFlamingoDataCollator takes a list of samples (one mapping per sample), as a DataLoader gives it; "
                f"got a {type(features).__name__}."
            )
        if len(features) == 0:
            raise ValueError("OpenFlamingoDataCollator got an empty list of samples.")
        texts, images = [], []
        for index, feature in enumerate(features):
            if not isinstance(feature, Mapping):
                raise ValueError(f"Sample {index} is a {type(feature).__name__}, not a mapping with a text and images.")
            if self.text_column not in feature:
                stripped = (
                    " (Trainer's remove_unused_columns drops the columns the model's forward does not take, before "
                    "the collator sees them: pass TrainingArguments(remove_unused_columns=False).)"
                    if not feature
                    else ""
                )
                raise ValueError(
                    f"Sample {index} has no {self.text_column!r} field (its keys: {sorted(feature)}); set "
                    f"text_column.{stripped}"
                )
            text = feature[self.text_column]
            if not isinstance(text, str):
                raise ValueError(f"Sample {index}: {self.text_column!r} must be a string, got {type(text).__name__}.")
            eos = self.processor.tokenizer.eos_token
            if self.append_eos and eos and not text.endswith(eos):
                text = text + eos
            texts.append(text)
            images.append([self._load_image(image, index) for image in self._sample_images(feature, text, index)])
            if not images[-1] and IMAGE_TOKEN in text and self._image_key(feature) is None:
                raise ValueError(
                    f"Sample {index} has <image> tokens but no {self.image_column!r} (or 'image') field (its keys: "
                    f"{sorted(feature)}); set image_column."
                )
        encoding = self.processor(
            images=images,
            text=texts,
            padding="longest",
            padding_side="right",
            truncation=self.max_length is not None,
            max_length=self.max_length,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_labels=True,
            interleaved=self.interleaved,
        )
        batch = dict(encoding)
        if batch["input_ids"].shape[-1] == 0:
            raise ValueError("Every text of the batch is empty once tokenized: there is nothing to train on.")
        if "pixel_values" in batch:
            batch["image_indices"] = image_indices_from_input_ids(
                batch["input_ids"], self.processor.image_token_id, batch["pixel_values"].shape[1]
            )
        return batch

    def _image_key(self, feature: Any) -> str | None:
        """The sample's images field: `image_column`, else `"image"`; None when it has neither."""
        return self.image_column if self.image_column in feature else "image" if "image" in feature else None

    def _sample_images(self, feature: Any, text: str, index: int) -> list[Any]:
        key = self._image_key(feature)
        value = feature[key] if key is not None else None
        if value is None:
            return []
        if isinstance(value, np.ndarray) and value.ndim == 3 and value.dtype != object:
            return self._grayscale_stack_or_image(value, text, index)
        # `datasets`' "numpy" format gives a row's images of different sizes as a 1-D array of arrays
        ragged = isinstance(value, np.ndarray) and value.dtype == object
        items = list(value) if isinstance(value, (list, tuple)) or ragged else [value]
        # a 4-D array or tensor stands for as many images as its first dimension holds: `datasets`' "torch" and
        # "numpy" formats give a row's images of one size as one stack
        return [image for item in items for image in (list(item) if _is_image_batch(item) else [item])]

    @staticmethod
    def _grayscale_stack_or_image(value: np.ndarray, text: str, index: int) -> list[np.ndarray]:
        """A row's 3-D array: `datasets`' "numpy" format gives a row's 2-D (grayscale) images of one size as one
        `(num_images, H, W)` stack, which is read as such when it cannot be one image (no dimension of 1, 3 or 4
        channels first or last); otherwise it is one image (HWC or CHW), unless the text asks for as many images as
        its first dimension holds, which is ambiguous."""
        channels = _CHANNELS_TO_MODE  # the channel counts the image processor reads (L, RGB, RGBA)
        if value.shape[0] not in channels and value.shape[-1] not in channels:
            return list(value)
        wanted = text.count(IMAGE_TOKEN)
        if wanted > 1 and value.shape[0] == wanted and value.shape[-1] not in channels:
            raise ValueError(
                f"Sample {index}: its images are one array of shape {tuple(value.shape)} for {wanted} <image> tokens: "
                f'one image with {wanted} channels first, or {wanted} grayscale images (as datasets\' "numpy" format '
                'stacks them)? Give a list of images, or use datasets\' "torch" format (it gives `(n, 1, H, W)`).'
            )
        return [value]

    @staticmethod
    def _load_image(image: Any, index: int) -> Any:
        """A PIL image from a PIL image, a path or URL or encoded bytes (opened as it is stored, as the original's data
        pipelines open theirs: [`open_image`]), or a `datasets` `{"bytes": ..., "path": ...}` dict (as `datasets`
        decodes it: turned upright by its EXIF orientation, so that an undecoded `Image` feature gives what the decoded
        one gives)."""
        from PIL import ExifTags, Image, ImageOps

        if isinstance(image, Image.Image) or (isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3)):
            return image  # an array is read by the image processor (HW, HWC or CHW)
        if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path") is not None):
            # (a path may be an http(s) URL, which `datasets` decodes too)
            opened = open_image(bytes(image["bytes"]) if image.get("bytes") is not None else image["path"])
            if opened.getexif().get(ExifTags.Base.Orientation) is not None:  # (as `datasets` checks it)
                return ImageOps.exif_transpose(opened)
            return opened
        if isinstance(image, (str, os.PathLike)):
            return open_image(image)
        if isinstance(image, (bytes, bytearray)):  # encoded image bytes (a binary column), as the processor opens them
            return open_image(bytes(image))
        raise ValueError(
            f"Sample {index}: cannot read an image from a {type(image).__name__}"
            + (f" of {image.ndim} dimensions" if isinstance(image, (np.ndarray, torch.Tensor)) else "")
            + "; give PIL images, arrays (HW, HWC or CHW), paths, encoded image bytes, or a datasets Image feature."
        )
