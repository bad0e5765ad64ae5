"""DICOM chest X-rays -> 8-bit gray, with the display rules of the DICOM standard.

`read_dicom(dataset, bit_depth=None, max_pixels=...)` returns (pixels uint8, bits_stored, rule); `parse(data)` reads
a file with the 128-byte preamble, `probe(data)` one without it. The rules, in the order they apply:

1. The file is read with pydicom (`force=True`). A file whose first bytes are no known signature is DICOM when
   pydicom parses it and finds Rows, Columns and PixelData (`probe`), whatever its first element (files without
   preamble start with a group 0002 or 0008 tag, or any other); TIFF and other signed formats are never tried. A
   file without file meta is decoded with the transfer syntax it was read with. Compressed pixel data are decoded
   by pylibjpeg's decoders (a dependency) wherever they handle the syntax, whatever else is installed, so a file
   gives the same pixels on every install (pydicom itself would take GDCM first, which aborts the process on some
   damaged files). Refused with a clear message: a damaged file (`check_complete`: file meta without a Transfer
   Syntax UID or read as part of the data set, an element whose value runs past the end of the file or of its
   sequence item, an explicit VR DICOM does not define, sequence or encapsulated items that do not follow each
   other to their end, encapsulated pixel data without their closing delimiter, a few bytes after the last element;
   a JPEG / JPEG-LS / JPEG 2000 frame without its end marker: the decoders would fill in or decode a cut frame at a
   lower quality without an error); no pixel data; Rows x Columns above `max_pixels` (checked before any pixel is
   decoded); more than one frame (NumberOfFrames > 1); colour (SamplesPerPixel > 1 or a PhotometricInterpretation
   other than MONOCHROME1/MONOCHROME2); a compressed transfer syntax with no installed decoder (the message names
   the syntax and the packages that decode it); compressed pixel data that the installed decoders fail on (the
   message names the decoders tried and their errors: the data are corrupt or unusual, installing more will not
   help).
2. Modality LUT: Rescale Slope / Intercept (both present and not empty; finite, the slope not 0) or a Modality
   LUT Sequence turn stored values into output units.
3. VOI, the first of these that the file has (a multi-valued Window Center/Width uses the FIRST value; an element
   that is present but empty counts as absent):
   a. a VOI LUT Sequence (its first LUT, indexed by the modality output rounded to the nearest integer, ties to
      even: values below its first mapped value take its first entry, values past its end its last one; the
      output is scaled by the LUT's bit depth, 8 or 10-16; entries beyond that depth or fewer than the descriptor
      declares are refused). It wins over a window because it is the more specific transform, as pydicom and most
      viewers decide;
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
    """The dataset of a DICOM file's bytes (with or without preamble), its completeness checked (`check_complete`)."""
    dataset = _read(data)
    check_complete(dataset, data)
    return dataset


def _read(data: bytes) -> pydicom.Dataset:
    import pydicom  # on first use: see the comment at the top

    return pydicom.dcmread(io.BytesIO(data), force=True)


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def check_complete(dataset: pydicom.Dataset, data: bytes) -> None:
    """Refuse a damaged file before any value is used (pydicom reads what is there without a word): file meta
    information without its Transfer Syntax UID, or that pydicom read as part of the data set; an element whose value
    runs past the end of the file or of its sequence item (cut short, or a length that lies), an explicit VR that
    DICOM does not define (a damaged header), a sequence whose items cannot be read; encapsulated pixel data cut
    before their closing delimiter, or whose items do not follow each other up to it; 1 to 7 bytes after the last
    element (the start of a cut element, which pydicom drops)."""
    meta = getattr(dataset, "file_meta", None)
    if any(tag.group == 0x0002 for tag in dataset.keys()):
        raise DicomError("damaged DICOM header: file meta elements (group 0002) inside the data set, their group "
                         "cannot be read as the file meta information")
    if meta is not None and len(meta) and "TransferSyntaxUID" not in meta:
        raise DicomError("damaged DICOM header: its file meta information (group 0002) has no Transfer Syntax UID")
    deflated = meta is not None and meta.get("TransferSyntaxUID") == _DEFLATED  # positions are of the inflated data
    for part in (meta, dataset):
        if part is not None:
            _check_elements(part, data, top_level=not deflated)
    last = dataset.get_item(max(dataset.keys())) if len(dataset) and not deflated else None  # raw: not converted
    if last is not None and getattr(last, "value_tell", None) is not None and isinstance(last.value, bytes):
        end = last.value_tell + len(last.value) + (8 if last.length == 0xFFFFFFFF else 0)  # + the delimiter
        if 0 < len(data) - end < 8:
            raise DicomError(f"truncated DICOM: {len(data) - end} bytes after its last element, the start of "
                             "another one cut short")


def _check_elements(dataset: pydicom.Dataset, data: bytes, top_level: bool) -> None:
    """`check_complete` for the elements of `dataset` not yet converted, and the items of its sequences."""
    from pydicom.datadict import dictionary_VR  # on first use: see the comment at the top
    from pydicom.valuerep import VR

    for element in list(dataset.elements()):
        if not getattr(element, "is_raw", False):
            continue
        if element.VR is not None and element.VR not in VR.__members__:
            raise DicomError(f"corrupt DICOM: element {element.tag} has the value representation "
                             f"{element.VR!r}, which DICOM does not define")
        value = element.value if isinstance(element.value, bytes) else None
        if element.length != 0xFFFFFFFF and value is not None and len(value) < element.length:
            raise DicomError(f"truncated or corrupt DICOM: element {element.tag} declares {element.length:,} "
                             f"bytes, the file holds {len(value):,} of them")
        if element.length == 0xFFFFFFFF and element.tag == 0x7FE00010 and value is not None:
            end = element.value_tell + len(value)
            if top_level and data[end:end + 8] != _SEQUENCE_DELIMITER:
                raise DicomError("truncated DICOM: its encapsulated pixel data end without their sequence delimiter")
            _check_items(value, "the encapsulated pixel data")
        try:
            vr = element.VR or dictionary_VR(element.tag)
        except KeyError:  # a private or unknown tag in implicit VR: not read as a sequence
            continue
        if vr == "SQ":
            if value is not None:
                _check_items(value, f"the sequence {element.tag}", element.is_little_endian)
            try:
                items = list(dataset[element.tag].value)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a broken sequence
                raise DicomError(f"corrupt DICOM: the sequence {element.tag} cannot be read "
                                 f"({_one_line(exc)})") from exc
            for item in items:
                _check_elements(item, data, top_level=False)


def _check_items(value: bytes, what: str, little_endian: bool = True) -> None:
    """The items of a sequence's value or of encapsulated pixel data (PS3.5 7.5, A.4) follow each other to its end,
    each as long as it says (an item of undefined length ends where its delimiter is found: the walk stops there)."""
    item, order = (b"\xfe\xff\x00\xe0", "little") if little_endian else (b"\xff\xfe\xe0\x00", "big")
    pos, count = 0, 0
    while pos < len(value):
        if value[pos:pos + 4] != item or pos + 8 > len(value):
            raise DicomError(f"corrupt DICOM: item {count} of {what} does not start where the items before it end")
        length = int.from_bytes(value[pos + 4:pos + 8], order)
        if length == 0xFFFFFFFF:
            return
        pos, count = pos + 8 + length, count + 1
        if pos > len(value):
            raise DicomError(f"truncated or corrupt DICOM: item {count - 1} of {what} runs past its end")


def probe(data: bytes) -> pydicom.Dataset | None:
    """The dataset when `data` parses as DICOM with Rows, Columns and PixelData, else None (not DICOM); a DICOM
    that is not complete raises DicomError (`check_complete`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd element of a file that is no DICOM
            dataset = _read(data)
            tagged = all(keyword in dataset for keyword in ("PixelData", "Rows", "Columns"))
    except Exception:  # noqa: BLE001 - any parse failure means: not a DICOM file
        return None
    if not tagged:
        return None
    check_complete(dataset, data)
    try:
        plausible = int(dataset.get("Rows") or 0) > 0 and int(dataset.get("Columns") or 0) > 0
    except Exception:  # noqa: BLE001 - unreadable dimensions: not a DICOM file
        return None
    return dataset if plausible else None


def read_dicom(dataset: pydicom.Dataset, bit_depth: int | None = None, *,
               max_pixels: int | None = None) -> tuple[np.ndarray, int, str]:
    """(gray uint8 (H, W), the bit depth used, the VOI rule applied); see the module docstring. `dataset` is one
    `parse` or `probe` returned (its completeness checked)."""
    ds = dataset
    _infer_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise DicomError("DICOM file has no pixel data (PixelData element missing)")
    syntax = ds.file_meta.TransferSyntaxUID
    if ds.get_item(0x7FE00010).length == 0xFFFFFFFF and not syntax.is_compressed:
        raise DicomError(f"damaged DICOM header: encapsulated (compressed) pixel data, but the transfer syntax is "
                         f"{syntax.name}")
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
    modality = _modality_lut(ds)
    values = modality(stored)
    center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        gray, rule = voi_lut(values, ds.VOILUTSequence[0], _little_endian(ds)), "VOI LUT sequence"
    elif center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        gray, rule = window(values, center, width, function), f"window {function} c={center:g} w={width:g}"
    else:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        span = modality(np.array([low, high]))
        lo, hi = float(span.min()), float(span.max())
        gray, rule = (values - lo) * (255.0 / max(hi - lo, 1e-12)), f"BitsStored range ({bits} bits){note}"
    gray = np.clip(gray, 0.0, 255.0)
    if photometric == "MONOCHROME1":
        gray = 255.0 - gray
        rule += ", MONOCHROME1 inverted"
    return np.rint(gray).astype(np.uint8), bits, rule


def _stored_pixels(ds) -> np.ndarray:
    """The stored values; a failure names its cause: no decoder installed for the syntax, or what the decoder said
    (corrupt data). Compressed data go to pylibjpeg's decoders (a dependency of this package) whenever they handle
    the syntax, so every install decodes a file the same way: pydicom would otherwise take GDCM first where it is
    installed (GDCM aborts the process on some damaged files, and its JPEG decoder reads truncated frames)."""
    from pydicom.pixels import get_decoder  # on first use: see the comment at the top

    syntax = ds.file_meta.TransferSyntaxUID
    plugins = ""
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
        _check_frame_ends(ds, syntax)
        plugins = "pylibjpeg" if "pylibjpeg" in decoder.available_plugins else ""
        ds.pixel_array_options(decoding_plugin=plugins)
        plugins = plugins or ", ".join(decoder.available_plugins)
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom and its plugins raise many types for bad data
        if syntax.is_compressed:
            raise DicomError(f"the {syntax.name} pixel data cannot be decoded by the installed decoders "
                             f"({plugins}): the data are corrupt or unusual ({_one_line(exc)})") from exc
        raise DicomError(f"cannot decode the pixel data ({_one_line(exc)})") from exc


def _check_frame_ends(ds, syntax) -> None:
    """A JPEG, JPEG-LS or JPEG 2000 frame ends with its end-of-image (end-of-codestream) marker, FF D9, maybe
    padded with a zero byte to an even length: one without it was cut, and the decoders fill the rest (libjpeg) or
    decode it at a lower quality (OpenJPEG) without an error."""
    from pydicom.encaps import generate_frames  # on first use: see the comment at the top
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    if syntax not in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes):
        return
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken encapsulation
        raise DicomError(f"corrupt encapsulated pixel data ({_one_line(exc)})") from exc
    if not frame.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise DicomError(f"truncated {syntax.name} pixel data: the frame does not end with its end-of-image marker")


def _modality_lut(ds):
    """The modality LUT as a function of stored values -> float64 output units: Rescale Slope and Intercept when
    both are present and not empty (finite, the slope not 0: a NaN slope gave a black image without an error), or
    the Modality LUT Sequence (pydicom's), or the identity."""
    from pydicom.pixels import apply_modality_lut  # on first use: see the comment at the top

    slope, intercept = _first_number(ds, "RescaleSlope"), _first_number(ds, "RescaleIntercept")
    if slope is not None and intercept is not None:
        if slope == 0:
            raise DicomError("Rescale Slope is 0: every pixel would have the same value")
        return lambda stored: np.asarray(stored, np.float64) * slope + intercept
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        return lambda stored: np.asarray(apply_modality_lut(np.asarray(stored), ds), np.float64)
    return lambda stored: np.asarray(stored, np.float64)


def voi_lut(values: np.ndarray, item, little_endian: bool = True) -> np.ndarray:
    """A VOI LUT (an item of the VOI LUT Sequence; PS3.3 C.11.2.1.1) applied to modality output values, scaled to
    0..255 by the LUT's bit depth: values below the first mapped value take the first entry, values past the last
    entry the last one. (pydicom's `apply_voi` indexes an 8-bit LUT through uint8, so inputs 256 or more past the
    first mapped value wrapped around to other entries.)"""
    descriptor = [int(v) for v in item.get("LUTDescriptor") or ()]
    if len(descriptor) != 3:
        raise DicomError(f"VOI LUT Descriptor {descriptor} does not have 3 values")
    entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
    if bits not in (8, *range(10, 17)):
        raise DicomError(f"VOI LUT of {bits} bits per entry (8 or 10 to 16 are defined)")
    data = item.get("LUTData")
    if isinstance(data, (bytes, bytearray)):  # OW: 16-bit words in the dataset's byte order
        table = np.frombuffer(data[:len(data) // 2 * 2], "<u2" if little_endian else ">u2")
    else:
        table = np.atleast_1d(np.asarray([] if data is None else data, np.int64))
    if len(table) < entries:
        raise DicomError(f"VOI LUT Data holds {len(table)} of the {entries} entries its descriptor declares")
    table = table[:entries].astype(np.int64)
    if table.min() < 0 or table.max() >= 2 ** bits:
        raise DicomError(f"VOI LUT entries reach {int(table.max())}, beyond its {bits} bits")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)  # indexed by integer values
    return table[index] * (255.0 / (2 ** bits - 1))


def _little_endian(ds) -> bool:
    return ds.file_meta.TransferSyntaxUID != "1.2.840.10008.1.2.2"  # Explicit VR Big Endian


def _one_line(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())  # pydicom lists each plugin's error on its own line


def _first_number(ds, keyword: str) -> float | None:
    """The first value of a numeric element (Window Center / Width, Rescale Slope / Intercept) as a finite float, or
    None when the element is absent or empty."""
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
    """A window or rescale value as a finite float."""
    result = float(value)
    if not math.isfinite(result):
        raise DicomError(f"window or rescale value {value!r} is not a finite number")
    return result

