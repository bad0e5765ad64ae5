"""PNG decoding to 8-bit gray for every mode the raw copies use, resizing, and bad files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from metachex_jax.data import images

RNG = np.random.default_rng(0)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, computed independently of Pillow."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def test_8bit_gray_is_read_unchanged(tmp_path):
    pixels = RNG.integers(0, 256, (24, 40), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a.png")
    np.testing.assert_array_equal(images.load_gray(tmp_path / "a.png", None), pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_color_is_converted_with_luma_and_alpha_ignored(tmp_path, mode):
    rgb = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    if mode == "RGBA":
        alpha = RNG.integers(0, 256, (16, 16, 1), dtype=np.uint8)  # even a non-opaque alpha is dropped, not blended
        Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(tmp_path / "c.png")
    else:
        Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    gray = images.load_gray(tmp_path / "c.png", None)
    assert gray.dtype == np.uint8 and gray.shape == (16, 16)
    assert np.abs(gray.astype(float) - luma(rgb.astype(float))).max() <= 1.0


def test_gray_with_alpha_keeps_the_gray_channel(tmp_path):
    gray = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    alpha = np.full((16, 16), 255, np.uint8)
    Image.fromarray(np.stack([gray, alpha], -1), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(images.load_gray(tmp_path / "la.png", None), gray)


def test_palette_uses_the_palette_colours(tmp_path):
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [255, 255, 255]], np.uint8)
    indices = RNG.integers(0, 4, (12, 12), dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "p.png")
    expected = luma(palette.astype(float))[indices]
    assert np.abs(images.load_gray(tmp_path / "p.png", None) - expected).max() <= 1.0


def test_16bit_gray_is_scaled_by_its_bit_range_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768], [40000, 65535, 12345, 2]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")  # Pillow writes a 16-bit gray PNG
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    gray = images.load_gray(tmp_path / "g16.png", None)
    np.testing.assert_array_equal(gray, np.rint(values / 65535.0 * 255.0).astype(np.uint8))
    assert gray[0, 2] == 4  # 1000/65535*255: a clipping conversion would give 255


def test_32bit_int_mode_holding_16bit_samples():
    values = np.array([[0, 65535], [30000, 5]], np.int32)
    gray = images.resize_gray(images.to_gray(Image.fromarray(values, mode="I")), None)
    np.testing.assert_array_equal(gray, np.rint(values / 65535.0 * 255.0).astype(np.uint8))
    with pytest.raises(ValueError, match="outside 0..65535"):
        images.to_gray(Image.fromarray(np.array([[70000]], np.int32), mode="I"))


def _with_sbit(png: bytes, bits: int) -> bytes:
    """Insert an sBIT chunk after IHDR (Pillow cannot write one)."""
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I4s", 1, b"sBIT") + bytes([bits])
    chunk += struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])) & 0xFFFFFFFF)
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def test_12bit_data_in_16bit_png_uses_sbit_range(tmp_path):
    values = np.array([[0, 4095, 2048, 100]], np.uint16)
    Image.fromarray(values).save(tmp_path / "plain.png")
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), 12))
    assert images.png_significant_bits(tmp_path / "sbit.png") == 12
    assert images.png_significant_bits(tmp_path / "plain.png") is None
    expected = np.rint(values / 4095.0 * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(images.load_gray(tmp_path / "sbit.png", None), expected)
    assert images.load_gray_with_info(tmp_path / "sbit.png", None)[1].bit_depth_source == "png sBIT"


def test_12bit_data_in_16bit_png_without_sbit_is_not_black(tmp_path):
    """The bug this reader fixed: 0..4095 in a 16-bit PNG without sBIT was divided by 65535 (at most 16 of 255)."""
    values = np.array([[0, 4095, 2048, 100]], np.uint16)
    Image.fromarray(values).save(tmp_path / "plain.png")
    gray, info = images.load_gray_with_info(tmp_path / "plain.png", None)
    np.testing.assert_array_equal(gray, np.rint(values / 4095.0 * 255.0).astype(np.uint8))
    assert gray.max() == 255
    assert (info.format, info.bit_depth, info.bit_depth_source) == ("png", 12, "data")


def test_sbit_with_shifted_samples_is_16bit_data(tmp_path):
    """A writer that followed the PNG standard shifted 12-bit samples up: they exceed 4095, so 16 bits is right."""
    values = (np.array([[0, 4095, 2048, 100]], np.uint16) << 4)
    Image.fromarray(values).save(tmp_path / "plain.png")
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), 12))
    gray, info = images.load_gray_with_info(tmp_path / "sbit.png", None)
    np.testing.assert_array_equal(gray, np.rint(values / 65535.0 * 255.0).astype(np.uint8))
    assert (info.bit_depth, info.bit_depth_source) == (16, "data")


def test_precedence_override_then_metadata_then_sbit_then_data(tmp_path):
    values = np.array([[0, 1023, 512, 7]], np.uint16)  # 10-bit data (PadChest has 10- and 12-bit images)
    Image.fromarray(values).save(tmp_path / "plain.png")
    (tmp_path / "sbit.png").write_bytes(_with_sbit((tmp_path / "plain.png").read_bytes(), 11))

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
    with pytest.raises(images.ImageDecodeError, match="8-bit"):
        Image.fromarray(values.astype(np.uint8), mode="L").save(tmp_path / "eight.png")
        read("eight.png", bit_depth=12)


def test_format_is_decided_by_content_not_extension(tmp_path):
    pixels = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a_jpeg.png", format="JPEG", quality=100)
    Image.fromarray(pixels, mode="L").save(tmp_path / "a_png.JPG", format="PNG")
    Image.fromarray(pixels, mode="L").save(tmp_path / "UPPER.PNG", format="PNG")
    Image.fromarray(np.stack([pixels] * 3, -1), mode="RGB").save(tmp_path / "rgb_gray.png")
    jpeg, info = images.load_gray_with_info(tmp_path / "a_jpeg.png", None)
    assert info.format == "jpeg" and np.abs(jpeg.astype(int) - pixels).max() <= 8
    for name in ("a_png.JPG", "UPPER.PNG", "rgb_gray.png"):  # R = G = B: gray comes back exactly
        gray, info = images.load_gray_with_info(tmp_path / name, None)
        assert info.format == "png" and info.bit_depth == 8
        np.testing.assert_array_equal(gray, pixels)


def test_box_downscale_is_the_block_mean(tmp_path):
    pixels = RNG.integers(0, 256, (64, 48), dtype=np.uint8)  # non-square: aspect ratio is not preserved
    Image.fromarray(pixels, mode="L").save(tmp_path / "big.png")
    small = images.load_gray(tmp_path / "big.png", 16)
    assert small.shape == (16, 16)
    block_mean = pixels.reshape(16, 4, 16, 3).mean(axis=(1, 3))
    error = np.abs(small - block_mean)
    assert error.max() < 1.0 and error.mean() < 0.35  # Pillow's fixed-point weights: within one grey level


def test_16bit_downscale_rounds_once(tmp_path):
    values = RNG.integers(0, 65536, (32, 32)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    block_mean = (values / 65535.0 * 255.0).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.abs(images.load_gray(tmp_path / "g16.png", 8) - block_mean).max() <= 0.51


def test_truncated_empty_and_undecodable_files_raise_naming_the_file(tmp_path):
    Image.fromarray(RNG.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    reasons = {"truncated.png": "", "garbage.png": "not an image file", "empty.png": "empty"}
    for name, reason in reasons.items():
        with pytest.raises(images.ImageDecodeError, match=str(tmp_path / name)):
            images.load_gray(tmp_path / name, 16)
        assert str(tmp_path / name) in images.check_image(tmp_path / name)
        assert reason in images.check_image(tmp_path / name)
    assert images.check_image(tmp_path / "ok.png") is None


def test_decode_many_in_a_pool_keeps_order_and_reports_failures(tmp_path):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(paths[-1])
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
    Image.fromarray(values).save(tmp_path / "a.png")
    Image.fromarray(values).save(tmp_path / "b.png")
    results = list(images.decode_many([tmp_path / "a.png", tmp_path / "b.png"], None, declared_bits=[10, None],
                                      with_info=True, progress=False))
    assert [r[2].bit_depth for r in results] == [10, 12]
    np.testing.assert_array_equal(results[0][0], [[0, 255]])
    with pytest.raises(ValueError, match="2 paths"):
        list(images.decode_many([tmp_path / "a.png", tmp_path / "b.png"], None, declared_bits=[10]))


def test_fast_gray_decoder_gives_pillows_pixels(tmp_path):
    """Gray PNGs (8 and 16 bit) and gray JPEGs go through imagecodecs; the result is Pillow's, bit for bit."""
    from PIL import Image

    from metachex_jax.data import images as reader

    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(0, 3, (45, 61)), axis=1)
    eight = np.clip(smooth + 128, 0, 255).astype(np.uint8)
    sixteen = np.clip(smooth * 16 + 2000, 0, 4095).astype(np.uint16)
    paths = {"8.png": eight, "16.png": sixteen, "q75.jpg": eight, "q95.jpg": eight, "prog.jpg": eight}
    for name, array in paths.items():
        kwargs = {"quality": int(name[1:3])} if name.startswith("q") else {"progressive": True} if "prog" in name else {}
        Image.fromarray(array).save(tmp_path / name, **kwargs)
    for name in paths:
        head = (tmp_path / name).read_bytes()[:132]
        assert reader._decode_gray_fast(tmp_path / name, head) is not None  # the fast path is taken
        with Image.open(tmp_path / name) as image:
            image.load()
            expected, bits, source = reader._to_gray(image, reader.png_significant_bits(tmp_path / name),
                                                    bit_depth=None, declared_bits=None)
        for resolution in (None, 32):
            got, info = reader.load_gray_with_info(tmp_path / name, resolution)
            np.testing.assert_array_equal(got, reader.resize_gray(expected, resolution))
            assert (info.bit_depth, info.bit_depth_source) == (bits, source)
            assert (info.width, info.height) == (61, 45) and info.format == name.split(".")[1].replace("jpg", "jpeg")
    Image.fromarray(np.stack([eight] * 3, axis=-1)).save(tmp_path / "rgb.jpg")
    assert reader._decode_gray_fast(tmp_path / "rgb.jpg", (tmp_path / "rgb.jpg").read_bytes()[:132]) is None
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((tmp_path / "16.png").read_bytes()[:300])
    with pytest.raises(reader.ImageDecodeError, match=f"{truncated}: cannot decode image"):
        reader.load_gray(truncated, 32)
