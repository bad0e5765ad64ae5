"""DICOM input through the one image reader: the display rules of metachex_jax/data/dicom.py on files pydicom writes,
the stored values checked against GDCM (an independent decoder; the reader is built on pydicom)."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from dataset_trees import dicom_dataset
from metachex_jax.imaging import dicom, images

RNG = np.random.default_rng(0)


def write(ds: Dataset, path, preamble: bool = True):
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.preamble = None
        ds.save_as(path, enforce_file_format=False)
    return path


def read(path, **kw):
    gray, info = images.load_gray_with_info(path, None, **kw)
    return gray, info


def stored_range_scale(values, bits):
    return np.rint(np.asarray(values, np.float64) * 255.0 / (2 ** bits - 1)).astype(np.uint8)


def test_bits_stored_range_maps_linearly_with_or_without_preamble(tmp_path):
    values = np.array([[0, 4095], [2048, 100]], np.uint16)
    for preamble in (True, False):
        path = write(dicom_dataset(values), tmp_path / f"p{preamble}.dcm", preamble)
        head = path.read_bytes()[:132]
        assert (head[128:132] == b"DICM") == preamble
        gray, info = read(path)
        np.testing.assert_array_equal(gray, stored_range_scale(values, 12))
        assert (info.format, info.bit_depth) == ("dicom", 12)
        assert info.bit_depth_source == "BitsStored range (12 bits)"
    # A dataset written with no file meta at all (implicit VR little endian, starting with a group 0008 tag).
    ds = dicom_dataset(values)
    del ds.file_meta
    ds.save_as(tmp_path / "bare", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "bare").read_bytes()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(read(tmp_path / "bare")[0], stored_range_scale(values, 12))
    # The override replaces BitsStored.
    np.testing.assert_array_equal(read(tmp_path / "pTrue.dcm", bit_depth=16)[0], stored_range_scale(values, 16))


def test_extension_does_not_matter(tmp_path):
    values = RNG.integers(0, 4096, (8, 8)).astype(np.uint16)
    write(dicom_dataset(values), tmp_path / "image.png")  # a DICOM named .png
    np.testing.assert_array_equal(read(tmp_path / "image.png")[0], stored_range_scale(values, 12))


def test_monochrome1_is_inverted(tmp_path):
    values = np.array([[0, 4095, 1000]], np.uint16)
    write(dicom_dataset(values, photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    gray, info = read(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(gray, 255 - stored_range_scale(values, 12))
    assert "MONOCHROME1 inverted" in info.bit_depth_source


def test_rescale_then_stored_range(tmp_path):
    """Slope/intercept move the output range too, so without a window the result is the stored-range scaling."""
    values = np.array([[0, 4095, 1000]], np.uint16)
    write(dicom_dataset(values, RescaleSlope=2, RescaleIntercept=-1024), tmp_path / "r.dcm")
    np.testing.assert_array_equal(read(tmp_path / "r.dcm")[0], stored_range_scale(values, 12))


def test_signed_pixels_use_the_signed_range(tmp_path):
    values = np.array([[-2048, 2047, 0]], np.int16)
    write(dicom_dataset(values, signed=True), tmp_path / "s.dcm")
    expected = np.rint((values.astype(np.float64) + 2048) * 255.0 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(read(tmp_path / "s.dcm")[0], expected)


def linear_window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2.1, written out independently."""
    x = np.asarray(x, np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.clip(np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y)), 0, 255)


def test_window_after_rescale_first_of_multiple_values(tmp_path):
    values = np.array([[0, 500, 1000, 1500, 2000, 4095]], np.uint16)
    ds = dicom_dataset(values, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=[0, 400], WindowWidth=[2000, 50])
    write(ds, tmp_path / "w.dcm")
    gray, info = read(tmp_path / "w.dcm")
    expected = np.rint(linear_window(values.astype(np.float64) - 1000, 0, 2000)).astype(np.uint8)
    np.testing.assert_array_equal(gray, expected)
    assert info.bit_depth_source == "window LINEAR c=0 w=2000"


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions(tmp_path, function):
    values = np.array([[0, 1000, 2000, 3000, 4095]], np.uint16)
    write(dicom_dataset(values, WindowCenter=2000, WindowWidth=1000, VOILUTFunction=function), tmp_path / "f.dcm")
    x = values.astype(np.float64)
    if function == "LINEAR_EXACT":
        expected = np.clip(((x - 2000) / 1000 + 0.5) * 255, 0, 255)
    else:
        expected = 255 / (1 + np.exp(-4 * (x - 2000) / 1000))
    np.testing.assert_array_equal(read(tmp_path / "f.dcm")[0], np.rint(expected).astype(np.uint8))


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
    values = np.array([[0, 1, 2, 3, 10]], np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]  # 4 entries, first mapped value 0, 8 bits per entry
    item.add_new(0x00283006, "US", [255, 128, 64, 0])  # LUTData: an inverting LUT
    ds = dicom_dataset(values, WindowCenter=2000, WindowWidth=100)
    ds.VOILUTSequence = Sequence([item])
    write(ds, tmp_path / "lut.dcm")
    gray, info = read(tmp_path / "lut.dcm")
    np.testing.assert_array_equal(gray, [[255, 128, 64, 0, 0]])  # values past the LUT take its last entry
    assert info.bit_depth_source == "VOI LUT sequence"


def test_rle_compressed_is_decoded(tmp_path):
    values = RNG.integers(0, 4096, (16, 16)).astype(np.uint16)
    ds = dicom_dataset(values)
    ds.compress(RLELossless)
    write(ds, tmp_path / "rle.dcm")
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read(tmp_path / "rle.dcm")[0], stored_range_scale(values, 12))


def test_jpeg2000_compressed_is_decoded_by_the_pylibjpeg_plugin(tmp_path):
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg is not installed")
    from pydicom.uid import JPEG2000Lossless

    values = RNG.integers(0, 4096, (64, 64)).astype(np.uint16)  # openjpeg refuses very small images
    ds = dicom_dataset(values)
    ds.compress(JPEG2000Lossless)
    write(ds, tmp_path / "j2k.dcm")
    np.testing.assert_array_equal(read(tmp_path / "j2k.dcm")[0], stored_range_scale(values, 12))


def test_refusals_name_the_file_and_the_reason(tmp_path):
    gray8 = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    write(dicom_dataset(gray8, bits_stored=8, NumberOfFrames=2), tmp_path / "multi.dcm")
    write(dicom_dataset(np.stack([gray8] * 3, -1), bits_stored=8, photometric="RGB"), tmp_path / "colour.dcm")
    ds = dicom_dataset(gray8, bits_stored=8)
    del ds.PixelData
    write(ds, tmp_path / "nopixels.dcm")
    ds = dicom_dataset(gray8, bits_stored=8)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # a video syntax: no installable decoder handles it
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    write(ds, tmp_path / "mpeg.dcm")
    full = write(dicom_dataset(gray8, bits_stored=8), tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(full[:-10])
    expected = {
        "multi.dcm": "multi-frame DICOM (2 frames)",
        "colour.dcm": "colour DICOM (PhotometricInterpretation RGB",
        "nopixels.dcm": "no pixel data",
        "mpeg.dcm": "compressed transfer syntax MPEG2",  # (no decoder for it exists)
        "truncated.dcm": "cannot decode",
    }
    for name, reason in expected.items():
        message = images.check_image(tmp_path / name)
        assert message is not None and message.startswith(str(tmp_path / name)), (name, message)
        assert reason in message, (name, message)
    assert "has no DICOM pixel decoder" in images.check_image(tmp_path / "mpeg.dcm")  # none exists: no install tip
    assert "pip install" not in images.check_image(tmp_path / "mpeg.dcm")
    assert images.check_image(tmp_path / "ok.dcm") is None


def test_window_function_rejects_bad_widths():
    with pytest.raises(dicom.DicomError, match="Window Width 0.5"):
        dicom.window(np.zeros(2), 10, 0.5)
    with pytest.raises(dicom.DicomError, match="unknown VOILUTFunction"):
        dicom.window(np.zeros(2), 10, 20, "CUBIC")


def test_dicom_resized_like_any_other_image(tmp_path):
    values = np.zeros((32, 32), np.uint16)
    values[:16] = 4095
    write(dicom_dataset(values), tmp_path / "big.dcm")
    small = images.load_gray(tmp_path / "big.dcm", 8)
    np.testing.assert_array_equal(small[:4], 255)
    np.testing.assert_array_equal(small[4:], 0)


def test_corrupt_jpeg2000_names_the_decoders_tried_not_an_install(tmp_path):
    """Defect 1h: a corrupt JPEG 2000 file was reported as "install a decoder" although decoders are installed."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    ds = dicom_dataset(RNG.integers(0, 4096, (64, 64)).astype(np.uint16))
    ds.compress(JPEG2000Lossless)
    data = bytearray(write(ds, tmp_path / "j2k.dcm").read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51") + 6  # the codestream's image size: zeroed
    data[siz:siz + 14] = bytes(14)
    (tmp_path / "corrupt.dcm").write_bytes(bytes(data))
    message = images.check_image(tmp_path / "corrupt.dcm")
    assert "pylibjpeg" in get_decoder(JPEG2000Lossless).available_plugins and message.startswith(
        str(tmp_path / "corrupt.dcm"))
    # pylibjpeg (a dependency) decodes every syntax it handles, whatever else is installed
    assert "cannot be decoded by the installed decoders (pylibjpeg): the data are corrupt" in message
    assert "pip install" not in message and "\n" not in message
    assert images.check_image(tmp_path / "j2k.dcm") is None


def test_empty_window_elements_count_as_absent(tmp_path):
    """Defect 1e: Window Center / Width present but empty raised TypeError."""
    values = np.array([[0, 4095], [2048, 100]], np.uint16)
    ds = dicom_dataset(values)
    ds.add_new(0x00281050, "DS", None)  # Window Center, empty
    ds.add_new(0x00281051, "DS", None)  # Window Width, empty
    write(ds, tmp_path / "empty.dcm")
    reread = pydicom.dcmread(tmp_path / "empty.dcm")
    assert "WindowCenter" in reread and reread.WindowCenter in (None, "")
    gray, info = read(tmp_path / "empty.dcm")
    np.testing.assert_array_equal(gray, stored_range_scale(values, 12))
    assert info.bit_depth_source == "BitsStored range (12 bits)"
    ds.WindowCenter = 2048  # a width without a centre: no window either
    write(ds, tmp_path / "half.dcm")
    np.testing.assert_array_equal(read(tmp_path / "half.dcm")[0], stored_range_scale(values, 12))


@pytest.mark.parametrize("first", ["patient", "image"])
def test_dicom_without_preamble_is_recognised_by_parsing_whatever_its_first_element(tmp_path, first):
    """Defect 1f: a file without preamble whose first element is not in group 0002 or 0008 was "not an image"."""
    values = RNG.integers(0, 4096, (9, 7)).astype(np.uint16)
    ds = dicom_dataset(values)
    del ds.file_meta
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Modality"):  # group 0008
        delattr(ds, keyword)
    if first == "patient":
        ds.PatientName = "Anonymous"  # (0010,0010)
    for implicit in (True, False):
        path = tmp_path / f"{first}{implicit}"
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        assert path.read_bytes()[:2] == (b"\x10\x00" if first == "patient" else b"\x28\x00")
        gray, info = read(path)
        np.testing.assert_array_equal(gray, stored_range_scale(values, 12))
        assert info.format == "dicom"


def test_tiff_and_random_bytes_are_not_taken_for_dicom(tmp_path):
    pixels = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.dcm", format="TIFF")  # named like a DICOM
    gray, info = read(tmp_path / "image.dcm")
    assert info.format == "tiff"
    np.testing.assert_array_equal(gray, pixels)
    rng = np.random.default_rng(3)
    for i in range(20):
        (tmp_path / f"random{i}").write_bytes(rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8)
                                              .tobytes())
        assert dicom.probe((tmp_path / f"random{i}").read_bytes()) is None
        assert "not an image file this reader knows" in images.check_image(tmp_path / f"random{i}")
    # Random bytes after a DICOM-like first tag are not DICOM either (no Rows, Columns, PixelData).
    (tmp_path / "tagged").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + rng.integers(0, 256, 500,
                                      dtype=np.uint8).tobytes())
    assert dicom.probe((tmp_path / "tagged").read_bytes()) is None


def test_bit_depth_override_on_dicom_applies_to_high_depth_files_only(tmp_path):
    eight = RNG.integers(0, 256, (4, 4)).astype(np.uint8)
    write(dicom_dataset(eight, bits_stored=8), tmp_path / "eight.dcm")
    gray, info = read(tmp_path / "eight.dcm", bit_depth=12)
    np.testing.assert_array_equal(gray, eight)
    assert (info.bit_depth, info.bit_depth_source) == (8, "BitsStored range (8 bits) (bit_depth=12 not applied: "
                                                          "8-bit file)")
    twelve = np.array([[0, 4095]], np.uint16)
    write(dicom_dataset(twelve), tmp_path / "twelve.dcm")
    with pytest.raises(images.ImageDecodeError, match="bit_depth=10 was requested but samples reach 4095"):
        read(tmp_path / "twelve.dcm", bit_depth=10)


def gdcm_stored_values(path) -> np.ndarray:
    """The stored values as GDCM decodes them (uncompressed, RLE, JPEG 2000)."""
    gdcm = pytest.importorskip("gdcm", reason="python-gdcm (the test extra) is not installed")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read(), path
    image = reader.GetImage()
    buffer = image.GetBuffer().encode("utf-8", "surrogateescape")  # python-gdcm returns the bytes as a str
    kind = {"UINT16": np.uint16, "INT16": np.int16, "UINT8": np.uint8}[image.GetPixelFormat().GetScalarTypeAsString()]
    return np.frombuffer(buffer, kind).reshape(image.GetDimension(1), image.GetDimension(0))


@pytest.mark.parametrize("syntax", ["uncompressed", "RLE", "JPEG 2000"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_pixels_agree_with_gdcm_after_the_documented_mapping(tmp_path, syntax, photometric):
    from pydicom.uid import JPEG2000Lossless

    values = RNG.integers(0, 4096, (64, 48)).astype(np.uint16)
    ds = dicom_dataset(values, photometric=photometric, RescaleSlope=1, RescaleIntercept=0)
    if syntax != "uncompressed":
        ds.compress(RLELossless if syntax == "RLE" else JPEG2000Lossless)
    write(ds, tmp_path / "x.dcm")
    stored = gdcm_stored_values(tmp_path / "x.dcm")
    expected = stored_range_scale(stored, 12)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_array_equal(read(tmp_path / "x.dcm")[0], expected)


# --- defects the reader's fuzzing found (tests/reader_fuzz.py) ---------------------------------------------------

def test_an_8_bit_voi_lut_indexes_every_value_not_the_low_byte(tmp_path):
    """An 8-bit VOI LUT of more than 256 entries: pydicom's apply_voi indexed it through uint8, so a value 256 or
    more past the first mapped value read another entry."""
    values = np.arange(0, 700, dtype=np.uint16).reshape(20, 35)
    table = [int(v) for v in RNG.integers(0, 256, 600)]
    item = Dataset()
    item.LUTDescriptor = [600, 0, 8]
    item.add_new(0x00283006, "US", table)
    ds = dicom_dataset(values, bits_stored=16)
    ds.VOILUTSequence = Sequence([item])
    gray, info = read(write(ds, tmp_path / "lut.dcm"))
    expected = np.array(table, np.uint8)[np.minimum(values, 599)]  # past the LUT: its last entry
    np.testing.assert_array_equal(gray, expected)  # 8-bit entries are 0..255 already
    assert info.bit_depth_source == "VOI LUT sequence"


@pytest.mark.parametrize("slope", ["NaN", "0", "inf"])
def test_a_rescale_slope_that_is_no_usable_number_is_refused(tmp_path, slope):
    """A NaN or 0 slope gave an all-black image without an error."""
    ds = dicom_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4), RescaleSlope=slope, RescaleIntercept="0")
    message = images.check_image(write(ds, tmp_path / "slope.dcm"))
    assert message is not None and message.startswith(str(tmp_path / "slope.dcm"))
    assert "Rescale Slope is 0" in message or "not a finite number" in message


def _encapsulated(values: np.ndarray, frame: bytes, syntax, bits: int) -> Dataset:
    ds = dicom_dataset(values, bits_stored=bits)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless])
def test_a_cut_jpeg_frame_is_refused_not_filled_in(tmp_path, syntax):
    """A JPEG, JPEG-LS or JPEG 2000 frame cut short (its fragment well formed): libjpeg filled the missing rows and
    CharLS gave zeros without an error."""
    values = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8 if syntax == JPEGBaseline8Bit else np.uint16)
    frame = {JPEGBaseline8Bit: lambda: imagecodecs.jpeg8_encode(values),
             JPEGLSLossless: lambda: imagecodecs.jpegls_encode(values),
             JPEG2000Lossless: lambda: imagecodecs.jpeg2k_encode(values, codecformat="J2K", reversible=True,
                                                                 level=0)}[syntax]()
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    write(_encapsulated(values, frame, syntax, bits), tmp_path / "whole.dcm")
    assert images.check_image(tmp_path / "whole.dcm") is None
    cut = frame[:len(frame) * 2 // 3]
    write(_encapsulated(values, cut + b"\x00" * (len(cut) % 2), syntax, bits), tmp_path / "cut.dcm")
    message = images.check_image(tmp_path / "cut.dcm")
    assert message is not None and message.startswith(str(tmp_path / "cut.dcm"))
    assert "truncated" in message


def test_an_element_of_an_undefined_value_representation_is_refused(tmp_path):
    """A damaged header (an explicit VR that DICOM does not define) read on as if nothing were wrong."""
    data = bytearray(write(dicom_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4), Modality="DX"),
                           tmp_path / "good.dcm").read_bytes())
    at = data.index(b"\x08\x00\x60\x00CS")  # Modality (0008,0060), VR CS
    data[at + 4:at + 6] = b"QQ"
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    message = images.check_image(tmp_path / "bad.dcm")
    assert message is not None and message.startswith(str(tmp_path / "bad.dcm")) and "'QQ'" in message


def test_file_meta_without_its_transfer_syntax_is_refused(tmp_path):
    """A flipped byte turned (0002,0010) into another tag: the file was read with a guessed transfer syntax, where
    GDCM refuses it."""
    data = bytearray(write(dicom_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4)), tmp_path / "a.dcm")
                     .read_bytes())
    at = data.index(b"\x02\x00\x10\x00UI")  # Transfer Syntax UID
    data[at:at + 2] = b"\x41\x00"
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    message = images.check_image(tmp_path / "bad.dcm")
    assert message is not None and message.startswith(str(tmp_path / "bad.dcm"))
    assert "damaged DICOM header" in message  # (the file meta elements after it were read into the data set too)


def test_an_encapsulated_fragment_longer_than_the_pixel_data_is_refused(tmp_path):
    """Bytes lost inside a JPEG-LS or JPEG lossless fragment (its length unchanged): the fragment ran into the
    sequence delimiter and the decoders read what was left without an error."""
    values = (np.arange(32 * 32).reshape(32, 32) % 4000).astype(np.uint16)
    frame = imagecodecs.jpegls_encode(values)
    data = write(_encapsulated(values, frame, JPEGLSLossless, 12), tmp_path / "whole.dcm").read_bytes()
    assert images.check_image(tmp_path / "whole.dcm") is None
    middle = data.index(frame) + len(frame) // 2
    (tmp_path / "lost.dcm").write_bytes(data[:middle] + data[middle + 10:])
    message = images.check_image(tmp_path / "lost.dcm")
    assert message is not None and "item 1 of the encapsulated pixel data runs past its end" in message


def test_a_sequence_item_whose_length_lies_is_refused(tmp_path):
    """A VOI LUT Sequence item's length changed (its tag changed too, so the reader would not use it): GDCM refuses
    the file, the reader read it."""
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.add_new(0x00283006, "US", [255, 128, 64, 0])
    ds = dicom_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4))
    ds.VOILUTSequence = Sequence([item])
    data = bytearray(write(ds, tmp_path / "a.dcm").read_bytes())
    at = data.index(b"\x28\x00\x10\x30SQ")
    data[at + 2] = 0x17  # (0028,3017): no known element
    data[at + 16] = 5  # the item's length (bytes 12-15 after the SQ's own header) now 5
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    message = images.check_image(tmp_path / "bad.dcm")
    assert message is not None and "item 1 of the sequence (0028,3017)" in message


@pytest.mark.parametrize("preamble", [True, False])
def test_a_few_bytes_after_the_last_element_are_refused(tmp_path, preamble):
    """1 to 7 bytes after the pixel data (a cut element): pydicom drops them without a word, GDCM refuses the file."""
    data = write(dicom_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4)), tmp_path / "a.dcm", preamble)
    assert images.check_image(data) is None
    (tmp_path / "tail.dcm").write_bytes(data.read_bytes() + b"\xe0\x7f\x10\x00")
    message = images.check_image(tmp_path / "tail.dcm")
    assert message is not None and "4 bytes after its last element" in message


def test_a_file_meta_group_read_as_part_of_the_data_set_is_refused(tmp_path):
    """A damaged first file meta tag: pydicom then reads no file meta and takes group 0002 into the data set, and
    the reader decoded JPEG frames as native pixels with a guessed transfer syntax; GDCM fails on the file."""
    data = bytearray(write(dicom_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4)), tmp_path / "a.dcm")
                     .read_bytes())
    assert data[132:134] == b"\x02\x00"  # (0002,0000), the first file meta element
    data[132] = 0x25
    (tmp_path / "bad.dcm").write_bytes(bytes(data))
    message = images.check_image(tmp_path / "bad.dcm")
    assert message is not None and "file meta elements (group 0002) inside the data set" in message


def test_encapsulated_pixel_data_under_an_uncompressed_syntax_are_refused(tmp_path):
    """The start of a JPEG 2000 file lost (its preamble, DICM and file meta group length): pydicom read it without
    file meta, the syntax was guessed as uncompressed and the codestream's bytes came out as pixels."""
    values = (np.arange(16 * 16).reshape(16, 16) % 500).astype(np.uint16)
    frame = imagecodecs.jpeg2k_encode(values, codecformat="J2K", reversible=True, level=0)
    data = write(_encapsulated(values, frame, JPEG2000Lossless, 12), tmp_path / "whole.dcm").read_bytes()
    assert images.check_image(tmp_path / "whole.dcm") is None
    (tmp_path / "lost.dcm").write_bytes(data[:116] + data[140:])
    message = images.check_image(tmp_path / "lost.dcm")
    assert message is not None and "encapsulated (compressed) pixel data, but the transfer syntax is" in message


def test_a_voi_lut_is_indexed_by_the_rounded_modality_output(tmp_path):
    """A non-integer rescale before a VOI LUT: the nearest entry, ties to even (PS3.3 leaves the rounding open)."""
    values = np.array([[0, 1, 2, 3]], np.uint16)
    item = Dataset()
    item.LUTDescriptor = [8, 0, 8]
    item.add_new(0x00283006, "US", [0, 10, 20, 30, 40, 50, 60, 70])
    ds = dicom_dataset(values, RescaleSlope="1.5", RescaleIntercept="0.25")  # 0.25, 1.75, 3.25, 4.75
    ds.VOILUTSequence = Sequence([item])
    gray, _ = read(write(ds, tmp_path / "lut.dcm"))
    np.testing.assert_array_equal(gray, [[0, 20, 30, 50]])
