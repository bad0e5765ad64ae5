"""DICOM chest X-rays -> 8-bit gray, with the display rules of the DICOM standard.

`read_dicom(dataset, bit_depth=None, max_pixels=...)` returns (pixels uint8, bits_stored, rule); `parse(data)` reads
a file with the 128-byte preamble, `probe(data)` one without it. The rules, in the order they apply:

1. The file is read with pydicom (`force=True`). A file whose first bytes are no known signature is DICOM when
   pydicom parses it and finds Rows, Columns and PixelData (`probe`), whatever its first element (files without
   preamble start with a group 0002 or 0008 tag, or any other); TIFF and other signed formats are never tried. A
   file without file meta is decoded with the transfer syntax it was read with. Refused with a clear message: no
   pixel data; Rows x Columns above `max_pixels` (checked before any pixel is decoded); more than one frame
   (NumberOfFrames > 1); colour (SamplesPerPixel > 1 or a PhotometricInterpretation other than
   MONOCHROME1/MONOCHROME2); a compressed transfer syntax with no installed decoder (the message names the syntax
   and the packages that decode it); compressed pixel data that the installed decoders fail on (the message names
   the decoders tried and their errors: the data are corrupt or unusual, installing more will not help).
2. Modality LUT: Rescale Slope / Intercept (or a Modality LUT Sequence) turn stored values into output units.
3. VOI, the first of these that the file has (a multi-valued Window Center/Width uses the FIRST value; an element
   that is present but empty counts as absent):
   a. a VOI LUT Sequence (its first LUT; the output is scaled by the LUT's bit depth). It wins over a window
      because it is the more specific transform, as pydicom and most viewers decide;
   b. Window Center / Width with VOILUTFunction LINEAR (the default), LINEAR_EXACT or SIGMOID (DICOM PS3.3
      C.11.2.1.2), mapped straight to 0..255;
   c. neither: the range of the stored values BitsStored allows (0..2**bits - 1, or the signed range when
      PixelRepresentation = 1) is passed through the modality LUT and mapped linearly to 0..255, so contrast is
      the file's, never a per-image min/max stretch. `bit_depth` (the `--bit_depth` override) replaces BitsStored
      here for high-depth files (BitsStored > 8; stored values above it are an error); 8-bit files ignore it.
4. MONOCHROME1 (low values displayed white) is inverted, so the result is always MONOCHROME2: bright = dense.
5. The result is rounded once to 8 bits (numpy's rint). For 8-bit data stored at 10 to 16 bits, either
   photometric interpretation, this gives the 8-bit values back exactly (see images.py).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

from metachex_jax.imaging import file_formats

if TYPE_CHECKING:
    import pydicom

# pydicom is imported inside the functions that use it, on the first DICOM file: importing it takes about 0.3 s,
# which every spawned decoding worker of a build and every `predict` would otherwise pay, for the many collections
# that hold no DICOM (measured: a 128-image build of PNGs at about half speed).

# Decoders pydicom can use for compressed transfer syntaxes, and the pip packages that provide them.
DECODER_PACKAGES = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, JPEG-LS, JPEG 2000) or python-gdcm"


class DicomError(ValueError):
    """A DICOM file this reader refuses or cannot decode; the message says why."""


def parse(data: bytes) -> pydicom.Dataset:
    """The dataset of a DICOM file's bytes (with or without preamble)."""
    import pydicom  # on first use: see the comment at the top

    return pydicom.dcmread(io.BytesIO(data), force=True)


def probe(data: bytes) -> pydicom.Dataset | None:
    """The dataset when `data` parses as DICOM with Rows, Columns and PixelData, else None (not DICOM)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd element of a file that is no DICOM
            dataset = parse(data)
            plausible = ("PixelData" in dataset and int(dataset.get("Rows") or 0) > 0
                         and int(dataset.get("Columns") or 0) > 0)
    except Exception:  # noqa: BLE001 - any parse failure means: not a DICOM file
        return None
    return dataset if plausible else None


def read_dicom(dataset: pydicom.Dataset, bit_depth: int | None = None, *,
               max_pixels: int | None = None) -> tuple[np.ndarray, int, str]:
    """(gray uint8 (H, W), the bit depth used, the VOI rule applied); see the module docstring."""
    from pydicom.pixels import apply_modality_lut, apply_voi  # on first use: see the comment at the top

    ds = dataset
    _infer_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise DicomError("DICOM file has no pixel data (PixelData element missing)")
    file_formats.check_pixels(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames) is not supported: export the frame you want "
                         "as a single-frame file")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"colour DICOM (PhotometricInterpretation {photometric or 'missing'}, SamplesPerPixel "
                         f"{samples}) is not supported: chest X-rays are MONOCHROME1 or MONOCHROME2")
    stored = _stored_pixels(ds)
    if stored.ndim != 2:
        raise DicomError(f"expected a single gray frame, got pixel data of shape {stored.shape}")

    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    bits, note = bits_stored, ""
    if bit_depth and bit_depth != bits_stored:
        if bits_stored <= 8:
            note = f" (bit_depth={bit_depth} not applied: 8-bit file)"
        elif stored.size and int(stored.max()) >= 2**bit_depth:
            raise DicomError(f"bit_depth={bit_depth} was requested but samples reach {int(stored.max())} "
                             f"(> {2 ** bit_depth - 1})")
        else:
            bits = bit_depth
    values = np.asarray(apply_modality_lut(stored, ds), np.float64)
    center, width = _window_value(ds, "WindowCenter"), _window_value(ds, "WindowWidth")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # The LUT is indexed by (modality-transformed) integer values.
        out = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), np.float64)
        top = max(2.0 ** lut_bits - 1, float(out.max()))
        gray, rule = out * (255.0 / top), "VOI LUT sequence"
    elif center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        gray, rule = window(values, center, width, function), f"window {function} c={center:g} w={width:g}"
    else:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        span = np.asarray(apply_modality_lut(np.array([low, high]), ds), np.float64)
        lo, hi = float(span.min()), float(span.max())
        gray, rule = (values - lo) * (255.0 / max(hi - lo, 1e-12)), f"BitsStored range ({bits} bits){note}"
    gray = np.clip(gray, 0.0, 255.0)
    if photometric == "MONOCHROME1":
        gray = 255.0 - gray
        rule += ", MONOCHROME1 inverted"
    return np.rint(gray).astype(np.uint8), bits, rule


def _stored_pixels(ds) -> np.ndarray:
    """The stored values; a failure names its cause: no decoder installed for the syntax, or what the installed
    decoders said (corrupt data)."""
    from pydicom.pixels import get_decoder  # on first use: see the comment at the top

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DicomError(f"the compressed transfer syntax {syntax.name} ({syntax}) has no DICOM pixel decoder "
                             "(pydicom decodes none for it): convert the file to an uncompressed or JPEG-family "
                             "transfer syntax") from None
        if not decoder.is_available:
            raise DicomError(f"cannot decode the compressed transfer syntax {syntax.name} ({syntax}): no decoder "
                             f"is installed; install one: pip install {DECODER_PACKAGES}")
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom and its plugins raise many types for bad data
        if syntax.is_compressed:
            plugins = ", ".join(get_decoder(syntax).available_plugins)
            raise DicomError(f"the {syntax.name} pixel data cannot be decoded by the installed decoders "
                             f"({plugins}): the data are corrupt or unusual ({_one_line(exc)})") from exc
        raise DicomError(f"cannot decode the pixel data ({_one_line(exc)})") from exc


def _one_line(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())  # pydicom lists each plugin's error on its own line


def _window_value(ds, keyword: str) -> float | None:
    """The first value of Window Center / Width, or None when the element is absent or empty."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None or value == "" else _finite(value)


def _infer_transfer_syntax(ds) -> None:
    """Files without file meta (old archives) carry no Transfer Syntax UID; use the encoding pydicom read them with."""
    from pydicom.dataset import FileMetaDataset  # on first use: see the comment at the top
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window functions with output range 0..255."""
    if function == "LINEAR":
        if width < 1:
            raise DicomError(f"Window Width {width} < 1 is invalid for VOILUTFunction LINEAR")
        scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
        scaled = np.where(values <= center - 0.5 - (width - 1) / 2, 0.0, scaled)
        return np.where(values > center - 0.5 + (width - 1) / 2, 255.0, scaled)
    if width <= 0:
        raise DicomError(f"Window Width {width} <= 0 is invalid for VOILUTFunction {function}")
    if function == "LINEAR_EXACT":
        return np.clip(((values - center) / width + 0.5) * 255.0, 0.0, 255.0)
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    raise DicomError(f"unknown VOILUTFunction {function!r} (expected LINEAR, LINEAR_EXACT or SIGMOID)")


def _finite(value) -> float:
    """A window value as a finite float."""
    result = float(value)
    if not math.isfinite(result):
        raise DicomError(f"window value {value!r} is not a finite number")
    return result

