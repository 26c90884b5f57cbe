"""fiber_plugins.images: every source users have -> (C, H, W) float32 in [0, 1]."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fiber_plugins.errors import MissingFileError, UserTypeError, UserValueError
from fiber_plugins.images import as_reference_batch, load_image

ALPHA_WARNING = "reference has an alpha channel: composited on a white background"


@pytest.fixture
def rgb_array() -> np.ndarray:
    """A (4, 5, 3) uint8 picture with distinct values everywhere."""
    return (np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4 + 3).astype(np.uint8)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- old behaviour


def test_rgb_png_matches_old_loader(tmp_path, rgb_array):
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb_array).save(path)
    expected = torch.from_numpy(rgb_array.astype(np.float32) / 255.0).permute(2, 0, 1)
    out = load_image(path)
    assert out.dtype == torch.float32 and out.shape == (3, 4, 5)
    assert torch.equal(out, expected)
    assert torch.equal(load_image(str(path)), expected)
    resized = F.interpolate(
        expected[None], size=(8, 6), mode="bilinear", align_corners=False, antialias=True
    )[0].clamp(0, 1)
    assert torch.equal(load_image(path, size=(8, 6)), resized)
    assert torch.equal(load_image(path, size=3), load_image(path, size=(3, 3)))


def test_rgb_png_to_one_channel_is_pil_luma(tmp_path, rgb_array):
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb_array).save(path)
    pil_luma = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    out = load_image(path, channels=1)
    assert out.shape == (1, 4, 5)
    assert torch.allclose(out[0], torch.from_numpy(pil_luma), atol=0.5 / 255 + 1e-6)


def test_tensor_chw_float_kept_as_before():
    t = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_image(t), t)
    assert torch.equal(load_image(t.double()), t)
    assert torch.equal(load_image(t[:1], channels=3), t[:1].expand(3, -1, -1))


# ---------------------------------------------------------------------------- paths


def test_missing_path_raises_missing_file_error(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(MissingFileError) as err:
        load_image(path)
    assert _one_line(err) == f"reference image {str(path)!r} does not exist"


def test_unreadable_file_names_path_and_error_type(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(UserValueError) as err:
        load_image(path)
    assert _one_line(err) == (
        f"cannot read reference image {str(path)!r} (UnidentifiedImageError); "
        "give a PNG, JPEG, BMP, TIFF, GIF or WebP file"
    )


def test_truncated_file_is_unreadable(tmp_path, rgb_array):
    path = tmp_path / "cut.png"
    Image.fromarray(np.tile(rgb_array, (20, 20, 1))).save(path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(UserValueError, match=r"cannot read reference image .*cut\.png"):
        load_image(path)


def test_directory_refused(tmp_path):
    with pytest.raises(UserValueError) as err:
        load_image(tmp_path)
    assert _one_line(err) == f"reference image {str(tmp_path)!r} is a directory; give an image file"


def test_exif_orientation_applied(tmp_path):
    pixels = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    out = load_image(path, channels=1)
    expected = np.rot90(pixels, k=-1).astype(np.float32) / 255.0
    assert out.shape == (1, 3, 2)
    assert torch.equal(out[0], torch.from_numpy(expected.copy()))
    # the same for the PIL image the user opened themselves: one loader
    assert torch.equal(load_image(Image.open(path), channels=1), out)


def test_oversized_file_refused_with_one_line(tmp_path):
    # a 14000 x 14000 1-bit PNG header: PIL checks the size on open, before any pixel data
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 14000, 14000, 1, 0, 0, 0, 0)
    path = tmp_path / "huge.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UserValueError) as err:
        load_image(path)
    assert _one_line(err) == (
        f"reference image {str(path)!r} has 196,000,000 pixels, over PIL's decompression-bomb "
        f"limit of {limit:,} pixels; resize it below the limit first (or set "
        "PIL.Image.MAX_IMAGE_PIXELS = None if you trust the file)"
    )
    assert Image.MAX_IMAGE_PIXELS == limit


def test_oversized_between_limit_and_twice_refused(tmp_path, monkeypatch, rgb_array):
    path = tmp_path / "big.png"
    Image.new("RGB", (12, 12)).save(path)  # 144 px: PIL only warns between 100 and 200
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning leaks out
        with pytest.raises(UserValueError) as err:
            load_image(path)
    assert "has 144 pixels, over PIL's decompression-bomb limit of 100 pixels" in _one_line(err)
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the user's own choice is honoured
    assert load_image(path).shape == (3, 12, 12)


# ---------------------------------------------------------------------------- PIL modes


def test_16bit_grey_png_scaled_by_65535(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((3, 4), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, channels=1)
    assert torch.allclose(out, torch.full((1, 3, 4), 32768 / 65535))
    assert torch.allclose(load_image(path), torch.full((3, 3, 4), 32768 / 65535))


def test_16bit_big_endian_and_32bit_int_modes():
    big_endian = Image.new("I;16B", (2, 2), 300)
    assert torch.allclose(load_image(big_endian, channels=1), torch.full((1, 2, 2), 300 / 65535))
    sixteen_in_i = Image.new("I", (2, 2), 40000)  # a 16-bit file some Pillows open as "I"
    assert torch.allclose(
        load_image(sixteen_in_i, channels=1), torch.full((1, 2, 2), 40000 / 65535)
    )
    wide = Image.new("I", (2, 2), 2**30)
    assert torch.allclose(load_image(wide, channels=1), torch.full((1, 2, 2), 2**30 / (2**31 - 1)))
    with pytest.raises(UserValueError, match=r"mode 'I' has negative values \(min -5\)"):
        load_image(Image.new("I", (2, 2), -5))


def test_bilevel_mode_1():
    image = Image.fromarray(np.array([[True, False], [False, True]]))
    assert image.mode == "1"
    assert torch.equal(load_image(image, channels=1), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))


def test_palette_equals_its_rgb_conversion(rgb_array):
    palette = Image.fromarray(rgb_array).quantize(colors=8)
    assert palette.mode == "P"
    assert torch.equal(load_image(palette), load_image(palette.convert("RGB")))


def test_palette_with_transparency_is_composited():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # the blue entry is transparent
    with pytest.warns(UserWarning, match=ALPHA_WARNING):
        out = load_image(palette)
    assert torch.equal(out, torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]], [[0.0, 1.0]]]))


def test_rgba_over_white_numerically_and_warned():
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 51], [0, 0, 0, 0]]], dtype=np.uint8)
    with pytest.warns(UserWarning, match=ALPHA_WARNING) as record:
        out = load_image(Image.fromarray(rgba))
    assert len(record) == 1
    assert "pass background=" in str(record[0].message)
    assert record[0].filename == __file__  # attributed to the user's line
    colour = torch.tensor([200.0, 100.0, 0.0]) / 255
    alpha = torch.tensor([1.0, 51 / 255, 0.0])
    expected = colour[:, None] * alpha[None] + 1.0 * (1 - alpha[None])
    assert torch.allclose(out[:, 0], expected, atol=1e-6)


def test_rgba_over_chosen_background_is_silent():
    rgba = Image.fromarray(np.array([[[255, 255, 255, 0], [255, 0, 0, 128]]], dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(rgba, background=(0.0, 0.0, 1.0))
    a = 128 / 255
    expected = torch.tensor([[[0.0, a]], [[0.0, 0.0]], [[1.0, 1 - a]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_opaque_rgba_is_silent(rgb_array):
    opaque = Image.fromarray(rgb_array).convert("RGBA")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(opaque)
    assert torch.equal(out, load_image(Image.fromarray(rgb_array)))


def test_grey_alpha_mode_la():
    la = Image.fromarray(np.array([[[100, 0], [100, 255]]], dtype=np.uint8), mode="LA")
    with pytest.warns(UserWarning, match=ALPHA_WARNING):
        out = load_image(la, channels=1)
    assert torch.allclose(out, torch.tensor([[[1.0, 100 / 255]]]))
    assert torch.allclose(
        load_image(la, channels=1, background=0), torch.tensor([[[0.0, 100 / 255]]])
    )


def test_float_mode_f():
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    assert torch.equal(load_image(Image.fromarray(values), channels=1)[0], torch.from_numpy(values))
    with pytest.raises(UserValueError) as err:
        load_image(Image.fromarray(values * 255))
    assert _one_line(err) == (
        "reference image of mode 'F' has values in [0, 255], outside [0, 1]; "
        "rescale it first: for 0-255 data use x / 255"
    )


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "RGBX"])
def test_other_colour_modes_converted_like_pil(rgb_array, mode):
    image = Image.fromarray(rgb_array).convert(mode)
    expected = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    assert torch.equal(load_image(image), torch.from_numpy(expected).permute(2, 0, 1))


# ---------------------------------------------------------------------------- numpy arrays


def test_numpy_layouts(rgb_array):
    expected = torch.from_numpy(rgb_array.astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(load_image(rgb_array), expected)  # (H, W, C)
    assert torch.equal(load_image(rgb_array.transpose(2, 0, 1)), expected)  # (C, H, W)
    assert torch.equal(load_image(rgb_array[..., :1]), expected[:1].expand(3, -1, -1))
    grey = rgb_array[..., 0]
    assert torch.equal(load_image(grey, channels=1), expected[:1])  # (H, W)
    assert torch.equal(load_image(np.flip(rgb_array, 0)), expected.flip(1))  # negative strides


def test_numpy_dtypes():
    assert torch.equal(
        load_image(np.array([[0, 255]], np.uint8), channels=1), torch.tensor([[[0.0, 1.0]]])
    )
    assert torch.allclose(
        load_image(np.array([[0, 32768, 65535]], np.uint16), channels=1),
        torch.tensor([[[0.0, 32768 / 65535, 1.0]]]),
    )
    assert torch.equal(
        load_image(np.array([[True, False]]), channels=1), torch.tensor([[[1.0, 0.0]]])
    )
    floats = np.array([[0.0, 0.3, 1.0005]], dtype=np.float64)  # within the 1e-3 tolerance
    assert torch.allclose(load_image(floats, channels=1), torch.tensor([[[0.0, 0.3, 1.0]]]))


def test_numpy_float_out_of_range_quotes_range_and_fix():
    with pytest.raises(UserValueError) as err:
        load_image(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32))
    assert _one_line(err) == (
        "reference array has values in [-1, 1], outside [0, 1]; "
        "rescale it first: for data in [-1, 1] use (x + 1) / 2"
    )
    with pytest.raises(UserValueError, match=r"\[0, 1000\].*\(x - x.min\(\)\)"):
        load_image(np.array([[0.0, 1000.0]]))


def test_numpy_nan_refused():
    with pytest.raises(UserValueError) as err:
        load_image(np.array([[0.0, np.nan]]))
    assert _one_line(err) == "reference array holds NaN/inf values; give finite values in [0, 1]"


def test_numpy_rgba_composited():
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = [255, 0, 0, 255]  # opaque red next to a transparent pixel
    with pytest.warns(UserWarning, match=ALPHA_WARNING):
        out = load_image(rgba)
    assert torch.equal(out, torch.tensor([[[1.0, 1.0]], [[1.0, 0.0]], [[1.0, 0.0]]]))


def test_numpy_bad_dtype_and_shape():
    with pytest.raises(UserTypeError) as err:
        load_image(np.zeros((2, 2), np.int64))
    assert _one_line(err) == (
        "reference array has dtype int64; give uint8 (0-255), uint16 (0-65535), bool, "
        "or float in [0, 1] (e.g. array.astype(np.uint8))"
    )
    with pytest.raises(UserValueError) as err:
        load_image(np.zeros((5, 6, 7), np.uint8))
    assert _one_line(err) == (
        "reference array has shape (5, 6, 7); give (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4"
    )


# ---------------------------------------------------------------------------- torch tensors


def test_tensor_uint8_and_2d():
    t = torch.tensor([[[0, 51], [255, 102]]], dtype=torch.uint8)
    assert torch.allclose(load_image(t, channels=1), t.float() / 255)
    assert torch.allclose(load_image(t[0], channels=1), t.float() / 255)  # (H, W)
    assert load_image(t[0]).shape == (3, 2, 2)


def test_tensor_hwc_gets_permute_hint():
    with pytest.raises(UserValueError) as err:
        load_image(torch.rand(32, 32, 3))
    assert _one_line(err) == (
        "reference tensor has shape (32, 32, 3): that looks like HWC; pass tensor.permute(2, 0, 1)"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_tensor_nan_inf_refused(bad):
    t = torch.rand(3, 4, 4)
    t[1, 2, 3] = bad
    with pytest.raises(UserValueError) as err:
        load_image(t)
    assert _one_line(err) == "reference tensor holds NaN/inf values; give finite values in [0, 1]"


def test_tensor_out_of_range_and_bad_shape():
    with pytest.raises(UserValueError) as err:
        load_image(torch.tensor([[[0.0, 2.5]]]))
    assert _one_line(err) == (
        "reference tensor has values in [0, 2.5], outside [0, 1]; "
        "rescale it first: for 0-255 data use x / 255"
    )
    with pytest.raises(UserValueError) as err:
        load_image(torch.rand(1, 3, 4, 4))
    assert _one_line(err) == (
        "reference tensor has shape (1, 3, 4, 4); give one (C, H, W) or (H, W) image; "
        "pass batches to as_reference_batch"
    )
    with pytest.raises(UserTypeError, match=r"dtype torch.int64"):
        load_image(torch.zeros(3, 2, 2, dtype=torch.int64))


def test_tensor_rgba_composited():
    t = torch.tensor([0.2, 0.4, 0.6, 0.5]).view(4, 1, 1)
    with pytest.warns(UserWarning, match=ALPHA_WARNING):
        out = load_image(t)
    assert torch.allclose(out.flatten(), torch.tensor([0.6, 0.7, 0.8]))


# ---------------------------------------------------------------------------- channels, types


def test_channel_conversion():
    rgb = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(load_image(rgb, channels=1), torch.tensor([[[0.299]]]))
    grey = torch.full((1, 2, 2), 0.25)
    assert torch.equal(load_image(grey, channels=3), torch.full((3, 2, 2), 0.25))
    with pytest.raises(UserValueError) as err:
        load_image(torch.rand(2, 5, 5))
    assert _one_line(err) == (
        "reference has 2 channels and the prior makes 3; give a grey, RGB or RGBA image"
    )
    with pytest.raises(UserValueError, match="give 1 or 4 channels"):
        load_image(torch.rand(3, 4, 4), channels=4)


def test_unsupported_type_and_settings():
    with pytest.raises(UserTypeError) as err:
        load_image([[0.0, 1.0]])
    assert _one_line(err) == (
        "cannot use list as a reference image; "
        "give a path, a PIL image, a numpy array or a torch tensor"
    )
    with pytest.raises(UserValueError, match=r"background must be .* got \(300, 0, 0\)"):
        load_image(torch.rand(3, 2, 2), background=(300, 0, 0))
    with pytest.raises(UserValueError, match=r"size must be \(height, width\) .* got \(0, 4\)"):
        load_image(torch.rand(3, 2, 2), size=(0, 4))


# ---------------------------------------------------------------------------- batches


def test_batch_from_list_tensor_and_single(tmp_path, rgb_array):
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb_array).save(path)
    sources = [path, Image.fromarray(rgb_array), rgb_array, torch.rand(1, 4, 5)]
    batch = as_reference_batch(sources, (4, 5), 3)
    assert batch.shape == (4, 3, 4, 5)
    assert torch.equal(batch[0], batch[1]) and torch.equal(batch[1], batch[2])
    stacked = torch.rand(2, 3, 4, 5)
    assert torch.equal(as_reference_batch(stacked, None, 3), stacked)
    assert torch.equal(as_reference_batch(str(path), (2, 2), 1), load_image(path, (2, 2), 1)[None])
    assert as_reference_batch(np.zeros((2, 4, 5, 3), np.uint8), None, 3).shape == (2, 3, 4, 5)


def test_batch_errors():
    with pytest.raises(UserValueError) as err:
        as_reference_batch([], (4, 4), 3)
    assert _one_line(err) == (
        "references is empty; give at least one image "
        "(a path, a PIL image, a numpy array or a torch tensor)"
    )
    with pytest.raises(UserValueError) as err:
        as_reference_batch([torch.rand(3, 2, 2), torch.rand(3, 2, 2) * 9], None, 3)
    assert _one_line(err).startswith("references[1]: reference tensor has values in [")
    with pytest.raises(UserValueError) as err:
        as_reference_batch([torch.rand(3, 2, 2), torch.rand(3, 4, 4)], None, 3)
    assert _one_line(err) == (
        "references have different sizes (2x2, 4x4); pass size=(H, W) to resize them"
    )


def test_batch_warns_once_for_alpha():
    rgba = torch.tensor([0.0, 0.0, 0.0, 0.5]).view(4, 1, 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = as_reference_batch([rgba, torch.zeros(3, 1, 1), rgba], None, 3)
    assert [str(w.message) for w in record] == [
        "references [0, 2] have an alpha channel: composited on a white background; "
        "pass background=... (a grey level or an (r, g, b) tuple in [0, 1]) to choose another"
    ]
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([[0.5] * 3, [0.0] * 3, [0.5] * 3]))
