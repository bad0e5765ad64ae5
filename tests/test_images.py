"""The image reader against independent references: pypng for PNGs of every colour type and depth (the reader
decodes PNGs with imagecodecs / libpng), Pillow with truncated-image loading off for JPEGs (the reader decodes
gray JPEGs with imagecodecs / libjpeg-turbo), the mapping rules of the module docstring written out here."""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import png
import pytest
from dataset_trees import dicom_dataset
from PIL import Image, ImageFile, ImageOps
from test_dicom import write

from metachex_jax.imaging import file_formats, images, resize

RNG = np.random.default_rng(0)
RESOLUTIONS = (73, 224, 256, 320)
assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # Pillow, the JPEG reference, refuses truncated files


def write_png(path, array: np.ndarray, **writer):
    """pypng writes `array` (H, W) or (H, W, planes), uint8 or uint16; `writer`: pypng's Writer options."""
    array = np.asarray(array)
    height, width = array.shape[:2]
    writer.setdefault("bitdepth", 16 if array.dtype == np.uint16 else 8)
    if array.ndim == 2 and "palette" not in writer:
        writer.setdefault("greyscale", True)
    elif array.ndim == 3:
        writer.setdefault("greyscale", array.shape[2] <= 2)
        writer.setdefault("alpha", array.shape[2] in (2, 4))
    with open(path, "wb") as f:
        png.Writer(width, height, **writer).write(f, array.reshape(height, -1))
    return path


def pypng_samples(path) -> tuple[np.ndarray, dict]:
    """The reference decode: (H, W, planes) samples as stored (palette expanded to RGB(A)), and pypng's info."""
    reader = png.Reader(filename=str(path))
    width, height, rows, info = reader.asDirect()
    samples = np.array([np.asarray(row) for row in rows]).reshape(height, width, -1)
    return samples, info


def round_half_up(numerator, denominator):
    return (2 * np.asarray(numerator, np.int64) + denominator) // (2 * denominator)


def documented_gray(samples: np.ndarray, bits: int) -> np.ndarray:
    """The module docstring's mapping, written out: alpha dropped, ITU-R 601-2 luma with Pillow's integer
    weights, round(L * 255 / (2**bits - 1)) half up."""
    planes = samples.shape[2]
    colour = samples[..., :3] if planes >= 3 else samples[..., :1]
    if colour.shape[2] == 3:
        luma65536 = colour.astype(np.int64) @ np.array([19595, 38470, 7471])
    else:
        luma65536 = colour[..., 0].astype(np.int64) * 65536
    return round_half_up(luma65536 * 255, 65536 * (2**bits - 1)).astype(np.uint8)


# --- decoding and the mapping to 8 bits ------------------------------------------------------------------------

def test_8bit_gray_is_read_unchanged(tmp_path):
    pixels = RNG.integers(0, 256, (24, 40), dtype=np.uint8)
    write_png(tmp_path / "a.png", pixels)
    np.testing.assert_array_equal(images.load_gray(tmp_path / "a.png", None), pixels)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_low_depth_gray_is_expanded_to_0_255(tmp_path, depth):
    raw = RNG.integers(0, 2**depth, (9, 13)).astype(np.uint8)
    write_png(tmp_path / "low.png", raw, bitdepth=depth)
    samples, info = pypng_samples(tmp_path / "low.png")
    assert info["bitdepth"] == depth
    np.testing.assert_array_equal(images.load_gray(tmp_path / "low.png", None),
                                  samples[..., 0].astype(np.int64) * 255 // (2**depth - 1))


@pytest.mark.parametrize("layout", ["RGB", "RGBA", "LA", "palette", "palette+tRNS"])
def test_8bit_colour_palette_and_alpha_give_pillows_luma_of_the_colour(tmp_path, layout):
    path = tmp_path / f"{layout}.png"
    if layout.startswith("palette"):
        palette = [tuple(int(c) for c in RNG.integers(0, 256, 3)) for _ in range(16)]
        if layout.endswith("tRNS"):
            palette = [(*colour, int(RNG.integers(0, 256))) for colour in palette]
        write_png(path, RNG.integers(0, 16, (12, 17)).astype(np.uint8), palette=palette, bitdepth=4)
    else:
        planes = {"RGB": 3, "RGBA": 4, "LA": 2}[layout]
        write_png(path, RNG.integers(0, 256, (12, 17, planes)).astype(np.uint8))
    samples, _ = pypng_samples(path)
    expected = documented_gray(samples, 8)
    if samples.shape[2] >= 3:  # the same as Pillow's own conversion of the colour channels
        np.testing.assert_array_equal(expected, np.asarray(Image.fromarray(samples[..., :3].astype(np.uint8))
                                                           .convert("L")))
    gray, info = images.load_gray_with_info(path, None)
    np.testing.assert_array_equal(gray, expected)
    assert (info.bit_depth, info.bit_depth_source) == (8, "8-bit file")


@pytest.mark.parametrize("planes", [2, 3, 4])
def test_16bit_colour_and_gray_alpha_pngs_are_read_at_full_depth(tmp_path, planes):
    """Defect 1b: Pillow keeps the high byte of these, so 12-bit data came out at 0..15 of 255."""
    samples = RNG.integers(0, 4096, (20, 30, planes)).astype(np.uint16)
    write_png(tmp_path / "c16.png", samples)
    reference, info = pypng_samples(tmp_path / "c16.png")
    assert info["bitdepth"] == 16 and reference.shape[2] == planes
    gray, read_info = images.load_gray_with_info(tmp_path / "c16.png", None)
    np.testing.assert_array_equal(gray, documented_gray(reference, 12))  # 12-bit data: the data rule
    assert (read_info.bit_depth, read_info.bit_depth_source) == (12, "data")
    assert gray.max() > 200  # not the high byte (which is at most 15)


@pytest.mark.parametrize("depth", [8, 16])
def test_gray_png_with_trns_is_read_as_gray(tmp_path, depth):
    """Defect 1c: a gray PNG with a tRNS chunk decoded to (H, W, 2), and a 16-bit one was refused."""
    dtype = np.uint8 if depth == 8 else np.uint16
    values = RNG.integers(0, 256 if depth == 8 else 4096, (15, 11)).astype(dtype)
    write_png(tmp_path / "t.png", values, transparent=int(values[0, 0]))
    reference, info = pypng_samples(tmp_path / "t.png")
    assert b"tRNS" in (tmp_path / "t.png").read_bytes()
    gray, read_info = images.load_gray_with_info(tmp_path / "t.png", None)
    np.testing.assert_array_equal(gray, documented_gray(reference, 8 if depth == 8 else 12))
    assert read_info.bit_depth == (8 if depth == 8 else 12)


def test_16bit_gray_is_scaled_by_its_bit_range_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768], [40000, 65535, 12345, 2]], np.uint16)
    write_png(tmp_path / "g16.png", values)
    gray = images.load_gray(tmp_path / "g16.png", None)
    np.testing.assert_array_equal(gray, np.rint(values / 65535.0 * 255.0).astype(np.uint8))
    assert gray[0, 2] == 4  # 1000/65535*255: a clipping conversion would give 255


def test_32bit_int_samples_holding_16bit_values():
    values = np.array([[0, 65535], [30000, 5]], np.int32)
    gray, bits, _ = images.gray_8bit(values)
    np.testing.assert_array_equal(gray, np.rint(values / 65535.0 * 255.0).astype(np.uint8))
    assert bits == 16
    with pytest.raises(ValueError, match="outside 0..65535"):
        images.gray_8bit(np.array([[70000]], np.int32))


def _with_sbit(png_bytes: bytes, bits: bytes) -> bytes:
    """Insert an sBIT chunk after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I4s", len(bits), b"sBIT") + bits + struct.pack(">I", zlib.crc32(b"sBIT" + bits))
    return png_bytes[:ihdr_end] + chunk + png_bytes[ihdr_end:]


def sbit_of(path) -> int | None:
    return file_formats.png_layout(open(path, "rb").read()).color_significant_bits


def test_12bit_data_in_16bit_png_uses_sbit_range(tmp_path):
    values = np.array([[0, 4095, 2048, 100]], np.uint16)
    write_png(tmp_path / "plain.png", values)
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), b"\x0c"))
    assert (sbit_of(tmp_path / "sbit.png"), sbit_of(tmp_path / "plain.png")) == (12, None)
    expected = np.rint(values / 4095.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(images.load_gray(tmp_path / "sbit.png", None), expected)
    assert images.load_gray_with_info(tmp_path / "sbit.png", None)[1].bit_depth_source == "png sBIT"
    # Colour: the largest of the R, G, B entries (alpha left out).
    write_png(tmp_path / "rgba.png", np.repeat(values[..., None], 4, axis=2))
    (tmp_path / "rgba_sbit.png").write_bytes(_with_sbit((tmp_path / "rgba.png").read_bytes(), b"\x0a\x0c\x0b\x10"))
    assert sbit_of(tmp_path / "rgba_sbit.png") == 12


def test_12bit_data_in_16bit_png_without_sbit_is_not_black(tmp_path):
    """The bug this reader fixed: 0..4095 in a 16-bit PNG without sBIT was divided by 65535 (at most 16 of 255)."""
    values = np.array([[0, 4095, 2048, 100]], np.uint16)
    write_png(tmp_path / "plain.png", values)
    gray, info = images.load_gray_with_info(tmp_path / "plain.png", None)
    np.testing.assert_array_equal(gray, np.rint(values / 4095.0 * 255.0).astype(np.uint8))
    assert gray.max() == 255
    assert (info.format, info.bit_depth, info.bit_depth_source) == ("png", 12, "data")


def test_sbit_with_shifted_samples_is_16bit_data(tmp_path):
    """A writer that followed the PNG standard shifted 12-bit samples up: they exceed 4095, so 16 bits is right."""
    values = (np.array([[0, 4095, 2048, 100]], np.uint16) << 4)
    write_png(tmp_path / "plain.png", values)
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), b"\x0c"))
    gray, info = images.load_gray_with_info(tmp_path / "sbit.png", None)
    np.testing.assert_array_equal(gray, np.rint(values / 65535.0 * 255.0).astype(np.uint8))
    assert (info.bit_depth, info.bit_depth_source) == (16, "data")


def test_precedence_override_then_metadata_then_sbit_then_data(tmp_path):
    values = np.array([[0, 1023, 512, 7]], np.uint16)  # 10-bit data (PadChest has 10- and 12-bit images)
    write_png(tmp_path / "plain.png", values)
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), b"\x0b"))

    def read(name, **kw):
        gray, info = images.load_gray_with_info(tmp_path / name, None, **kw)
        return gray, info.bit_depth, info.bit_depth_source

    def scaled(bits):
        return np.rint(values / (2.0 ** bits - 1) * 255.0).astype(np.uint8)

    gray, bits, source = read("plain.png")
    assert (bits, source) == (12, "data")
    np.testing.assert_array_equal(gray, scaled(12))
    assert read("sbit.png")[1:] == (11, "png sBIT")
    gray, bits, source = read("sbit.png", declared_bits=10)  # the dataset's metadata wins over sBIT
    assert (bits, source) == (10, "dataset metadata")
    np.testing.assert_array_equal(gray, scaled(10))
    assert read("sbit.png", declared_bits=10, bit_depth=16)[1:] == (16, "override")  # and the override over all
    # Metadata the samples contradict is not used (recorded), and an override they exceed is an error.
    assert read("plain.png", declared_bits=8)[1:] == (12, "data (declared 8 bits, but samples reach 1023)")
    with pytest.raises(images.ImageDecodeError, match="samples reach 1023"):
        read("plain.png", bit_depth=9)


def test_bit_depth_override_applies_to_high_depth_sources_only(tmp_path):
    """Defect 1i: `--bit_depth` failed every 8-bit file, although it is meant for high-depth sources."""
    pixels = RNG.integers(0, 256, (10, 12), dtype=np.uint8)
    write_png(tmp_path / "eight.png", pixels)
    Image.fromarray(pixels).save(tmp_path / "eight.jpg", quality=95)
    write_png(tmp_path / "rgb.png", np.stack([pixels] * 3, axis=-1))
    for name in ("eight.png", "eight.jpg", "rgb.png"):
        plain, _ = images.load_gray_with_info(tmp_path / name, None)
        gray, info = images.load_gray_with_info(tmp_path / name, None, bit_depth=12)
        np.testing.assert_array_equal(gray, plain)  # ignored ...
        assert (info.bit_depth, info.bit_depth_source) == (8, "8-bit file (bit_depth=12 not applied)")  # ... said
    write_png(tmp_path / "sixteen.png", (pixels.astype(np.uint16) * 4))
    assert images.load_gray_with_info(tmp_path / "sixteen.png", None, bit_depth=10)[1].bit_depth_source == "override"


def test_format_is_decided_by_content_not_extension(tmp_path):
    pixels = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a_jpeg.png", format="JPEG", quality=100)
    write_png(tmp_path / "a_png.JPG", pixels)
    write_png(tmp_path / "UPPER.PNG", pixels)
    write_png(tmp_path / "rgb_gray.png", np.stack([pixels] * 3, -1))
    Image.fromarray(pixels).save(tmp_path / "a_tiff.png", format="TIFF")
    jpeg, info = images.load_gray_with_info(tmp_path / "a_jpeg.png", None)
    assert info.format == "jpeg" and np.abs(jpeg.astype(int) - pixels).max() <= 8
    for name in ("a_png.JPG", "UPPER.PNG", "rgb_gray.png", "a_tiff.png"):  # R = G = B: gray comes back exactly
        gray, info = images.load_gray_with_info(tmp_path / name, None)
        assert (info.format, info.bit_depth) == ("tiff" if "tiff" in name else "png", 8)
        np.testing.assert_array_equal(gray, pixels)


def test_gray_jpegs_decode_to_pillows_pixels(tmp_path):
    """Gray JPEGs (baseline, progressive, restart markers) go through imagecodecs: the pixels are Pillow's."""
    smooth = np.clip(np.cumsum(RNG.normal(0, 3, (45, 61)), axis=1) + 128, 0, 255).astype(np.uint8)
    options = {"q75.jpg": {"quality": 75}, "q95.jpg": {"quality": 95}, "prog.jpg": {"progressive": True}}
    for name, kwargs in options.items():
        Image.fromarray(smooth).save(tmp_path / name, **kwargs)
    for name in options:
        with Image.open(tmp_path / name) as reference:
            expected = np.asarray(reference.convert("L"))
        got, info = images.load_gray_with_info(tmp_path / name, None)
        np.testing.assert_array_equal(got, expected)
        assert (info.width, info.height, info.format, info.bit_depth) == (61, 45, "jpeg", 8)


# --- truncated and corrupt files (defect 1a) -------------------------------------------------------------------

def reference_refuses(path) -> bool:
    """Whether the independent decoder (pypng for PNG, Pillow for the rest) reports an error."""
    try:
        if path.read_bytes().startswith(file_formats.PNG_SIGNATURE):
            pypng_samples(path)
        else:
            with Image.open(path) as image:
                image.load()
    except Exception:  # noqa: BLE001 - any error of the reference
        return True
    return False


def corrupted_files(tmp_path) -> dict:
    """Gray JPEGs and PNGs (the reader's fast paths) cut or damaged the ways real copies are."""
    smooth = np.clip(np.cumsum(RNG.normal(0, 3, (120, 90)), axis=1) + 128, 0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "ok.jpg", quality=90)
    jpeg = (tmp_path / "ok.jpg").read_bytes()
    write_png(tmp_path / "ok.png", smooth)
    data = (tmp_path / "ok.png").read_bytes()
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4:idat])
    text = struct.pack(">I4s", 4, b"tEXt") + b"a\x00bc" + struct.pack(">I", zlib.crc32(b"tEXta\x00bc") ^ 1)
    files = {
        "cut_half.jpg": jpeg[:len(jpeg) // 2],
        "cut_before_eoi.jpg": jpeg[:-2],  # every scan complete, the end-of-image marker missing
        "cut_idat.png": data[:idat + 4 + length // 2],
        "bad_idat_crc.png": data[:idat + 4 + length] + bytes([data[idat + 4 + length] ^ 1]) + data[idat + 5 + length:],
        "bad_text_crc.png": data[:33] + text + data[33:],
        "no_iend.png": data[:-12],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return files


def test_truncated_and_corrupt_files_are_refused_naming_the_file(tmp_path):
    files = corrupted_files(tmp_path)
    assert images.check_image(tmp_path / "ok.jpg") is None and images.check_image(tmp_path / "ok.png") is None
    for name in files:
        path = tmp_path / name
        assert reference_refuses(path), name  # the independent decoder refuses it too
        message = images.check_image(path)
        assert message is not None and message.startswith(f"{path}: cannot decode image"), (name, message)
        with pytest.raises(images.ImageDecodeError, match=f"^{path}"):
            images.load_gray(path, 32)
    assert "truncated JPEG" in images.check_image(tmp_path / "cut_before_eoi.jpg")
    assert "CRC error in its b'tEXt' chunk" in images.check_image(tmp_path / "bad_text_crc.png")


def test_empty_and_undecodable_files_raise_naming_the_file(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "random").write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    reasons = {"garbage.png": "not an image file", "empty.png": "empty", "random": "not an image file"}
    for name, reason in reasons.items():
        with pytest.raises(images.ImageDecodeError, match=str(tmp_path / name)):
            images.load_gray(tmp_path / name, 16)
        assert reason in images.check_image(tmp_path / name)


def test_decode_many_in_a_pool_keeps_order_and_reports_failures(tmp_path):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        write_png(paths[-1], np.full((8, 8), 40 * i, np.uint8))
    paths[3].write_bytes(b"broken")
    with images.decoding_pool(2) as pool:
        results = list(images.decode_many(paths, 4, pool=pool, progress=False))
    assert [r[1] is None for r in results] == [True, True, True, False, True, True]
    assert str(paths[3]) in results[3][1]
    for i, (image, _) in enumerate(results):
        if i != 3:
            np.testing.assert_array_equal(image, np.full((4, 4), 40 * i, np.uint8))


def test_decode_many_with_info_and_declared_bits(tmp_path):
    values = np.array([[0, 1023]], np.uint16)
    write_png(tmp_path / "a.png", values)
    write_png(tmp_path / "b.png", values)
    results = list(images.decode_many([tmp_path / "a.png", tmp_path / "b.png"], None, declared_bits=[10, None],
                                      with_info=True, progress=False))
    assert [r[2].bit_depth for r in results] == [10, 12]
    np.testing.assert_array_equal(results[0][0], [[0, 255]])
    with pytest.raises(ValueError, match="2 paths"):
        list(images.decode_many([tmp_path / "a.png", tmp_path / "b.png"], None, declared_bits=[10]))


# --- one image, every lossless encoding: one model input (defect 1d) -------------------------------------------

def encodings(tmp_path, pixels: np.ndarray) -> dict:
    """The 8-bit `pixels` written every lossless way a collection stores them."""
    twelve = np.rint(pixels.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 12-bit data, no sBIT
    permutation = RNG.permutation(256)
    palette = [(int(v), int(v), int(v)) for v in permutation]
    alpha = RNG.integers(0, 256, pixels.shape).astype(np.uint8)
    files = {
        "gray8.png": write_png(tmp_path / "gray8.png", pixels),
        "png_named.jpg": write_png(tmp_path / "png_named.jpg", pixels),
        "gray12_in_16.png": write_png(tmp_path / "gray12_in_16.png", twelve),
        "gray16.png": write_png(tmp_path / "gray16.png", pixels.astype(np.uint16) * 257),
        "rgb16.png": write_png(tmp_path / "rgb16.png", np.stack([twelve] * 3, axis=-1)),
        "rgba.png": write_png(tmp_path / "rgba.png", np.stack([pixels] * 3 + [alpha], axis=-1)),
        "gray_alpha16.png": write_png(tmp_path / "gray_alpha16.png", np.stack([twelve, twelve], axis=-1)),
        "palette.png": write_png(tmp_path / "palette.png", np.argsort(permutation)[pixels].astype(np.uint8),
                                 palette=palette),
        "tiff": tmp_path / "image.tif",
        "monochrome2.dcm": write(dicom_dataset(twelve), tmp_path / "monochrome2.dcm"),
        "monochrome1.dcm": write(dicom_dataset((4095 - twelve).astype(np.uint16), photometric="MONOCHROME1"),
                                 tmp_path / "monochrome1.dcm"),
    }
    Image.fromarray(pixels).save(files["tiff"], format="TIFF")
    return files


def test_8bit_values_stored_at_higher_depth_map_back_exactly():
    """For every 8-bit value v and every depth of 9 to 16 bits: round(round(v (2**b - 1) / 255) 255 / (2**b - 1))
    = v, the reader's own mapping included (the stored value is off by at most 0.5, which the way back shrinks
    below 0.5)."""
    values = np.arange(256)
    for bits in range(9, 17):
        stored = np.rint(values * (2**bits - 1) / 255).astype(np.uint16)
        np.testing.assert_array_equal(np.rint(stored.astype(np.int64) * 255 / (2**bits - 1)), values)
        gray, used, _ = images.gray_8bit(stored[None, :], bit_depth=bits)
        assert used == bits
        np.testing.assert_array_equal(gray[0], values)


@pytest.mark.parametrize("resolution", [None, *RESOLUTIONS])
def test_every_lossless_encoding_of_the_same_pixels_gives_the_same_input(tmp_path, resolution):
    pixels = np.clip(np.cumsum(RNG.normal(0, 6, (400, 356)), axis=0) + 128, 0, 255).astype(np.uint8)
    pixels[::37] = RNG.integers(0, 256, pixels[::37].shape)  # edges and noise: rounding ties and their neighbours
    expected = pixels if resolution is None else resize.resize_gray(pixels, resolution)
    for name, path in encodings(tmp_path, pixels).items():
        for square in (False, True):
            got, info = images.load_gray_with_info(path, resolution, square=square)
            if square:  # the torchxrayvision contract: the centre square, then the same resize
                square_pixels = pixels[22:378]
                want = square_pixels if resolution is None else resize.resize_gray(square_pixels, resolution)
            else:
                want = expected
            np.testing.assert_array_equal(got, want, err_msg=f"{name} square={square}")
        assert (info.width, info.height) == (356, 400)


def test_16bit_source_is_mapped_to_8_bits_then_resized(tmp_path):
    values = RNG.integers(0, 65536, (32, 32)).astype(np.uint16)
    write_png(tmp_path / "g16.png", values)
    eight = np.rint(values / 65535.0 * 255.0)
    block_mean = eight.reshape(8, 4, 8, 4).mean(axis=(1, 3))  # an integer ratio: the area average is the mean
    np.testing.assert_array_equal(images.load_gray(tmp_path / "g16.png", 8), np.rint(block_mean))


# --- JPEG EXIF orientation (defect 1g) --------------------------------------------------------------------------

@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("colour", [False, True])
def test_exif_orientation_is_applied_as_pillows_exif_transpose(tmp_path, orientation, colour):
    """Both decode paths: gray JPEGs (imagecodecs) and colour JPEGs (Pillow)."""
    base = np.clip(np.cumsum(RNG.normal(0, 4, (30, 52)), axis=1) + 128, 0, 255).astype(np.uint8)
    base[:5, :9] = 255  # a corner mark
    array = np.stack([base, 255 - base, base // 2], axis=-1) if colour else base
    exif = Image.Exif()
    exif[file_formats.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(array).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "o.jpg") as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference).convert("L"))
    got, info = images.load_gray_with_info(tmp_path / "o.jpg", None)
    np.testing.assert_array_equal(got, expected)
    assert info.orientation == orientation
    assert (info.height, info.width) == expected.shape  # as displayed
    assert images.load_gray(tmp_path / "o.jpg", 16).shape == (16, 16)


# --- decompression bombs (defect 1j) ----------------------------------------------------------------------------

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_files(tmp_path) -> dict:
    """Small files whose headers declare far more pixels than any radiograph."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10 gigapixels, 8-bit gray
    png_bomb = (file_formats.PNG_SIGNATURE + png_chunk(b"IHDR", header)
                + png_chunk(b"IDAT", zlib.compress(bytes(100_001 * 50))) + png_chunk(b"IEND", b""))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.jpg")
    jpeg = bytearray((tmp_path / "small.jpg").read_bytes())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 65_000, 65_000)  # height, width
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.bmp")
    bmp = bytearray((tmp_path / "small.bmp").read_bytes())
    bmp[18:26] = struct.pack("<ii", 30_000, 30_000)
    ds = dicom_dataset(np.zeros((8, 8), np.uint16))
    ds.Rows, ds.Columns = 60_000, 60_000
    files = {"bomb.png": png_bomb, "bomb.jpg": bytes(jpeg), "bomb.bmp": bytes(bmp)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    write(ds, tmp_path / "bomb.dcm")
    return [tmp_path / name for name in (*files, "bomb.dcm")]


def test_decompression_bombs_are_refused_from_the_header_with_bounded_memory(tmp_path):
    for path in bomb_files(tmp_path):
        tracemalloc.start()
        try:
            message = images.check_image(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert message is not None and message.startswith(str(path)), message
        assert "pixels, above the limit max_pixels=100,000,000: refused before decoding" in message, message
        assert peak < 32 << 20, (path.name, peak)  # nothing of the declared size was allocated
    assert Image.MAX_IMAGE_PIXELS == images.DEFAULT_MAX_PIXELS


def test_max_pixels_is_an_option(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((40, 50), np.uint8))
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "a.tif")
    for name in ("a.png", "a.tif"):
        assert "declares 50 x 40 = 2,000 pixels" in images.check_image(tmp_path / name, max_pixels=1999)
        assert images.check_image(tmp_path / name, max_pixels=2000) is None
        assert images.check_image(tmp_path / name, max_pixels=None) is None
    results = list(images.decode_many([tmp_path / "a.png"], 8, max_pixels=1000, progress=False))
    assert "max_pixels=1,000" in results[0][1]



# --- PNG eXIf orientation and high-depth TIFF (issue 19 section 2) ---------------------------------------------

@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_png_exif_orientation_is_applied_as_pillows_exif_transpose(tmp_path, orientation):
    base = RNG.integers(0, 256, (5, 9), dtype=np.uint8)
    exif = Image.Exif()
    exif[file_formats.EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(base).save(tmp_path / "o.png", exif=exif.tobytes())  # an eXIf chunk
    with Image.open(tmp_path / "o.png") as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference))
    got, info = images.load_gray_with_info(tmp_path / "o.png", None)
    np.testing.assert_array_equal(got, expected)
    assert (info.orientation, info.height, info.width) == (orientation, *expected.shape)


def tiff_bytes(samples: np.ndarray, photometric: int, extra_samples: int = 0) -> bytes:
    """An uncompressed little-endian classic TIFF of uint16 samples (H, W) or (H, W, planes), one strip, written
    here from the TIFF 6.0 layout (an independent writer)."""
    samples = np.ascontiguousarray(samples, "<u2")
    height, width = samples.shape[:2]
    planes = 1 if samples.ndim == 2 else samples.shape[2]
    pixels = samples.tobytes()
    bits_offset = 8 + len(pixels)
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, planes, 16 if planes <= 2 else bits_offset),
               (259, 3, 1, 1), (262, 3, 1, photometric), (273, 4, 1, 8), (277, 3, 1, planes),
               (278, 3, 1, height), (279, 4, 1, len(pixels))]
    if extra_samples:
        entries.append((338, 3, 1, 2))  # unassociated alpha
    if planes == 2:  # two SHORTs fit in the entry itself
        entries[2] = (258, 3, 2, 16 | (16 << 16))
    bits = struct.pack(f"<{planes}H", *[16] * planes) if planes > 2 else b""
    ifd_offset = bits_offset + len(bits)
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + pixels + bits + ifd


@pytest.mark.parametrize("layout", ["rgb", "rgba", "gray", "gray_alpha", "miniswhite"])
def test_16_bit_tiff_is_read_at_full_depth(tmp_path, layout):
    """Pillow kept only the high byte of 16-bit colour TIFFs (and cannot open gray + alpha)."""
    planes = {"rgb": 3, "rgba": 4, "gray": 1, "gray_alpha": 2, "miniswhite": 1}[layout]
    samples = RNG.integers(0, 4096, (6, 7, planes)).astype(np.uint16)  # 12-bit data: the bit-depth rule says 12
    photometric = {"rgb": 2, "rgba": 2, "miniswhite": 0}.get(layout, 1)
    (tmp_path / "t.tif").write_bytes(tiff_bytes(samples if planes > 1 else samples[..., 0], photometric,
                                                extra_samples=planes in (2, 4)))
    colour = samples[..., :3] if planes >= 3 else samples[..., 0]
    luma = colour.astype(np.int64) @ [19595, 38470, 7471] if planes >= 3 else colour.astype(np.int64) * 65536
    expected = (2 * luma * 255 + 65536 * 4095) // (2 * 65536 * 4095)  # round(L * 255 / 4095), half up
    if layout == "miniswhite":
        expected = 255 - expected
    got, info = images.load_gray_with_info(tmp_path / "t.tif", None)
    np.testing.assert_array_equal(got, expected)
    assert (info.format, info.bit_depth) == ("tiff", 12)


def test_high_depth_tiff_of_another_photometric_is_refused_naming_it(tmp_path):
    (tmp_path / "cmyk.tif").write_bytes(tiff_bytes(np.zeros((2, 2, 4), np.uint16), photometric=5))
    message = images.check_image(tmp_path / "cmyk.tif")
    assert message.startswith(str(tmp_path / "cmyk.tif")) and "16-bit CMYK TIFF" in message


def test_an_sbit_chunk_after_the_image_data_is_ignored(tmp_path):
    """sBIT must precede IDAT; libpng and pypng ignore one that follows it, the reader applied it."""
    values = np.array([[0, 5000, 16383]], np.uint16)  # fits 14 bits; the data rule says 16 (samples above 4095)
    data = write_png(tmp_path / "a.png", values).read_bytes()
    iend = data.index(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:iend] + png_chunk(b"sBIT", b"\x0e") + data[iend:])
    expected = (2 * values.astype(np.int64) * 255 + 65535) // (2 * 65535)  # round(v * 255 / 65535), half up
    gray, info = images.load_gray_with_info(tmp_path / "late.png", None)
    np.testing.assert_array_equal(gray, expected)
    assert info.bit_depth == 16
