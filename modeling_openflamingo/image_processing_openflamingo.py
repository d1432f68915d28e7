"""Image processor reproducing the open_clip eval transform used by OpenFlamingo.

OpenFlamingo preprocesses images with ``open_clip.image_transform(image_size, is_train=False)`` (open_clip 2.20),
which is the torchvision pipeline::

    Resize(size, interpolation=BICUBIC)   # shorter side -> size, on the PIL image
    CenterCrop(size)
    _convert_to_rgb                       # image.convert("RGB"), AFTER resize/crop
    ToTensor()                            # uint8 -> float32 / 255
    Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

`OpenFlamingoImageProcessor` re-implements that pipeline with PIL + numpy only (torchvision is not required), with
the exact torchvision semantics (truncating long-side computation, rounded crop offsets, zero padding when the
image is smaller than the crop, float32 arithmetic), so that its output is bit-identical to open_clip's.

Notable consequences of following open_clip exactly (rather than transformers' CLIP processors):

* ``convert("RGB")`` happens after resizing, so a palette (``"P"``) image is resized with NEAREST (PIL cannot
  interpolate palettes), an ``"RGBA"`` image is resized with its (premultiplied) alpha and the alpha channel is then
  simply dropped (it is *not* composited on white), and ``"L"`` images are resized as grayscale.
* Resizing is PIL's ``Image.resize((w, h), BICUBIC)`` (PIL's antialiasing bicubic, no ``reducing_gap``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import urllib.request
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging

try:  # pragma: no cover - torch is a hard dependency of the model, but keep the processor usable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None


logger = logging.get_logger(__name__)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "OpenFlamingoImageProcessor",
    "UnsupportedImageInputError",
    "open_image",
]

# open_clip.constants.OPENAI_DATASET_MEAN / OPENAI_DATASET_STD
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_BICUBIC = int(Image.Resampling.BICUBIC)
_VALID_RESAMPLE = {int(r) for r in Image.Resampling}

# Number of channels of an array input -> PIL mode it is converted to.
_CHANNELS_TO_MODE = {1: "L", 3: "RGB", 4: "RGBA"}

_CHANNELS_FIRST = "channels_first"
_CHANNELS_LAST = "channels_last"

# Keyword arguments understood by `preprocess` to override the processor's attributes.
_OVERRIDABLE = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)

# Standard transformers image kwargs (`ImagesKwargs`) that a `ProcessorMixin` may forward to any image processor.
# They are accepted (and ignored, with a warning when not None) so that the processor composes with transformers
# processors; any other unknown keyword raises.
_STANDARD_IGNORED_KWARGS = {
    "crop_size",
    "default_to_square",
    "do_pad",
    "pad_size",
    "disable_grouping",
    "image_seq_length",
}
try:
    from transformers.processing_utils import ImagesKwargs as _ImagesKwargs
except ImportError:  # pragma: no cover - defensive: only used to widen the tolerated-kwargs set
    _ImagesKwargs = None
_STANDARD_IGNORED_KWARGS |= set(getattr(_ImagesKwargs, "__annotations__", {}))
_STANDARD_IGNORED_KWARGS -= set(_OVERRIDABLE) | {"return_tensors", "data_format", "input_data_format", "device"}


class UnsupportedImageInputError(ValueError, TypeError):
    """Raised for image inputs of an unsupported type (a `ValueError`, and also a `TypeError`)."""


# ----------------------------------------------------------------------------------------------------------------------
# torchvision-equivalent PIL operations
# ----------------------------------------------------------------------------------------------------------------------


def compute_resized_output_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of torchvision ``Resize(size)`` with an int ``size`` (shorter side -> ``size``).

    Mirrors ``torchvision.transforms.functional._compute_resized_output_size`` with ``max_size=None``: the long side
    is ``int(size * long / short)`` (truncated, not rounded). Square images (``width == height``) map to
    ``(size, size)``.

    Args:
        height: Input image height in pixels.
        width: Input image width in pixels.
        size: Target length of the shorter side.

    Returns:
        The ``(new_height, new_width)`` tuple.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def resize_shorter_side(image: Image.Image, size: int, resample: int = _PIL_BICUBIC) -> Image.Image:
    """Resize a PIL image exactly like torchvision ``Resize(size, interpolation)`` does for PIL inputs.

    torchvision returns the image untouched when the size does not change and otherwise calls
    ``image.resize((w, h), resample)`` (no ``reducing_gap``; PIL itself falls back to NEAREST for ``"P"``/``"1"``
    images and resizes ``"RGBA"``/``"LA"`` with premultiplied alpha).

    Args:
        image: Input PIL image (any mode PIL can resize).
        size: Target length of the shorter side.
        resample: PIL resampling filter (default bicubic).

    Returns:
        The resized PIL image.
    """
    width, height = image.size
    new_h, new_w = compute_resized_output_size(height, width, size)
    if (new_h, new_w) == (height, width):
        return image
    return image.resize((new_w, new_h), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Center-crop a PIL image to ``size x size`` exactly like torchvision ``CenterCrop(size)`` for PIL inputs.

    The crop offsets are ``int(round((dim - size) / 2.0))``. If the image is smaller than the crop along a dimension,
    it is first zero-padded (left/top get ``(size - dim) // 2``, right/bottom get ``(size - dim + 1) // 2``), as
    torchvision does.

    Args:
        image: Input PIL image.
        size: Side of the square crop.

    Returns:
        The cropped PIL image of size ``(size, size)``.
    """
    width, height = image.size
    if size > width or size > height:
        padding = (
            (size - width) // 2 if size > width else 0,
            (size - height) // 2 if size > height else 0,
            (size - width + 1) // 2 if size > width else 0,
            (size - height + 1) // 2 if size > height else 0,
        )
        num_bands = len(image.getbands())
        fill: int | tuple[int, ...] = 0 if num_bands == 1 else (0,) * num_bands
        if image.mode == "P":
            palette = image.getpalette()
            image = ImageOps.expand(image, border=padding, fill=fill)
            image.putpalette(palette)
        else:
            image = ImageOps.expand(image, border=padding, fill=fill)
        width, height = image.size
        if size == width and size == height:
            return image
    # torchvision: int(round(...)); Python 3 `round` of a float already returns an int (banker's rounding).
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------------------------------


def _is_torch_tensor(obj: Any) -> bool:
    return torch is not None and isinstance(obj, torch.Tensor)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert an image array to uint8 (float arrays must lie in [0, 1], integer arrays in [0, 255])."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise ValueError("Boolean image arrays are not supported; pass uint8 in [0, 255] or float in [0, 1].")
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
        if array.size and not np.isfinite(array).all():
            raise ValueError("Float image array contains NaN or infinite values.")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(
                "Float image arrays must have values in [0, 1] (got range "
                f"[{float(array.min())!r}, {float(array.max())!r}]). Pass uint8 images, or float images scaled to "
                "[0, 1] (not already normalized)."
            )
        # Round (rather than truncate) so that `uint8 / 255` float inputs map back to the exact same uint8 values.
        return np.rint(array * np.float32(255.0)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"Integer image arrays must have values in [0, 255] (got range [{array.min()}, {array.max()}])."
            )
        return array.astype(np.uint8)
    raise ValueError(f"Unsupported image array dtype {array.dtype}; expected uint8, another integer type or float.")


def _ambiguous_channels_first(shape: tuple[int, ...], prefer_channels_first: bool) -> bool:
    """Whether a 3-D image array of `shape`, whose first and last dimensions could both be its channels, is CHW.

    The more likely channel count decides (3, then 4, then 1): `(3, 1, 1)` is a 1 x 1 RGB image, not a 3 x 1
    grayscale one, and `(4, 7, 3)` a 4 x 7 RGB image. Equal counts (`(3, H, 3)`, `(1, H, 1)`) keep the input type's
    convention, `prefer_channels_first` (torch: CHW, numpy: HWC), with a warning.
    """
    rank = {3: 0, 4: 1, 1: 2}
    first, last = rank[shape[0]], rank[shape[-1]]
    if first != last:
        channels_first = first < last
    else:
        channels_first = prefer_channels_first
    logger.warning_once(
        f"The channel dimension of an image array of shape {tuple(shape)} is ambiguous; taken as "
        f"{'channels_first (CHW)' if channels_first else 'channels_last (HWC)'}. Pass `input_data_format` to say which."
    )
    return channels_first


def _array_to_pil(array: np.ndarray, input_data_format: str | None, prefer_channels_first: bool) -> Image.Image:
    """Convert a single HW, HWC or CHW image array to a PIL image (``"L"``, ``"RGB"`` or ``"RGBA"``)."""
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ValueError(
            f"Image arrays must have 2 (HW) or 3 (HWC / CHW) dimensions, or 4 for a batch; got shape {array.shape}."
        )
    else:
        if input_data_format is None:
            first_ok = array.shape[0] in _CHANNELS_TO_MODE
            last_ok = array.shape[-1] in _CHANNELS_TO_MODE
            if first_ok and last_ok:
                channels_first = _ambiguous_channels_first(array.shape, prefer_channels_first)
            elif first_ok or last_ok:
                channels_first = first_ok
            else:
                raise ValueError(
                    f"Cannot infer the channel dimension of image array with shape {array.shape}: expected 1, 3 or 4 "
                    "channels in the first (CHW) or last (HWC) dimension."
                )
        else:
            channels_first = _normalize_data_format(input_data_format, "input_data_format") == _CHANNELS_FIRST
        if channels_first:
            array = np.transpose(array, (1, 2, 0))
        if array.shape[-1] not in _CHANNELS_TO_MODE:
            raise ValueError(
                f"Image arrays must have 1, 3 or 4 channels; got {array.shape[-1]} channels (shape {array.shape}, "
                f"{'channels_first' if channels_first else 'channels_last'})."
            )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"Image has an empty spatial dimension (height x width = {array.shape[0]} x {array.shape[1]})."
        )
    array = np.ascontiguousarray(_to_uint8(array))
    if array.shape[-1] == 1:
        array = array[:, :, 0]
    # uint8 HW -> "L", HWx3 -> "RGB", HWx4 -> "RGBA" (inferred by PIL; the `mode` argument is deprecated).
    return Image.fromarray(array)


def _normalize_data_format(value: Any, name: str) -> str:
    """Normalize a channel-dimension format (str or transformers ``ChannelDimension``) to a canonical string."""
    value = getattr(value, "value", value)
    if value in (_CHANNELS_FIRST, "first", "CHW", "chw"):
        return _CHANNELS_FIRST
    if value in (_CHANNELS_LAST, "last", "HWC", "hwc"):
        return _CHANNELS_LAST
    raise ValueError(f"`{name}` must be 'channels_first' or 'channels_last', got {value!r}.")


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """An image given as a file path, an http(s) URL, base64 data (a `data:image/...;base64,` URI or bare) or encoded
    bytes (as transformers' chat messages give them: `{"type": "image", "path" | "url" | "base64": ...}`), opened as it
    is stored: no RGB conversion or EXIF turn here, so that the transform reads it as the original's pipelines read
    `PIL.Image.open(...)` (transformers' `load_image` converts to RGB first, which changes palette and grayscale
    images' resizing)."""
    if isinstance(source, bytes):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                fetched = response.read()
        except OSError as error:
            raise OSError(f"Could not fetch the image at {source}: {error}") from error
        image = Image.open(io.BytesIO(fetched))
    elif isinstance(source, str) and not os.path.exists(source):
        data_uri = source.startswith("data:image/")
        encoded = source.partition(",")[2] if data_uri else source
        # without line breaks: MIME base64 (`base64.encodebytes`, many tools) breaks lines, which transformers'
        # `load_image` reads too
        encoded = "".join(encoded.split())
        try:
            image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        except (binascii.Error, ValueError, UnidentifiedImageError):  # (a short name may be valid base64)
            if data_uri:
                raise ValueError(
                    f"Cannot read an image from the data URI {source[:100]!r}: no base64 image data follows "
                    "'data:image/...;base64,'."
                ) from None
            raise FileNotFoundError(
                f"Cannot read an image from {source[:100]!r}: no such file, and not an http(s) URL or base64 image "
                "data."
            ) from None
    else:
        image = Image.open(source)
    image.load()
    return image


def _flatten_images(images: Any, input_data_format: str | None) -> list[tuple[Image.Image, bool]]:
    """Flatten the supported input structures into a list of PIL images, each with whether it was given as a float
    array (in [0, 1]; its PIL image holds it times 255)."""
    if isinstance(images, Image.Image):
        return [(images, False)]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("Got an empty list of images.")
        flat: list[tuple[Image.Image, bool]] = []
        for item in images:
            if isinstance(item, (list, tuple)) and len(item) == 0:
                raise ValueError("Got an empty nested list of images.")
            flat.extend(_flatten_images(item, input_data_format))
        return flat
    if _is_torch_tensor(images):
        tensor = images.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor = tensor.float()  # bfloat16 has no numpy equivalent
        return _flatten_array(tensor.numpy(), input_data_format, prefer_channels_first=True)
    if isinstance(images, np.ndarray):
        return _flatten_array(images, input_data_format, prefer_channels_first=False)
    if isinstance(images, (str, bytes, os.PathLike)):
        return [(open_image(images), False)]
    raise UnsupportedImageInputError(
        f"Unsupported image input of type {type(images).__module__}.{type(images).__name__}: expected a "
        "PIL.Image.Image, a numpy array, a torch.Tensor, a path or URL, or a (nested) list of those."
    )


def _flatten_array(
    array: np.ndarray, input_data_format: str | None, prefer_channels_first: bool
) -> list[tuple[Image.Image, bool]]:
    is_float = bool(np.issubdtype(array.dtype, np.floating))
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise ValueError(f"Got an empty batch of images (shape {array.shape}).")
        return [(_array_to_pil(a, input_data_format, prefer_channels_first), is_float) for a in array]
    return [(_array_to_pil(array, input_data_format, prefer_channels_first), is_float)]


def _normalize_size(size: Any) -> int:
    """Normalize ``size`` (int, ``{"shortest_edge": n}`` or square ``{"height": n, "width": n}``) to an int."""
    if isinstance(size, dict):
        if set(size) == {"shortest_edge"}:
            size = size["shortest_edge"]
        elif set(size) == {"height", "width"} and size["height"] == size["width"]:
            size = size["height"]
        else:
            raise ValueError(
                "`size` must be an int, {'shortest_edge': n} or a square {'height': n, 'width': n} (the open_clip "
                f"transform resizes the shorter side to n and center-crops n x n); got {size!r}."
            )
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"`size` must be a positive int, got {size!r}.")
    return int(size)


def _normalize_stats(values: Any, name: str) -> tuple[float, ...]:
    """Normalize ``image_mean``/``image_std`` to a 3-tuple of floats."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (float(values),) * 3
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a float or a sequence of 3 floats, got {values!r}.") from err
    if len(values) != 3:
        raise ValueError(f"`{name}` must have 3 values (one per RGB channel), got {len(values)}: {values!r}.")
    return values


def _normalize_resample(resample: Any) -> int:
    try:
        value = int(resample)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`resample` must be a PIL resampling filter (int), got {resample!r}.") from err
    if value not in _VALID_RESAMPLE:
        raise ValueError(
            f"`resample` must be one of the PIL resampling filters {sorted(_VALID_RESAMPLE)}, got {value}."
        )
    return value


def _rescale(array: np.ndarray, rescale_factor: float) -> np.ndarray:
    """``array * rescale_factor`` in float32, as a division when the factor is ``1 / integer`` (exact ToTensor)."""
    inverse = 1.0 / rescale_factor
    if abs(inverse - round(inverse)) < 1e-6 * max(1.0, abs(inverse)):
        # torchvision ToTensor computes `x.float().div(255)`; dividing (not multiplying by 1/255) is bit-identical.
        return array / np.float32(round(inverse))
    return array * np.float32(rescale_factor)


# ----------------------------------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------------------------------


class OpenFlamingoImageProcessor(BaseImageProcessor):
    r"""Image processor reproducing OpenFlamingo's open_clip eval transform bit-exactly (PIL + numpy).

    Pipeline (each step can be disabled): resize the shorter side to ``size`` with PIL bicubic (torchvision
    semantics), center-crop ``size x size``, ``convert("RGB")``, scale to [0, 1] (``/ 255``) and normalize with the
    OpenAI CLIP mean/std. The RGB conversion happens *after* resize/crop, like open_clip.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the shorter side of the image to `size`.
        size (`int`, *optional*, defaults to 224):
            Shorter-side length for the resize and side of the square center crop. A `{"shortest_edge": n}` dict is
            also accepted and stored as `n`.
        resample (`int`, *optional*, defaults to `PIL.Image.BICUBIC`):
            PIL resampling filter used for the resize.
        do_center_crop (`bool`, *optional*, defaults to `True`):
            Whether to center-crop to `size x size` (zero-padding images smaller than the crop, like torchvision).
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the uint8 pixel values by `rescale_factor`. Without it, an image given as a float
            array (in [0, 1]) keeps that scale, as transformers' image processors keep an image already scaled.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Rescale factor. When it is `1/k` for an integer `k`, pixels are divided by `k` (bit-exact ToTensor).
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalize with `image_mean` / `image_std`.
        image_mean (`float` or `list[float]`, *optional*, defaults to OpenAI CLIP mean):
            Per-channel mean.
        image_std (`float` or `list[float]`, *optional*, defaults to OpenAI CLIP std):
            Per-channel standard deviation.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to `convert("RGB")` the image (after resize/crop). When `False`, images must already be RGB.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    def __init__(
        self,
        do_resize: bool = True,
        size: int | dict[str, int] = 224,
        resample: int = _PIL_BICUBIC,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = bool(do_resize)
        self.size = _normalize_size(size)
        self.resample = _normalize_resample(resample)
        self.do_center_crop = bool(do_center_crop)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = list(_normalize_stats(OPENAI_CLIP_MEAN if image_mean is None else image_mean, "image_mean"))
        self.image_std = list(_normalize_stats(OPENAI_CLIP_STD if image_std is None else image_std, "image_std"))
        self.do_convert_rgb = bool(do_convert_rgb)

    def __call__(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Preprocess an image or a batch of images; see [`~OpenFlamingoImageProcessor.preprocess`]."""
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess_image(
        self,
        image: Image.Image,
        do_resize: bool | None = None,
        size: int | dict[str, int] | None = None,
        resample: int | None = None,
        do_center_crop: bool | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
    ) -> np.ndarray:
        """Apply the open_clip eval transform to a single PIL image.

        Args:
            image: The PIL image (any mode; resized in its own mode, converted to RGB afterwards).
            do_resize: Override of the ``do_resize`` attribute (``None`` keeps the attribute, likewise below).
            size: Override of ``size``.
            resample: Override of ``resample``.
            do_center_crop: Override of ``do_center_crop``.
            do_rescale: Override of ``do_rescale``.
            rescale_factor: Override of ``rescale_factor``.
            do_normalize: Override of ``do_normalize``.
            image_mean: Override of ``image_mean``.
            image_std: Override of ``image_std``.
            do_convert_rgb: Override of ``do_convert_rgb``.

        Returns:
            A float32 array of shape ``(3, H, W)`` (``(3, size, size)`` with the default settings).
        """
        if not isinstance(image, Image.Image):
            raise UnsupportedImageInputError(
                f"`preprocess_image` expects a PIL.Image.Image, got {type(image).__name__}."
            )
        opts = self._resolve_options(
            do_resize=do_resize,
            size=size,
            resample=resample,
            do_center_crop=do_center_crop,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            do_convert_rgb=do_convert_rgb,
        )
        return self._transform(image, **opts)

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Preprocess images with the open_clip eval transform.

        Args:
            images: A `PIL.Image.Image`, a numpy array or torch tensor (``HW``, ``HWC`` or ``CHW`` for one image,
                ``NHWC``/``NCHW`` for a batch; uint8 in [0, 255], other integer types in [0, 255] or floats in
                [0, 1], which are rounded to uint8 first), or a (possibly nested) list of those. Array inputs must have
                1, 3 or 4 channels (converted to PIL ``"L"``, ``"RGB"`` or ``"RGBA"``). When both the first and last
                dimension could be channels and ``input_data_format`` is not given, the more likely count decides (3,
                then 4, then 1: ``(3, 1, 1)`` is a 1 x 1 RGB image), and for equal counts numpy arrays are taken as
                channels-last and torch tensors as channels-first; either way with a warning.
            return_tensors: ``None`` or ``"np"`` for numpy arrays, ``"pt"`` for torch tensors.
            **kwargs: Per-call overrides of the processor attributes (``do_resize``, ``size``, ``resample``,
                ``do_center_crop``, ``do_rescale``, ``rescale_factor``, ``do_normalize``, ``image_mean``,
                ``image_std``, ``do_convert_rgb``), plus ``data_format`` (``"channels_first"`` (default) or
                ``"channels_last"`` output), ``input_data_format`` (layout of array inputs) and ``device`` (for
                ``"pt"`` outputs). Other standard transformers image kwargs are ignored with a warning; unknown
                keywords raise a `ValueError`.

        Returns:
            A `BatchFeature` with ``pixel_values`` of shape ``(N, 3, size, size)`` (float32). If center cropping is
            disabled and the images end up with different shapes, ``pixel_values`` is a list of arrays (and
            ``return_tensors`` must be ``None``).
        """
        data_format = kwargs.pop("data_format", None)
        input_data_format = kwargs.pop("input_data_format", None)
        device = kwargs.pop("device", None)
        overrides = {name: kwargs.pop(name) for name in _OVERRIDABLE if name in kwargs}
        for name, value in kwargs.items():
            if name not in _STANDARD_IGNORED_KWARGS:
                raise ValueError(
                    f"Unexpected keyword argument `{name}` for {type(self).__name__}.preprocess; supported overrides "
                    f"are {list(_OVERRIDABLE)} plus return_tensors, data_format, input_data_format and device."
                )
            if value is not None:
                logger.warning_once(f"{type(self).__name__} ignores the `{name}` argument (got {value!r}).")

        data_format = _CHANNELS_FIRST if data_format is None else _normalize_data_format(data_format, "data_format")
        return_tensors = getattr(return_tensors, "value", return_tensors)
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"`return_tensors` must be None, 'np' or 'pt', got {return_tensors!r}.")
        if return_tensors == "pt" and torch is None:  # pragma: no cover
            raise ValueError("`return_tensors='pt'` requires torch to be installed.")

        opts = self._resolve_options(**overrides)
        pil_images = _flatten_images(images, input_data_format)
        arrays = [self._transform(image, **opts, from_float=from_float) for image, from_float in pil_images]
        if data_format == _CHANNELS_LAST:
            arrays = [np.ascontiguousarray(a.transpose(1, 2, 0)) for a in arrays]

        if all(a.shape == arrays[0].shape for a in arrays):
            pixel_values: Any = np.stack(arrays, axis=0)
        elif return_tensors is None:
            pixel_values = arrays
        else:
            shapes = sorted({a.shape for a in arrays})
            raise ValueError(
                f"Cannot batch images of different shapes {shapes} into a tensor; keep `do_center_crop=True` or use "
                "`return_tensors=None`."
            )

        if return_tensors == "pt":
            tensor = torch.from_numpy(pixel_values)
            if device is not None:
                tensor = tensor.to(device)
            return BatchFeature(data={"pixel_values": tensor})
        return BatchFeature(data={"pixel_values": pixel_values})

    # ------------------------------------------------------------------------------------------------------------------

    def _resolve_options(self, **overrides: Any) -> dict[str, Any]:
        """Merge per-call overrides with the attributes and validate them."""
        opts = {name: getattr(self, name) if overrides.get(name) is None else overrides[name] for name in _OVERRIDABLE}
        opts["size"] = _normalize_size(opts["size"])
        opts["resample"] = _normalize_resample(opts["resample"])
        opts["image_mean"] = _normalize_stats(opts["image_mean"], "image_mean")
        opts["image_std"] = _normalize_stats(opts["image_std"], "image_std")
        rescale_factor = opts["rescale_factor"]
        if isinstance(rescale_factor, bool) or not isinstance(rescale_factor, (int, float)) or not rescale_factor > 0:
            raise ValueError(f"`rescale_factor` must be a positive float, got {rescale_factor!r}.")
        if not all(math.isfinite(s) and s != 0 for s in opts["image_std"]):
            raise ValueError(f"`image_std` must be finite and non-zero, got {opts['image_std']!r}.")
        return opts

    @staticmethod
    def _transform(
        image: Image.Image,
        do_resize: bool,
        size: int,
        resample: int,
        do_center_crop: bool,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        do_convert_rgb: bool,
        from_float: bool = False,
    ) -> np.ndarray:
        """The transform of one PIL image; `from_float`: it was given as a float array in [0, 1] (and made a uint8
        image by x 255): without `do_rescale` its values are given back in [0, 1], the scale they came in, as
        transformers' image processors leave an image already scaled to [0, 1] with `do_rescale=False`."""
        if image.width == 0 or image.height == 0:
            raise ValueError(f"Image has an empty spatial dimension (size {image.size}).")
        if do_resize:
            image = resize_shorter_side(image, size, resample)
        if do_center_crop:
            image = center_crop(image, size)
        if do_convert_rgb:
            if image.mode != "RGB":
                try:
                    image = image.convert("RGB")
                except ValueError as err:
                    raise ValueError(f"Cannot convert PIL image of mode {image.mode!r} to RGB: {err}") from err
        elif image.mode != "RGB":
            raise ValueError(
                f"`do_convert_rgb=False` requires RGB images, got a PIL image of mode {image.mode!r}; "
                "set `do_convert_rgb=True`."
            )
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3), like ToTensor before the permute
        array = array.astype(np.float32)
        if do_rescale:
            array = _rescale(array, rescale_factor)
        elif from_float:
            array = _rescale(array, 1 / 255)
        if do_normalize:
            # torchvision Normalize: (x - mean) / std with float32 mean/std tensors.
            array = (array - np.asarray(image_mean, dtype=np.float32)) / np.asarray(image_std, dtype=np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
