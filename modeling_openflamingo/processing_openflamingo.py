"""Processor of OpenFlamingo: the open_clip image transform plus the LM tokenizer with OpenFlamingo's three tokens."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import BatchFeature, GenerationConfig, ProcessorMixin

from .image_processing_openflamingo import _CHANNELS_FIRST, _normalize_data_format
from .image_processing_openflamingo import _OVERRIDABLE as IMAGE_KWARGS

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"
# `apply_chat_template(..., sanitize_control_tokens=True)` (transformers 5) marks the special tokens written in user
# text between these two characters (transformers' `_CONTROL_TOKEN_START` / `_END`): they are text, not images
_MARKED_CONTROL_TOKENS = re.compile("\U000f0000.*?\U000f0001", re.S)
# the whitespace a token's text writes as other characters: sentencepiece's "\u2581" (space) and byte-level BPE's
# stand-ins for the whitespace bytes (GPT-2 / GPT-NeoX: "\u0120" space, "\u010a" newline, "\u0109" tab, ...), so that a
# token such as "\u010a\u0120" (newline, space) counts as whitespace only
_WHITESPACE_OF_TOKEN_TEXT = str.maketrans(
    {"\u2581": " ", **{chr(256 + byte): chr(byte) for byte in (9, 10, 11, 12, 13, 32)}}
)


def add_openflamingo_tokens(tokenizer: Any) -> Any:
    """Add `<|endofchunk|>`, `<image>` (and `<PAD>` if the tokenizer has no pad token) in the original's order.

    Idempotent: a tokenizer that already has them as special tokens is returned unchanged. A tokenizer that has one
    as an ordinary vocabulary entry (split into pieces when it tokenizes text) gets it as a special token, with that
    entry's id, as the original's `add_special_tokens` call does. The tokenizer's own additional special tokens stay
    special (the original's call replaced that list; no released LM's tokenizer has any, and the ids are the same).
    """
    special = set(tokenizer.all_special_tokens)
    missing = [t for t in (END_OF_CHUNK_TOKEN, IMAGE_TOKEN) if t not in special]
    if missing:
        parameters = inspect.signature(tokenizer.add_special_tokens).parameters
        names = ("replace_extra_special_tokens", "replace_additional_special_tokens")  # (5.x's name, 4.x's)
        keep_the_others = {name: False for name in names if name in parameters}
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, **keep_the_others)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def interleaved_label_mask(
    input_ids: torch.Tensor, media_token_id: int, eoc_token_id: int, pad_token_id: int | None
) -> torch.Tensor:
    """Labels as the original's training code makes them for interleaved (MMC4-style) documents.

    -100 for padding, `<image>`, every token before the first `<image>`, and the tokens after each `<|endofchunk|>`
    up to (not including) the next `<image>`. The `<|endofchunk|>` tokens stay in the loss, and eos does unless it is
    among those tokens: the eos that ends a document right after its last `<|endofchunk|>` (as the data collator
    appends it) is masked, as in the original.

    `input_ids` `(..., seq)` (one row or a batch) -> labels of the same shape.
    """
    labels = input_ids.clone()
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    never = torch.full_like(positions, -1)
    # position of the latest <image> at or before each token, and of the latest <|endofchunk|> strictly before it
    last_media = torch.where(input_ids == media_token_id, positions, never).cummax(dim=-1).values
    last_eoc = torch.where(input_ids == eoc_token_id, positions, never).cummax(dim=-1).values
    last_eoc_before = torch.cat((never[..., :1], last_eoc[..., :-1]), dim=-1)
    labels[(last_media < 0) | (last_eoc_before > last_media)] = -100
    return caption_label_mask(labels, media_token_id, pad_token_id)


def caption_label_mask(input_ids: torch.Tensor, media_token_id: int, pad_token_id: int | None) -> torch.Tensor:
    """Labels as the original makes them for image-caption pairs: pad and `<image>` -> -100; eos stays.

    `input_ids` `(..., seq)` -> labels of the same shape.
    """
    labels = input_ids.clone()
    if pad_token_id is not None:
        labels[labels == pad_token_id] = -100
    labels[labels == media_token_id] = -100
    return labels


def _write_portable_tokenizer_config(save_directory: str | os.PathLike) -> None:
    """Rewrite a saved `tokenizer_config.json` in the names transformers 4.x and 5.x both read (see
    `OpenFlamingoProcessor.save_pretrained`); a folder without one is left as it is."""
    config_path = Path(save_directory) / "tokenizer_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        additional = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = additional + [t for t in extra if t not in additional]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _is_image_batch(item: Any) -> bool:
    """A numpy array or torch tensor of shape `(num_images, ...)`, 4-D, as the image processor reads it."""
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4


def _same(a: Any, b: Any) -> bool:
    """Whether two values of one keyword are equal (arrays and tensors element by element)."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # (a list and a tuple of one value are equal)
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        equal = a == b
        return bool(equal) if isinstance(equal, bool) else bool(np.all(np.asarray(equal)))
    except (TypeError, ValueError, RuntimeError):  # (arrays of other shapes)
        return False


def _given_twice(name: str, group: str) -> ValueError:
    return ValueError(
        f"`{name}` was given twice with different values, as a keyword argument and under `{group}`: give it once "
        "(transformers' processors refuse it too)."
    )


def _check_padding_side(side: Any) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")


def _each_image(items: list[Any]) -> list[Any]:
    """`items` with each 4-D array or tensor replaced by the images it holds (as many as its first dimension)."""
    if any(isinstance(item, (list, tuple)) for item in items):
        # (else each inner list would count as one image here, and the image processor, which flattens lists, would
        # hand its images to the next `<image>` tokens and rows)
        raise ValueError(
            "`images` are nested too deeply: give one list of images per text (each image once, in the order of the "
            "text's <image> tokens), not lists of lists (OpenFlamingo takes one frame per image)."
        )
    return [image for item in items for image in (item if _is_image_batch(item) else [item])]


class OpenFlamingoProcessor(ProcessorMixin):
    r"""
    Builds OpenFlamingo inputs from interleaved images and text.

    [`OpenFlamingoImageProcessor`] (the open_clip eval transform, exact) and the LM's tokenizer, to which
    `<|endofchunk|>`, `<image>` and `<PAD>` are added in the original's order if they are missing.

    Args:
        image_processor ([`OpenFlamingoImageProcessor`]): the image transform.
        tokenizer ([`PreTrainedTokenizerBase`]): the language model's tokenizer.
        chat_template (`str`, *optional*): unused by the released models; kept for the `ProcessorMixin` API.
        padding_side (`str`, defaults to `"left"`): the side calls pad on unless told otherwise (left: for
            generation); the tokenizer's is set to it. Saved with the processor.
    """

    attributes = ["image_processor", "tokenizer"]
    tokenizer_class = "AutoTokenizer"
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x looks each part's class up by name; 5.x finds the image processor through
        # `AutoImageProcessor` (where the package registers it) and warns that a name here is deprecated
        image_processor_class = "AutoImageProcessor"

        @classmethod
        def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> list[Any]:
            """As transformers 4.x's (each part through its Auto class), with `use_fast=False` for the image processor
            unless given: it has no fast variant, and 4.x's `AutoImageProcessor` otherwise warns on every load of a
            switch to a fast one that "will result in minor differences in outputs". (Not for the tokenizer, whose
            fast variant is the one to load.)"""
            from transformers import AutoImageProcessor, AutoTokenizer

            image_processor_kwargs = {"use_fast": False, **kwargs}
            return [
                AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **image_processor_kwargs),
                AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs),
            ]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> OpenFlamingoProcessor:
        """As [`~ProcessorMixin.from_pretrained`]; `padding_side="left"` or `"right"` sets [`padding_side`] (else the
        folder's, left where it has none)."""
        if "padding_side" in kwargs:  # checked first: the tokenizer's loading takes it too (4.x hides its error)
            _check_padding_side(kwargs["padding_side"])
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        padding_side: str = "left",
        **kwargs: Any,
    ) -> None:
        _check_padding_side(padding_side)
        self._padding_side = padding_side
        if tokenizer is not None:
            add_openflamingo_tokens(tokenizer)
            # the side a call pads on by default, as do `tokenizer.pad` and a pipeline's batches (they read the
            # tokenizer's): left unless chosen otherwise, as this processor pads for generation; training batches ask
            # for right padding by name
            tokenizer.padding_side = padding_side
            if getattr(tokenizer, "clean_up_tokenization_spaces", False):
                # decoded text as the original's and transformers 4.x's (" ." -> "."): transformers 5 skips the
                # cleanup that the tokenizer's config asks for when the tokenizer is BPE, unless told to apply it
                tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
        self.image_token = IMAGE_TOKEN
        self.end_of_chunk_token = END_OF_CHUNK_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def padding_side(self) -> str:
        """The side calls pad on by default: left (for generation) unless the processor was set to right
        (`from_pretrained(padding_side="right")`, `processor.padding_side = "right"`, which sets the tokenizer's side
        too) and its tokenizer still pads right. So a tokenizer set to right alone, as training scripts do, leaves
        prompts left-padded, and a pipeline that sets the tokenizer to left for generation is followed. Saved by
        `save_pretrained` in `processor_config.json` (a folder without it loads left)."""
        tokenizer_side = getattr(self.tokenizer, "padding_side", self._padding_side)
        return "right" if self._padding_side == "right" and tokenizer_side == "right" else "left"

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        _check_padding_side(side)
        self._padding_side = side
        if self.tokenizer is not None:
            self.tokenizer.padding_side = side

    def to_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As [`~ProcessorMixin.to_dict`], with the padding side."""
        output = super().to_dict(*args, **kwargs)
        output["padding_side"] = self.padding_side
        return output

    @property
    def image_token_id(self) -> int:
        """The id of `<image>` (the config's `media_token_id`)."""
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def end_of_chunk_token_id(self) -> int:
        """The id of `<|endofchunk|>` (the config's `eoc_token_id`; `generate` stops at it by default)."""
        return self.tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)

    @property
    def model_input_names(self) -> list[str]:
        """The model inputs a call returns (`labels` too with `return_labels=True`)."""
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str = "longest",
        padding_side: str | None = None,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_labels: bool = False,
        interleaved: bool = False,
        return_tensors: str | None = "pt",
        videos: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """
        Args:
            images: per row, the list of its images in the order of its `<image>` tokens
                (`[[img, ...], [img, ...]]`), or one flat list of all rows' images in order (`[img, img, ...]`, as
                transformers' pipelines pass them), split by the rows' `<image>` counts (a 4-D array or tensor stands
                for its images; a list of one per row is each row's); for a single `text` string, a list of images or
                one image. Rows may have different numbers of images (and none); `pixel_values` is
                zero-padded to the batch's largest count.
            text: one string or a list of strings, with one `<image>` where each image goes.
            padding: as the tokenizer's; defaults to `"longest"` (rows of a batch come out as one tensor).
            truncation: as the tokenizer's (see `max_length`).
            max_length: with `truncation` unset, truncates to `max_length` tokens unless `padding="max_length"`
                (also under the default `padding="longest"`, where the tokenizer alone would not: it does only for
                `padding=False`); a `pad_to_multiple_of` must then divide it. The images of cut `<image>` tokens
                are dropped.
            padding_side: by default the processor's ([`padding_side`]: "left", for generation, unless set
                otherwise), "right" when `return_labels=True` (training).
            return_labels: also return `labels`: the input ids with pad and `<image>` set to -100 (eos stays unless
                `interleaved` masks it), as the original's training code makes them; also -100 where no real token
                precedes (each row's first position, and with left padding the first real token), as nothing predicts
                those.
            interleaved: with `return_labels`, also mask as for MMC4-style interleaved documents (everything before
                the first `<image>` and between each `<|endofchunk|>` and the next `<image>`).
            return_tensors: `"pt"` (the default, unlike transformers' own processors, whose default is lists),
                `"np"`, or `None` for lists (`pixel_values` then a list of `(max_images, 3, H, W)` arrays, one per
                row).

            **kwargs: the image processor's per-call options (`size`, `do_normalize`, `image_mean`, ...: see
                [`~OpenFlamingoImageProcessor.preprocess`]; or under `images_kwargs`; `device` returns `pixel_values` on
                that device; `data_format` only as `"channels_first"`) and the tokenizer's
                (`add_special_tokens`, `pad_to_multiple_of`, `truncation_side`, ...; or under `text_kwargs`). Any
                other keyword is an error.

        Returns:
            [`BatchFeature`] with `input_ids` and `attention_mask` `(batch, seq)`, `pixel_values`
            `(batch, max_images, 3, H, W)` when any row has images, and `labels` when asked for.
        """
        if videos is not None or audio is not None:  # (`apply_chat_template` passes both, as None)
            raise ValueError("OpenFlamingo takes images and text only, not videos or audio.")
        if text is None:
            raise ValueError("OpenFlamingoProcessor needs `text`, with one <image> token where each image goes.")
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(
                "`text` must be a string or a non-empty list of strings (one per row, with one <image> token where "
                f"each image goes); got {text!r:.200}."
            )
        images_kwargs, kwargs = self._split_kwargs(kwargs)
        device = images_kwargs.pop("device", None)
        if device is not None and return_tensors != "pt":  # (`TensorType.PYTORCH` equals "pt")
            raise ValueError(
                f"`device` puts `pixel_values` on a device: it needs return_tensors='pt', not {return_tensors!r}."
            )
        # the tokenizer options this call names may also come under `text_kwargs` (not both ways with different values:
        # one of them was ignored without a word)
        for name, value, default in (
            ("padding", padding, "longest"),
            ("padding_side", padding_side, None),
            ("truncation", truncation, None),
            ("max_length", max_length, None),
        ):
            if name in kwargs and value != default and not _same(kwargs[name], value):
                raise _given_twice(name, "text_kwargs")
        padding = kwargs.pop("padding", padding)
        padding_side = kwargs.pop("padding_side", padding_side)
        truncation = kwargs.pop("truncation", truncation)
        max_length = kwargs.pop("max_length", max_length)
        if max_length is not None and truncation is None and padding != "max_length":
            # as the tokenizer does for `max_length` alone (its check only fires with `padding=False`, and this call
            # pads "longest" by default, so it would keep every token without a word)
            truncation = True
        # `apply_chat_template`'s assistant mask asks where placeholders were expanded: none are, here
        kwargs.pop("return_text_replacement_offsets", None)
        if kwargs.get("split_special_tokens", getattr(self.tokenizer, "split_special_tokens", False)):
            if images is not None:
                raise ValueError(
                    f"With split_special_tokens=True the tokenizer encodes {IMAGE_TOKEN} as plain text, so no token "
                    "would mark where the images go: leave split_special_tokens off when giving images."
                )
            image_counts = [0] * len(texts)  # (an <image> in the text is text)
        elif kwargs.get("sanitize_control_tokens"):
            image_counts = [_MARKED_CONTROL_TOKENS.sub("", t).count(IMAGE_TOKEN) for t in texts]
        else:
            image_counts = [t.count(IMAGE_TOKEN) for t in texts]
        image_rows = self._image_rows(images, image_counts, single)
        for row, (count, row_images) in enumerate(zip(image_counts, image_rows, strict=True)):
            if count != len(row_images):
                raise ValueError(
                    f"Text {row} has {count} {IMAGE_TOKEN} tokens but {len(row_images)} images were given for it."
                )
        if padding_side is None:
            padding_side = "right" if return_labels else self.padding_side
        _check_padding_side(padding_side)  # (the tokenizer's own error names a `direction`, or is a TypeError)
        # the tokenizer's call takes no `truncation_side` (it reads its attribute): set for this call when given
        truncation_side = kwargs.pop("truncation_side", None) or self.tokenizer.truncation_side
        saved_side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, truncation_side
        # labels need the mask (padding is found by it, not by the pad id, which may be eos): asked of the tokenizer
        # and left out of the result afterwards if the caller said so
        drop_mask = return_labels and kwargs.get("return_attention_mask") is False
        if drop_mask:
            kwargs["return_attention_mask"] = True
        try:
            encoding = self.tokenizer(
                texts,
                padding=padding,
                padding_side=padding_side,
                truncation=truncation,
                max_length=max_length,
                return_token_type_ids=False,
                **kwargs,
            )
        finally:
            self.tokenizer.truncation_side = saved_side
        # lists of token ids per row (not padded with `padding=False`); tensors are made at the end
        data = dict(encoding)
        # Truncation (asked for, or the tokenizer's own with `max_length` alone) keeps the first `<image>` tokens of a
        # row, or the last ones when it truncates from the left: their images are kept, in order.
        for row, (ids, row_images) in enumerate(zip(data["input_ids"], image_rows, strict=True)):
            kept = list(ids).count(self.image_token_id)
            if kept < len(row_images) and truncation in (None, False, "do_not_truncate"):
                raise ValueError(
                    f"Text {row} has {len(row_images)} {IMAGE_TOKEN} tokens but the tokenizer encoded only {kept} of "
                    f"them as the {IMAGE_TOKEN} token (id {self.image_token_id})."
                )
            if kept < len(row_images):
                first = len(row_images) - kept if truncation_side == "left" else 0
                image_rows[row] = row_images[first : first + kept]
        max_images = max((len(r) for r in image_rows), default=0)
        if max_images:
            flat = [image for row in image_rows for image in row]
            processed = self.image_processor(flat, return_tensors=None, **images_kwargs)["pixel_values"]
            shapes = sorted({tuple(np.shape(image)) for image in processed})
            if len(shapes) > 1:
                raise ValueError(
                    f"The images come out of the image processor in different shapes {shapes}, but `pixel_values` "
                    "`(batch, num_images, 3, H, W)` holds one: keep `do_center_crop=True` (the resize sets the shorter "
                    "side only), or give images of one aspect ratio."
                )
            if not isinstance(processed, np.ndarray):
                processed = np.stack([np.asarray(image) for image in processed])
            pixels = torch.from_numpy(processed)
            pixel_values = pixels.new_zeros((len(texts), max_images, *pixels.shape[1:]))
            start = 0
            for row, row_images in enumerate(image_rows):
                pixel_values[row, : len(row_images)] = pixels[start : start + len(row_images)]
                start += len(row_images)
            data["pixel_values"] = pixel_values if return_tensors is not None else list(pixel_values.numpy())
        if return_labels:
            # The original masks the pad id; a pad that is the eos too (`tokenizer.pad_token = tokenizer.eos_token`)
            # would take every eos out of the loss. Padding itself is found by the attention mask (`_labels`).
            pad_id = self.tokenizer.pad_token_id
            if pad_id is not None and pad_id == self.tokenizer.eos_token_id:
                pad_id = None
            data["labels"] = [
                self._labels(torch.tensor(ids), torch.tensor(mask), pad_id, interleaved).tolist()
                for ids, mask in zip(data["input_ids"], data["attention_mask"], strict=True)
            ]
        if drop_mask:
            del data["attention_mask"]
        if return_tensors is not None and not any(len(ids) for ids in data["input_ids"]):
            # empty rows only: as the tokenizer's own tensors, integers (lists of empty lists would make floats)
            data.update({key: np.zeros((len(texts), 0), np.int64) for key in data if key != "pixel_values"})
        features = BatchFeature(data=data, tensor_type=return_tensors)
        if device is not None and "pixel_values" in features:
            features["pixel_values"] = features["pixel_values"].to(device)
        return features

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """`(image processor's, tokenizer's)` keyword arguments of a call; an unknown keyword is an error (the
        tokenizer would ignore it without a word)."""
        kwargs = dict(kwargs)
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        for name in list(kwargs):
            if name in IMAGE_KWARGS or name in ("input_data_format", "data_format", "device"):
                if name in images_kwargs and not _same(images_kwargs[name], kwargs[name]):
                    raise _given_twice(name, "images_kwargs")
                images_kwargs[name] = kwargs.pop(name)
            elif name in text_kwargs and not _same(text_kwargs[name], kwargs[name]):
                raise _given_twice(name, "text_kwargs")
        data_format = images_kwargs.get("data_format")
        if data_format is not None and _normalize_data_format(data_format, "data_format") != _CHANNELS_FIRST:
            raise ValueError(
                f"data_format={data_format!r} is not supported by OpenFlamingoProcessor: `pixel_values` is "
                "`(batch, num_images, 3, H, W)` (channels first), the layout the model takes; for channels-last "
                "pixels, call the image processor itself."
            )
        for group, group_kwargs in (("images_kwargs", images_kwargs), ("text_kwargs", text_kwargs)):
            if "return_tensors" in group_kwargs:
                raise ValueError(
                    f"`return_tensors` goes to the processor's call itself, not under `{group}`: it sets the type of "
                    "every output (input_ids, attention_mask, pixel_values, labels) at once."
                )
        text_kwargs.update(kwargs)
        # (not `modeling_openflamingo._parameters_of`: a relative import of the modeling file from here breaks
        # transformers 4.x's remote-code loading of a saved processor)
        tokenizer_call = inspect.signature(type(self.tokenizer).__call__).parameters
        known = {n for n, p in tokenizer_call.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        chat_template_options = {"sanitize_control_tokens", "return_text_replacement_offsets"}  # (transformers 5)
        known = (known | {"truncation_side", "split_special_tokens"} | chat_template_options) - {
            "self",
            "text",
            "return_tensors",
            "return_token_type_ids",
        }
        if not text_kwargs.get("return_token_type_ids", True):
            del text_kwargs["return_token_type_ids"]  # (never returned: the model takes none)
        for name, value in text_kwargs.items():
            if name in ("text_pair", "text_target", "text_pair_target", "is_split_into_words") and value:
                raise ValueError(f"OpenFlamingoProcessor takes `text` only (one string per row); got `{name}`.")
            if name == "return_token_type_ids":  # (only a true value is left here)
                raise ValueError(
                    "return_token_type_ids=True is not supported: OpenFlamingo's forward takes no token type ids, so "
                    "the processor never returns them."
                )
            if name == "return_overflowing_tokens" and value:
                raise ValueError(
                    "return_overflowing_tokens is not supported: the overflowing pieces of a row would have no images."
                )
            if name not in known:
                generation = hasattr(GenerationConfig(), name)
                # `generate` matches stop strings with a tokenizer it is given
                stop_strings_tokenizer = ", 'tokenizer': processor.tokenizer" if name == "stop_strings" else ""
                raise ValueError(
                    f"Unexpected keyword argument `{name}` for OpenFlamingoProcessor; it takes the image processor's "
                    f"options {[*IMAGE_KWARGS, 'input_data_format', 'device']} and the tokenizer's (e.g. "
                    "add_special_tokens, pad_to_multiple_of, truncation_side), flat or as `images_kwargs` / "
                    "`text_kwargs`."
                    + (
                        f" `{name}` is a generation option: pass it to `generate`, or to a pipeline as "
                        f"`generate_kwargs={{'{name}': ...{stop_strings_tokenizer}}}`."
                        if generation
                        else ""
                    )
                )
        return images_kwargs, text_kwargs

    def _labels(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int | None, interleaved: bool
    ) -> torch.Tensor:
        if interleaved:
            labels = interleaved_label_mask(input_ids, self.image_token_id, self.end_of_chunk_token_id, pad_id)
        else:
            labels = caption_label_mask(input_ids, self.image_token_id, pad_id)
        labels = labels.masked_fill(attention_mask == 0, -100)
        # a target only after a real token: not the first position (no token predicts it; transformers 4.x's Trainer
        # still counts it into `num_items_in_batch`), nor a left-padded row's first real token (the last padding
        # position, which attends to no real token, would "predict" it)
        labels[..., :1] = -100
        labels[..., 1:] = labels[..., 1:].masked_fill(attention_mask[..., :-1] == 0, -100)
        return labels

    @staticmethod
    def _image_rows(images: Any, image_counts: list[int], single_text: bool) -> list[list[Any]]:
        """Each text's images, from one list per text, or (for a batch of texts, as transformers' pipelines and other
        processors take them) one flat list of every text's images in order, split by the texts' `<image>` counts."""
        batch_size = len(image_counts)
        if images is None:
            return [[] for _ in range(batch_size)]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if single_text and not any(isinstance(i, (list, tuple)) for i in images):
            images = [images]
        flat = not any(isinstance(i, (list, tuple)) for i in images)
        per_text = flat and len(images) == batch_size and all(_is_image_batch(i) for i in images)
        if not single_text and flat and not per_text:
            # a flat list of images (4-D arrays among them stand for theirs), split by the texts' <image> counts; a
            # list of one 4-D array per text is each text's images
            flat_images = _each_image(images)
            if len(flat_images) != sum(image_counts):
                raise ValueError(
                    f"Got a flat list of {len(flat_images)} images for {batch_size} texts with {sum(image_counts)} "
                    f"{IMAGE_TOKEN} tokens in all ({', '.join(map(str, image_counts))}). Pass one image per "
                    f"{IMAGE_TOKEN} token, in order, or one list of images per text (an empty list for none)."
                )
            starts = [sum(image_counts[:row]) for row in range(batch_size)]
            return [flat_images[start : start + count] for start, count in zip(starts, image_counts, strict=True)]
        # a 4-D array or tensor alone stands for one text's images
        images = [list(row) if _is_image_batch(row) and not single_text else row for row in images]
        if not all(isinstance(row, (list, tuple)) for row in images):
            if single_text:
                raise ValueError(
                    "For one text, `images` must be its images (a list of images) or a list holding that one list; "
                    "got images and lists of images mixed."
                )
            raise ValueError(
                "For a batch of texts, `images` must hold one list of images per text (an empty list for none), or "
                "one flat list of every text's images in order; got images and lists of images mixed."
            )
        if len(images) != batch_size:
            raise ValueError(f"Got {batch_size} texts but {len(images)} lists of images.")
        return [_each_image(row) for row in images]

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """As `ProcessorMixin.save_pretrained`, with a tokenizer config that transformers 4.x and 5.x both read.

        transformers 5.x writes `"tokenizer_class": "TokenizersBackend"` and a list under `extra_special_tokens`;
        4.x knows neither. The tokenizer itself is in `tokenizer.json` either way, so the config is written in the
        names both majors understand (also in what `push_to_hub=True` uploads).
        """
        result = super().save_pretrained(save_directory, *args, **kwargs)
        _write_portable_tokenizer_config(save_directory)
        return result

    def _upload_modified_files(self, working_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        # `save_pretrained(..., push_to_hub=True)` uploads from inside `ProcessorMixin.save_pretrained`, before the
        # override above gets to rewrite the tokenizer config: rewritten here too, before the upload
        _write_portable_tokenizer_config(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Forwarded to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Forwarded to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str] | str:
        """Decode `generate`'s output, `(batch, seq)` (a list of strings) or `(seq,)` (a string), as `batch_decode`
        does, except that the clean-up of tokenization spaces (`" ." -> "."`) does not reach across a token that is
        whitespace only, such as a prompt's trailing space: the image-text-to-text pipeline takes the decoded prompt
        off the decoded sequence by string prefix, and `"Output: " + ","` cleaned as one string is `"Output:,"`, which
        would leave the prompt in the new text."""
        clean = kwargs.pop("clean_up_tokenization_spaces", None)
        if clean is None:
            clean = getattr(self.tokenizer, "clean_up_tokenization_spaces", False)
        rows = generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else list(generated_outputs)
        single = not rows or not isinstance(rows[0], (list, tuple))
        texts = []
        for row in [rows] if single else rows:
            row = list(row)
            raw = self.tokenizer.decode(
                row, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False, **kwargs
            )
            if not clean:
                texts.append(raw)
                continue
            # where each whitespace-only token ends in the raw text (by the length of the text up to it: a
            # sentencepiece tokenizer decodes a token differently alone than after others)
            cuts = [0]
            for end, token in enumerate(self.tokenizer.convert_ids_to_tokens(row), start=1):
                if isinstance(token, str) and token and token.translate(_WHITESPACE_OF_TOKEN_TEXT).isspace():
                    prefix = self.tokenizer.decode(
                        row[:end], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False, **kwargs
                    )
                    cuts.append(len(prefix))
            cuts.append(len(raw))
            texts.append("".join(self.tokenizer.clean_up_tokenization(raw[a:b]) for a, b in itertools.pairwise(cuts)))
        return texts[0] if single else texts


__all__ = ["OpenFlamingoProcessor", "add_openflamingo_tokens", "caption_label_mask", "interleaved_label_mask"]
