"""DICOM chest X-rays -> gray on a 0..255 scale (float32), with the display rules of the DICOM standard.

`read_dicom(path, bit_depth=None)` returns (pixels, bits_stored, rule). The rules, in the order they apply:

1. The file is read with pydicom (`force=True`, so files without the 128-byte preamble are read too; a file
   without file meta is decoded with the transfer syntax it was read with). Refused
   with a clear message: no pixel data; more than one frame (NumberOfFrames > 1); colour (SamplesPerPixel > 1 or a
   PhotometricInterpretation other than MONOCHROME1/MONOCHROME2); a compressed transfer syntax no installed
   decoder handles (the message names the syntax and the packages that decode it).
2. Modality LUT: Rescale Slope / Intercept (or a Modality LUT Sequence) turn stored values into output units.
3. VOI, the first of these that the file has (a multi-valued Window Center/Width uses the FIRST value):
   a. a VOI LUT Sequence (its first LUT; the output is scaled by the LUT's bit depth). It wins over a window
      because it is the more specific transform, as pydicom and most viewers decide;
   b. Window Center / Width with VOILUTFunction LINEAR (the default), LINEAR_EXACT or SIGMOID (DICOM PS3.3
      C.11.2.1.2), mapped straight to 0..255;
   c. neither: the range of the stored values BitsStored allows (0..2**bits - 1, or the signed range when
      PixelRepresentation = 1) is passed through the modality LUT and mapped linearly to 0..255, so contrast is
      the file's, never a per-image min/max stretch. `bit_depth` (the `--bit_depth` override) replaces BitsStored
      here.
4. MONOCHROME1 (low values displayed white) is inverted, so the result is always MONOCHROME2: bright = dense.
"""

from __future__ import annotations

import math
import os

import numpy as np

# Decoders pydicom can use for compressed transfer syntaxes, and the pip packages that provide them.
DECODER_PACKAGES = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (JPEG, JPEG-LS, JPEG 2000) or python-gdcm"


class DicomError(ValueError):
    """A DICOM file this reader refuses or cannot decode; the message says why."""


def is_dicom(head: bytes) -> bool:
    """DICOM by content: 'DICM' after the 128-byte preamble, or (no preamble) a group 0x0002/0x0008 tag first.

    Without a preamble the file starts with an explicit- or implicit-VR little-endian tag of group 0002 (file
    meta) or 0008 (identifying); the element number is small (< 0x0100) in every real file.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0


def read_dicom(path: str | os.PathLike, bit_depth: int | None = None) -> tuple[np.ndarray, int, str]:
    """(gray float32 (H, W) on 0..255, the bit depth used, the VOI rule applied); see the module docstring."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi

    ds = pydicom.dcmread(path, force=True)
    _infer_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise DicomError("DICOM file has no pixel data (PixelData element missing)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames) is not supported: export the frame you want "
                         "as a single-frame file")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(f"colour DICOM (PhotometricInterpretation {photometric or 'missing'}, SamplesPerPixel "
                         f"{samples}) is not supported: chest X-rays are MONOCHROME1 or MONOCHROME2")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises several types when no decoder fits
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise DicomError(f"cannot decode the compressed transfer syntax {syntax.name} ({syntax}): install a "
                             f"decoder: pip install {DECODER_PACKAGES} ({type(exc).__name__}: {exc})") from exc
        raise DicomError(f"cannot decode the pixel data ({type(exc).__name__}: {exc})") from exc
    if stored.ndim != 2:
        raise DicomError(f"expected a single gray frame, got pixel data of shape {stored.shape}")

    bits = int(bit_depth or ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    values = np.asarray(apply_modality_lut(stored, ds), np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # The LUT is indexed by (modality-transformed) integer values.
        out = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), np.float64)
        top = max(2.0 ** lut_bits - 1, float(out.max()))
        gray, rule = out * (255.0 / top), "VOI LUT sequence"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        gray, rule = window(values, center, width, function), f"window {function} c={center:g} w={width:g}"
    else:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        span = np.asarray(apply_modality_lut(np.array([low, high]), ds), np.float64)
        lo, hi = float(span.min()), float(span.max())
        gray, rule = (values - lo) * (255.0 / max(hi - lo, 1e-12)), f"BitsStored range ({bits} bits)"
    gray = np.clip(gray, 0.0, 255.0)
    if photometric == "MONOCHROME1":
        gray = 255.0 - gray
        rule += ", MONOCHROME1 inverted"
    return gray.astype(np.float32), bits, rule


def _infer_transfer_syntax(ds) -> None:
    """Files without file meta (old archives) carry no Transfer Syntax UID; use the encoding pydicom read them with."""
    from pydicom.dataset import FileMetaDataset
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


def _first(value) -> float:
    """The first value of a possibly multi-valued DICOM element, as a float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    result = float(value)
    if not math.isfinite(result):
        raise DicomError(f"window value {value!r} is not a finite number")
    return result

