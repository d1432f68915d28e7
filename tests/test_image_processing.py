"""Tests for `OpenFlamingoImageProcessor` (open_clip 2.20 eval transform parity, inputs, save/load, errors).

Golden fixtures were produced with the real open_clip 2.20 + torchvision:

* ``fixtures/processor``: ``image_transform(224, is_train=False)`` -> ``processor.safetensors["pixel_values_224"]``.
* ``fixtures/tiny_images``: the same transform at size 32 -> ``pixel_values.safetensors["pixel_values"]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from transformers import BatchFeature

from modeling_openflamingo.image_processing_openflamingo import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    OpenFlamingoImageProcessor,
    center_crop,
    compute_resized_output_size,
)

FIXTURES = Path(__file__).parent / "fixtures"
NUM_IMAGES = 6
# (fixture dir, safetensors file, key, size)
GOLDEN = {
    224: ("processor", "processor.safetensors", "pixel_values_224"),
    32: ("tiny_images", "pixel_values.safetensors", "pixel_values"),
}
EXPECTED_MODES = ["RGB", "RGBA", "L", "RGB", "P", "RGB"]
# Exact-to-float-rounding target; the brief's acceptance bound is 1e-4 (one uint8 step is ~1.4e-2 after normalize).
ATOL = 1e-6


def _load_images(size: int) -> list[Image.Image]:
    folder = FIXTURES / GOLDEN[size][0]
    images = []
    for i in range(NUM_IMAGES):
        with Image.open(folder / f"image_{i}.png") as im:
            im.load()
            images.append(im)
    return images


def _load_golden(size: int) -> np.ndarray:
    folder, filename, key = GOLDEN[size]
    return load_file(str(FIXTURES / folder / filename))[key]


def _normalize_rgb(image: Image.Image) -> np.ndarray:
    """ToTensor + Normalize (float32, division like torchvision) of an RGB PIL image -> (3, H, W)."""
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


def _reference_resize_crop(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Independent re-statement of torchvision Resize(size) + CenterCrop(size) on a PIL image (no padding case)."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@pytest.fixture(scope="module")
def processor_224() -> OpenFlamingoImageProcessor:
    return OpenFlamingoImageProcessor()


@pytest.fixture(scope="module")
def processor_32() -> OpenFlamingoImageProcessor:
    return OpenFlamingoImageProcessor(size=32)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with open_clip
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 32])
def test_fixture_modes(size: int) -> None:
    images = _load_images(size)
    assert [im.mode for im in images] == EXPECTED_MODES
    assert _load_golden(size).shape == (NUM_IMAGES, 3, size, size)


@pytest.mark.parametrize("index", range(NUM_IMAGES))
@pytest.mark.parametrize("size", [224, 32])
def test_parity_per_image(size: int, index: int) -> None:
    processor = OpenFlamingoImageProcessor(size=size)
    image = _load_images(size)[index]
    golden = _load_golden(size)[index]
    out = processor(image)["pixel_values"]
    assert isinstance(out, np.ndarray)
    assert out.shape == (1, 3, size, size)
    assert out.dtype == np.float32
    diff = float(np.abs(out[0] - golden).max())
    assert diff <= ATOL, f"size={size} image_{index} ({image.mode} {image.size}): max abs diff {diff}"


@pytest.mark.parametrize("size", [224, 32])
def test_parity_batch(size: int) -> None:
    processor = OpenFlamingoImageProcessor(size=size)
    out = processor(_load_images(size), return_tensors="pt")
    assert isinstance(out, BatchFeature)
    pixel_values = out["pixel_values"]
    assert isinstance(pixel_values, torch.Tensor)
    assert pixel_values.shape == (NUM_IMAGES, 3, size, size)
    assert pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values, torch.from_numpy(_load_golden(size)), atol=ATOL, rtol=0)


def test_size_is_configurable_per_call(processor_224: OpenFlamingoImageProcessor) -> None:
    out = processor_224(_load_images(32), size=32)["pixel_values"]
    np.testing.assert_allclose(out, _load_golden(32), atol=ATOL, rtol=0)
    assert processor_224.size == 224  # per-call override does not mutate the processor


def test_default_config_matches_open_clip_vit_l14() -> None:
    processor = OpenFlamingoImageProcessor()
    assert processor.size == 224
    assert processor.resample == int(Image.Resampling.BICUBIC)
    assert processor.image_mean == list(OPENAI_CLIP_MEAN)
    assert processor.image_std == list(OPENAI_CLIP_STD)
    assert processor.do_resize and processor.do_center_crop and processor.do_rescale and processor.do_normalize
    assert processor.do_convert_rgb
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert processor.model_input_names == ["pixel_values"]


# ----------------------------------------------------------------------------------------------------------------------
# Mode handling (convert("RGB") after resize/crop)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 32])
def test_rgba_alpha_is_dropped_not_composited_on_white(size: int) -> None:
    processor = OpenFlamingoImageProcessor(size=size)
    image = _load_images(size)[1]
    assert image.mode == "RGBA"
    assert np.asarray(image)[..., 3].max() < 255  # every pixel is (semi-)transparent: compositing would matter
    golden = _load_golden(size)[1]

    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    composited = Image.alpha_composite(white, image).convert("RGB")
    composited_out = processor(composited)["pixel_values"][0]
    assert np.abs(composited_out - golden).max() > 0.1  # compositing on white would break parity

    out = processor(image)["pixel_values"][0]
    expected = _normalize_rgb(_reference_resize_crop(image, size).convert("RGB"))
    np.testing.assert_array_equal(out, expected)


def test_rgba_synthetic_keeps_color_of_transparent_pixels(processor_32: OpenFlamingoImageProcessor) -> None:
    # No resize needed (already 32x32): the alpha channel is just dropped, so fully transparent red stays red.
    image = Image.new("RGBA", (32, 32), (200, 10, 10, 0))
    out = processor_32(image)["pixel_values"][0]
    np.testing.assert_array_equal(out, _normalize_rgb(Image.new("RGB", (32, 32), (200, 10, 10))))


@pytest.mark.parametrize("size", [224, 32])
def test_palette_image_resized_with_nearest_before_rgb_conversion(size: int) -> None:
    processor = OpenFlamingoImageProcessor(size=size)
    image = _load_images(size)[4]
    assert image.mode == "P"
    out = processor(image)["pixel_values"][0]

    # open_clip resizes the palette image itself; PIL can only do that with NEAREST.
    nearest = _normalize_rgb(_reference_resize_crop(image, size, Image.NEAREST).convert("RGB"))
    np.testing.assert_array_equal(out, nearest)
    # Converting to RGB first (then bicubic) gives a different result.
    rgb_first = _normalize_rgb(_reference_resize_crop(image.convert("RGB"), size).convert("RGB"))
    assert np.abs(out - rgb_first).max() > 0.1


def test_grayscale_image_resized_as_l(processor_224: OpenFlamingoImageProcessor) -> None:
    image = _load_images(224)[2]
    assert image.mode == "L"
    out = processor_224(image)["pixel_values"][0]
    np.testing.assert_array_equal(out, _normalize_rgb(_reference_resize_crop(image, 224).convert("RGB")))
    # all three channels carry the same gray value
    gray = np.rint(
        (out * np.asarray(OPENAI_CLIP_STD)[:, None, None] + np.asarray(OPENAI_CLIP_MEAN)[:, None, None]) * 255
    )
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[1], gray[2])


@pytest.mark.parametrize("mode", ["1", "LA", "I", "I;16", "F", "CMYK", "YCbCr", "RGBX", "PA"])
def test_other_modes_follow_pil(processor_32: OpenFlamingoImageProcessor, mode: str) -> None:
    image = _load_images(32)[0].convert(mode)
    out = processor_32(image)["pixel_values"]
    assert out.shape == (1, 3, 32, 32)
    expected = _normalize_rgb(_reference_resize_crop(image, 32).convert("RGB"))
    np.testing.assert_array_equal(out[0], expected)


# ----------------------------------------------------------------------------------------------------------------------
# torchvision geometry
# ----------------------------------------------------------------------------------------------------------------------


def test_compute_resized_output_size_truncates() -> None:
    # (h, w, size) -> (new_h, new_w); long side is int(size * long / short)
    assert compute_resized_output_size(31, 33, 224) == (224, 238)  # 224 * 33 / 31 = 238.45
    assert compute_resized_output_size(30, 40, 224) == (224, 298)  # 298.67 -> 298 (not rounded to 299)
    assert compute_resized_output_size(80, 50, 32) == (51, 32)  # 51.2
    assert compute_resized_output_size(45, 90, 32) == (32, 64)
    assert compute_resized_output_size(64, 64, 224) == (224, 224)


def test_center_crop_offsets_and_padding() -> None:
    arr = np.arange(5 * 6, dtype=np.uint8).reshape(5, 6)  # h=5, w=6
    cropped = np.asarray(center_crop(Image.fromarray(arr), 3))
    # top = round(2 / 2) = 1, left = round(3 / 2) = round(1.5) = 2 (banker's rounding, like torchvision)
    np.testing.assert_array_equal(cropped, arr[1:4, 2:5])

    small = Image.fromarray(np.full((2, 3), 7, dtype=np.uint8))
    padded = np.asarray(center_crop(small, 6))
    assert padded.shape == (6, 6)
    # left pad (6 - 3) // 2 = 1, top pad (6 - 2) // 2 = 2, zeros elsewhere
    expected = np.zeros((6, 6), dtype=np.uint8)
    expected[2:4, 1:4] = 7
    np.testing.assert_array_equal(padded, expected)


def test_no_resize_pads_small_images() -> None:
    processor = OpenFlamingoImageProcessor(size=8, do_resize=False)
    image = Image.new("RGB", (4, 6), (255, 255, 255))
    out = processor(image)["pixel_values"]
    assert out.shape == (1, 3, 8, 8)
    zero = (-np.asarray(OPENAI_CLIP_MEAN) / np.asarray(OPENAI_CLIP_STD)).astype(np.float32)
    np.testing.assert_allclose(out[0, :, 0, 0], zero, rtol=0, atol=1e-6)


def test_no_center_crop_keeps_aspect_ratio() -> None:
    processor = OpenFlamingoImageProcessor(size=32, do_center_crop=False)
    images = _load_images(32)
    out = processor(images[0])["pixel_values"]
    assert out.shape == (1, 3, 32, 42)  # 40x30 -> int(32 * 40 / 30) = 42
    mixed = processor(images[:3])["pixel_values"]  # different shapes -> list
    assert isinstance(mixed, list) and [a.shape for a in mixed] == [(3, 32, 42), (3, 32, 32), (3, 51, 32)]
    with pytest.raises(ValueError, match="different shapes"):
        processor(images[:3], return_tensors="pt")


def test_disabled_steps() -> None:
    image = _load_images(32)[0]
    raw = OpenFlamingoImageProcessor(size=32, do_rescale=False, do_normalize=False)(image)["pixel_values"][0]
    expected = np.asarray(_reference_resize_crop(image, 32).convert("RGB")).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(raw, expected)
    scaled = OpenFlamingoImageProcessor(size=32, do_normalize=False)(image)["pixel_values"][0]
    np.testing.assert_array_equal(scaled, expected / np.float32(255))


def test_channels_last_output(processor_32: OpenFlamingoImageProcessor) -> None:
    images = _load_images(32)
    out = processor_32(images, data_format="channels_last")["pixel_values"]
    np.testing.assert_array_equal(out, _load_golden(32).transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------------------------------
# numpy / torch inputs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2, 3, 5])  # RGB, RGBA, L, RGB, RGB (a "P" image has no array equivalent)
def test_numpy_and_torch_inputs_match_pil(processor_32: OpenFlamingoImageProcessor, index: int) -> None:
    image = _load_images(32)[index]
    golden = _load_golden(32)[index]
    hwc = np.array(image)  # (H, W) for L, (H, W, C) otherwise
    chw = hwc[None] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)
    inputs = {
        "numpy uint8 HWC": hwc,
        "numpy uint8 CHW": np.ascontiguousarray(chw),
        "numpy float HWC": hwc.astype(np.float32) / 255,
        "numpy int64 HWC": hwc.astype(np.int64),
        "torch uint8 CHW": torch.from_numpy(np.ascontiguousarray(chw)),
        "torch float CHW": torch.from_numpy(np.ascontiguousarray(chw)).float() / 255,
        "torch float64 CHW": torch.from_numpy(np.ascontiguousarray(chw)).double() / 255,
    }
    for name, value in inputs.items():
        out = processor_32(value)["pixel_values"]
        assert out.shape == (1, 3, 32, 32), name
        diff = float(np.abs(out[0] - golden).max())
        assert diff <= ATOL, f"{name}: max abs diff {diff}"


def test_batched_arrays(processor_32: OpenFlamingoImageProcessor) -> None:
    images = [_load_images(32)[i] for i in (0, 3)]  # both RGB but different sizes -> use list of arrays
    golden = _load_golden(32)[[0, 3]]
    out = processor_32([np.asarray(im) for im in images])["pixel_values"]
    np.testing.assert_allclose(out, golden, atol=ATOL, rtol=0)

    square = _load_images(32)[5]  # 32x32 RGB
    batch_nhwc = np.stack([np.asarray(square)] * 2)
    batch_nchw = torch.from_numpy(batch_nhwc).permute(0, 3, 1, 2)
    for batch in (batch_nhwc, batch_nchw):
        out = processor_32(batch)["pixel_values"]
        assert out.shape == (2, 3, 32, 32)
        np.testing.assert_allclose(out, np.stack([_load_golden(32)[5]] * 2), atol=ATOL, rtol=0)

    nested = processor_32([[images[0]], [images[1], square]])["pixel_values"]
    assert nested.shape == (3, 3, 32, 32)


def test_ambiguous_layout_defaults_and_override(processor_32: OpenFlamingoImageProcessor) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(3, 5, 3), dtype=np.uint8)  # could be CHW or HWC
    as_hwc = processor_32(Image.fromarray(arr))["pixel_values"]
    as_chw = processor_32(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0))))["pixel_values"]
    np.testing.assert_array_equal(processor_32(arr)["pixel_values"], as_hwc)  # numpy: channels-last
    np.testing.assert_array_equal(processor_32(torch.from_numpy(arr))["pixel_values"], as_chw)  # torch: channels-first
    np.testing.assert_array_equal(processor_32(arr, input_data_format="channels_first")["pixel_values"], as_chw)
    np.testing.assert_array_equal(
        processor_32(torch.from_numpy(arr), input_data_format="channels_last")["pixel_values"], as_hwc
    )


@pytest.mark.parametrize(
    ("shape", "channels_first"),
    [
        ((3, 1, 1), True),
        ((3, 300, 1), True),
        ((1, 1, 3), False),
        ((1, 300, 3), False),
        ((4, 7, 3), False),
        ((3, 5, 4), True),
    ],
)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_ambiguous_layout_follows_the_likelier_channel_count(
    processor_32: OpenFlamingoImageProcessor, shape: tuple[int, int, int], channels_first: bool, as_tensor: bool
) -> None:
    """A dimension of 3 is the channels before one of 4 or 1, whatever the input type: `(3, 1, 1)` is a 1 x 1 RGB
    image, `(4, 7, 3)` a 4 x 7 one."""
    arr = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    hwc = np.ascontiguousarray(arr.transpose(1, 2, 0)) if channels_first else arr
    expected = processor_32(Image.fromarray(hwc if hwc.shape[-1] != 1 else hwc[..., 0]))["pixel_values"]
    given = torch.from_numpy(arr) if as_tensor else arr
    np.testing.assert_array_equal(processor_32(given)["pixel_values"], expected)


def test_bfloat16_tensor_input(processor_32: OpenFlamingoImageProcessor) -> None:
    image = Image.new("RGB", (40, 36), (255, 0, 255))
    tensor = torch.zeros(3, 36, 40, dtype=torch.bfloat16)
    tensor[0] = 1
    tensor[2] = 1
    np.testing.assert_array_equal(processor_32(tensor)["pixel_values"], processor_32(image)["pixel_values"])


@pytest.mark.parametrize("do_normalize", [True, False])
def test_float_images_keep_their_scale_without_do_rescale(
    processor_32: OpenFlamingoImageProcessor, do_normalize: bool
) -> None:
    """A float image in [0, 1] with `do_rescale=False` (what transformers advises for images already scaled) keeps
    that scale, as `CLIPImageProcessor` keeps it: the x 255 that makes it a uint8 image is internal (it came out 255x
    too large). A uint8 image without `do_rescale` stays in [0, 255]."""
    uint8 = np.random.default_rng(2).integers(0, 256, size=(3, 36, 40), dtype=np.uint8)
    scaled = torch.from_numpy(uint8).float() / 255
    expected = processor_32(uint8, do_normalize=do_normalize)["pixel_values"]
    for options in ({}, {"do_rescale": False}):
        np.testing.assert_array_equal(
            processor_32(scaled, do_normalize=do_normalize, **options)["pixel_values"], expected
        )
    mixed = processor_32([uint8, scaled], do_rescale=False, do_normalize=False)["pixel_values"]
    np.testing.assert_array_equal(mixed[0], mixed[1] * 255)


def test_a_float_image_out_of_range_names_its_values(processor_32: OpenFlamingoImageProcessor) -> None:
    image = np.zeros((8, 8, 3), dtype=np.float32)
    image[0, 0, 0] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(ValueError, match=r"got range \[0.0, 1.0000001192092896\]"):
        processor_32(image)


def test_return_tensors(processor_32: OpenFlamingoImageProcessor) -> None:
    image = _load_images(32)[0]
    np_out = processor_32(image)["pixel_values"]
    np_out2 = processor_32(image, return_tensors="np")["pixel_values"]
    pt_out = processor_32(image, return_tensors="pt")["pixel_values"]
    pre_out = processor_32.preprocess(image, return_tensors="pt")["pixel_values"]
    assert isinstance(np_out, np.ndarray) and isinstance(np_out2, np.ndarray)
    assert isinstance(pt_out, torch.Tensor) and pt_out.dtype == torch.float32
    np.testing.assert_array_equal(np_out, np_out2)
    np.testing.assert_array_equal(np_out, pt_out.numpy())
    np.testing.assert_array_equal(np_out, pre_out.numpy())
    np.testing.assert_array_equal(processor_32.preprocess_image(image), np_out[0])


def test_ignores_standard_transformers_kwargs(processor_32: OpenFlamingoImageProcessor) -> None:
    image = _load_images(32)[0]
    out = processor_32(image, do_pad=None, crop_size=None, device=None)["pixel_values"]
    np.testing.assert_array_equal(out[0], _load_golden(32)[0])


# ----------------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 32])
def test_save_load_round_trip(tmp_path: Path, size: int) -> None:
    processor = OpenFlamingoImageProcessor(size=size)
    processor.save_pretrained(tmp_path)
    config_file = tmp_path / "preprocessor_config.json"
    assert config_file.is_file()
    saved = json.loads(config_file.read_text())
    assert saved["size"] == size
    assert saved["image_processor_type"] == "OpenFlamingoImageProcessor"
    assert saved["resample"] == int(Image.Resampling.BICUBIC)
    assert saved["image_mean"] == list(OPENAI_CLIP_MEAN)
    assert saved["image_std"] == list(OPENAI_CLIP_STD)

    loaded = OpenFlamingoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, OpenFlamingoImageProcessor)
    assert loaded.to_dict() == processor.to_dict()
    for name in (
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
    ):
        assert getattr(loaded, name) == getattr(processor, name), name
    images = _load_images(size)
    np.testing.assert_array_equal(loaded(images)["pixel_values"], processor(images)["pixel_values"])

    # save -> load -> save is a fixed point
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "preprocessor_config.json").read_text()) == saved


def test_from_pretrained_overrides(tmp_path: Path) -> None:
    OpenFlamingoImageProcessor().save_pretrained(tmp_path)
    loaded = OpenFlamingoImageProcessor.from_pretrained(tmp_path, size=32)
    np.testing.assert_allclose(loaded(_load_images(32))["pixel_values"], _load_golden(32), atol=ATOL, rtol=0)


def test_from_dict_and_size_dict() -> None:
    processor = OpenFlamingoImageProcessor.from_dict({"size": {"shortest_edge": 32}, "do_normalize": False})
    assert processor.size == 32 and processor.do_normalize is False
    assert OpenFlamingoImageProcessor(size={"height": 48, "width": 48}).size == 48


# ----------------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_input", "match"),
    [
        (123, "Unsupported image input of type builtins.int"),
        ({"pixel_values": 1}, "Unsupported image input"),
        ([], "empty list"),
        ([Image.new("RGB", (4, 4)), 1.5], "Unsupported image input"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "Cannot infer the channel dimension"),
        (np.zeros((5, 8, 9), dtype=np.uint8), "Cannot infer the channel dimension"),
        (np.zeros((8,), dtype=np.uint8), "must have 2 .* or 3 .* dimensions"),
        (np.zeros((1, 1, 3, 8, 8), dtype=np.uint8), "must have 2 .* or 3 .* dimensions"),
        (np.zeros((0, 3, 8, 8), dtype=np.uint8), "empty batch"),
        (np.zeros((0, 8, 3), dtype=np.uint8), "empty spatial dimension"),
        (np.full((8, 8, 3), 2.0, dtype=np.float32), r"values in \[0, 1\]"),
        (np.full((8, 8, 3), -0.5, dtype=np.float32), r"values in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "NaN"),
        (np.full((8, 8, 3), 300, dtype=np.int32), r"values in \[0, 255\]"),
        (np.zeros((8, 8, 3), dtype=bool), "Boolean"),
        (np.zeros((8, 8, 3), dtype=np.complex64), "Unsupported image array dtype"),
        (torch.zeros(2, 8, 8), "Cannot infer the channel dimension"),
        (torch.full((3, 8, 8), 1.5), r"values in \[0, 1\]"),
    ],
)
def test_bad_inputs_raise_value_error(processor_32: OpenFlamingoImageProcessor, bad_input: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        processor_32(bad_input)


def test_paths_urls_base64_and_bytes_are_opened_as_stored(processor_32: OpenFlamingoImageProcessor, tmp_path) -> None:
    """As transformers' chat messages give images (`{"type": "image", "path" | "url" | "base64": ...}`) and as stock
    processors take them: opened as stored, so the pixels are those of `PIL.Image.open(path)` (a palette image stays
    one until the transform converts it, as open_clip's does); a missing file is a `FileNotFoundError`."""
    import base64
    import functools
    import http.server
    import threading

    def pixels(images: object) -> torch.Tensor:
        return processor_32(images, return_tensors="pt")["pixel_values"]

    folder = FIXTURES / "tiny_images"
    paths = sorted(folder.glob("image_*.png"))
    expected = pixels([Image.open(p) for p in paths])
    assert any(Image.open(p).mode == "P" for p in paths)
    assert torch.equal(pixels([str(p) for p in paths]), expected)
    assert torch.equal(pixels(paths), expected)  # pathlib paths
    data = [p.read_bytes() for p in paths]
    assert torch.equal(pixels(data), expected)
    encoded = [base64.b64encode(d).decode() for d in data]
    assert torch.equal(pixels(encoded), expected)
    assert torch.equal(pixels([f"data:image/png;base64,{e}" for e in encoded]), expected)
    # MIME base64 (line breaks every 76 characters, as `base64.encodebytes` writes it), as transformers' `load_image`
    # reads it (it was "no such file")
    mime = [base64.encodebytes(d).decode() for d in data]
    assert all("\n" in e.strip() for e in mime)
    assert torch.equal(pixels(mime), expected)
    assert torch.equal(pixels([f"data:image/png;base64,{e}" for e in mime]), expected)
    for uri in ("data:image/png;base64", "data:image/png;base64,", "data:image/png;base64,!!!!"):
        with pytest.raises(ValueError, match="Cannot read an image from the data URI .* no base64 image data"):
            pixels(uri)  # (an IndexError, or "no such file")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{server.server_address[1]}/{p.name}" for p in paths]
        assert torch.equal(pixels(urls), expected)
        with pytest.raises(OSError, match=r"Could not fetch the image at http://127\.0\.0\.1:\d+/missing\.png"):
            pixels(urls[0].rsplit("/", 1)[0] + "/missing.png")
    finally:
        server.shutdown()
    with pytest.raises(FileNotFoundError, match=r"Cannot read an image from '.*nowhere\.png': no such file"):
        pixels(str(tmp_path / "nowhere.png"))
    with pytest.raises(FileNotFoundError, match=r"Cannot read an image from 'abcd': no such file"):
        pixels("abcd")  # (valid base64, but of no image)


def test_wrong_channel_count_with_explicit_layout(processor_32: OpenFlamingoImageProcessor) -> None:
    with pytest.raises(ValueError, match="1, 3 or 4 channels; got 5"):
        processor_32(np.zeros((5, 8, 8), dtype=np.uint8), input_data_format="channels_first")
    with pytest.raises(ValueError, match="'channels_first' or 'channels_last'"):
        processor_32(np.zeros((3, 8, 8), dtype=np.uint8), input_data_format="nchw")


def test_unsupported_type_is_also_type_error(processor_32: OpenFlamingoImageProcessor) -> None:
    with pytest.raises(TypeError):
        processor_32(object())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "positive int"),
        ({"size": 2.5}, "positive int"),
        ({"size": {"height": 32, "width": 48}}, "square"),
        ({"size": {"longest_edge": 32}}, "shortest_edge"),
        ({"image_mean": [0.5, 0.5]}, "3 values"),
        ({"image_std": "abc"}, "3 floats"),
        ({"image_std": [1.0, 0.0, 1.0]}, "non-zero"),
        ({"resample": 42}, "resampling filters"),
        ({"resample": "bicubic"}, "PIL resampling filter"),
        ({"rescale_factor": -1.0}, "positive float"),
        ({"return_tensors": "tf"}, "return_tensors"),
        ({"data_format": "nhwc"}, "data_format"),
        ({"sise": 32}, "Unexpected keyword argument `sise`"),
    ],
)
def test_bad_arguments_raise_value_error(
    processor_32: OpenFlamingoImageProcessor, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        processor_32(Image.new("RGB", (8, 8)), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"size": -3}, "positive int"), ({"image_mean": [1, 2]}, "3 values"), ({"resample": 99}, "resampling")],
)
def test_bad_constructor_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OpenFlamingoImageProcessor(**kwargs)


def test_do_convert_rgb_false_requires_rgb() -> None:
    processor = OpenFlamingoImageProcessor(size=32, do_convert_rgb=False)
    rgb = _load_images(32)[0]
    np.testing.assert_array_equal(processor(rgb)["pixel_values"][0], _load_golden(32)[0])
    with pytest.raises(ValueError, match="requires RGB images, got a PIL image of mode 'L'"):
        processor(_load_images(32)[2])


def test_unconvertible_mode_raises_value_error(processor_32: OpenFlamingoImageProcessor) -> None:
    image = Image.new("La", (40, 40))
    with pytest.raises(ValueError, match="mode 'La' to RGB"):
        processor_32(image)
