"""DICOM input through the one image reader: the display rules of metachex_jax/data/dicom.py on files pydicom writes."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, MPEG2MPML, RLELossless,
                         generate_uid)

from metachex_jax.data import dicom, images

RNG = np.random.default_rng(0)


def make_dataset(pixels: np.ndarray, *, bits_stored: int = 12, photometric: str = "MONOCHROME2",
                 signed: bool = False, **elements) -> Dataset:
    """A single-frame DX image as pydicom writes it; `elements` are set on the dataset (e.g. WindowCenter)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[-1]
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    return ds


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
        path = write(make_dataset(values), tmp_path / f"p{preamble}.dcm", preamble)
        head = path.read_bytes()[:132]
        assert (head[128:132] == b"DICM") == preamble
        gray, info = read(path)
        np.testing.assert_array_equal(gray, stored_range_scale(values, 12))
        assert (info.format, info.bit_depth) == ("dicom", 12)
        assert info.bit_depth_source == "BitsStored range (12 bits)"
    # A dataset written with no file meta at all (implicit VR little endian, starting with a group 0008 tag).
    ds = make_dataset(values)
    del ds.file_meta
    ds.save_as(tmp_path / "bare", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "bare").read_bytes()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(read(tmp_path / "bare")[0], stored_range_scale(values, 12))
    # The override replaces BitsStored.
    np.testing.assert_array_equal(read(tmp_path / "pTrue.dcm", bit_depth=16)[0], stored_range_scale(values, 16))


def test_extension_does_not_matter(tmp_path):
    values = RNG.integers(0, 4096, (8, 8)).astype(np.uint16)
    write(make_dataset(values), tmp_path / "image.png")  # a DICOM named .png
    np.testing.assert_array_equal(read(tmp_path / "image.png")[0], stored_range_scale(values, 12))


def test_monochrome1_is_inverted(tmp_path):
    values = np.array([[0, 4095, 1000]], np.uint16)
    write(make_dataset(values, photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    gray, info = read(tmp_path / "m1.dcm")
    np.testing.assert_array_equal(gray, 255 - stored_range_scale(values, 12))
    assert "MONOCHROME1 inverted" in info.bit_depth_source


def test_rescale_then_stored_range(tmp_path):
    """Slope/intercept move the output range too, so without a window the result is the stored-range scaling."""
    values = np.array([[0, 4095, 1000]], np.uint16)
    write(make_dataset(values, RescaleSlope=2, RescaleIntercept=-1024), tmp_path / "r.dcm")
    np.testing.assert_array_equal(read(tmp_path / "r.dcm")[0], stored_range_scale(values, 12))


def test_signed_pixels_use_the_signed_range(tmp_path):
    values = np.array([[-2048, 2047, 0]], np.int16)
    write(make_dataset(values, signed=True), tmp_path / "s.dcm")
    expected = np.rint((values.astype(np.float64) + 2048) * 255.0 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(read(tmp_path / "s.dcm")[0], expected)


def linear_window(x, c, w):
    """DICOM PS3.3 C.11.2.1.2.1, written out independently."""
    x = np.asarray(x, np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.clip(np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y)), 0, 255)


def test_window_after_rescale_first_of_multiple_values(tmp_path):
    values = np.array([[0, 500, 1000, 1500, 2000, 4095]], np.uint16)
    ds = make_dataset(values, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=[0, 400], WindowWidth=[2000, 50])
    write(ds, tmp_path / "w.dcm")
    gray, info = read(tmp_path / "w.dcm")
    expected = np.rint(linear_window(values.astype(np.float64) - 1000, 0, 2000)).astype(np.uint8)
    np.testing.assert_array_equal(gray, expected)
    assert info.bit_depth_source == "window LINEAR c=0 w=2000"


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions(tmp_path, function):
    values = np.array([[0, 1000, 2000, 3000, 4095]], np.uint16)
    write(make_dataset(values, WindowCenter=2000, WindowWidth=1000, VOILUTFunction=function), tmp_path / "f.dcm")
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
    ds = make_dataset(values, WindowCenter=2000, WindowWidth=100)
    ds.VOILUTSequence = Sequence([item])
    write(ds, tmp_path / "lut.dcm")
    gray, info = read(tmp_path / "lut.dcm")
    np.testing.assert_array_equal(gray, [[255, 128, 64, 0, 0]])  # values past the LUT take its last entry
    assert info.bit_depth_source == "VOI LUT sequence"


def test_rle_compressed_is_decoded(tmp_path):
    values = RNG.integers(0, 4096, (16, 16)).astype(np.uint16)
    ds = make_dataset(values)
    ds.compress(RLELossless)
    write(ds, tmp_path / "rle.dcm")
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read(tmp_path / "rle.dcm")[0], stored_range_scale(values, 12))


def test_jpeg2000_compressed_is_decoded_by_the_pylibjpeg_plugin(tmp_path):
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg is not installed")
    from pydicom.uid import JPEG2000Lossless

    values = RNG.integers(0, 4096, (64, 64)).astype(np.uint16)  # openjpeg refuses very small images
    ds = make_dataset(values)
    ds.compress(JPEG2000Lossless)
    write(ds, tmp_path / "j2k.dcm")
    np.testing.assert_array_equal(read(tmp_path / "j2k.dcm")[0], stored_range_scale(values, 12))


def test_refusals_name_the_file_and_the_reason(tmp_path):
    gray8 = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
    write(make_dataset(gray8, bits_stored=8, NumberOfFrames=2), tmp_path / "multi.dcm")
    write(make_dataset(np.stack([gray8] * 3, -1), bits_stored=8, photometric="RGB"), tmp_path / "colour.dcm")
    ds = make_dataset(gray8, bits_stored=8)
    del ds.PixelData
    write(ds, tmp_path / "nopixels.dcm")
    ds = make_dataset(gray8, bits_stored=8)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # a video syntax: no installable decoder handles it
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    write(ds, tmp_path / "mpeg.dcm")
    full = write(make_dataset(gray8, bits_stored=8), tmp_path / "ok.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(full[:-10])
    expected = {
        "multi.dcm": "multi-frame DICOM (2 frames)",
        "colour.dcm": "colour DICOM (PhotometricInterpretation RGB",
        "nopixels.dcm": "no pixel data",
        "mpeg.dcm": "compressed transfer syntax MPEG2",
        "truncated.dcm": "cannot decode",
    }
    for name, reason in expected.items():
        message = images.check_image(tmp_path / name)
        assert message is not None and message.startswith(str(tmp_path / name)), (name, message)
        assert reason in message, (name, message)
    assert "pip install" in images.check_image(tmp_path / "mpeg.dcm")
    assert images.check_image(tmp_path / "ok.dcm") is None


def test_window_function_rejects_bad_widths():
    with pytest.raises(dicom.DicomError, match="Window Width 0.5"):
        dicom.window(np.zeros(2), 10, 0.5)
    with pytest.raises(dicom.DicomError, match="unknown VOILUTFunction"):
        dicom.window(np.zeros(2), 10, 20, "CUBIC")


def test_dicom_resized_like_any_other_image(tmp_path):
    values = np.zeros((32, 32), np.uint16)
    values[:16] = 4095
    write(make_dataset(values), tmp_path / "big.dcm")
    small = images.load_gray(tmp_path / "big.dcm", 8)
    np.testing.assert_array_equal(small[:4], 255)
    np.testing.assert_array_equal(small[4:], 0)
