"""Image files of the formats users meet, written by independent writers (pypng, Pillow, imagecodecs' encoders,
pydicom), and what independent reference decoders read from ANY file's bytes after the image reader's documented
conversions: the two halves of the reader's differential fuzzing (`reader_fuzz.py`).

    write_case(fmt, rng, lie=False) -> Case      a valid file of `fmt` ("png", "jpeg", "dicom"), drawn from rng;
                                                 lie=True: a DICOM whose attributes lie (the file is well formed)
    reference(data, path) -> Expected            the pixels the reader must return for the file `path` holding
                                                 `data`, or raises Refused

The reference decoders are not the libraries the reader uses for the same file:
- PNG: pypng (pure Python; the reader uses libpng through imagecodecs). pypng's raw samples (`Reader.read`, palette
  indices, no sBIT shift, no transparency applied) go through the conversions written out below.
- JPEG, 8-bit gray: Pillow with truncated-image loading off (the reader uses imagecodecs). 8-bit colour and CMYK:
  imagecodecs' `jpeg8_decode` (the reader uses Pillow), its CMYK taken as stored inverted (Adobe's convention, which
  Pillow assumes for every CMYK JPEG) and converted with Pillow's formula written out below. Both wrap libjpeg-turbo:
  for lossy JPEG no other codec can be compared bit for bit (the standard leaves the inverse DCT's rounding to the
  implementation: Thomas Richter's libjpeg, through pylibjpeg, differs by one level in 3% of pixels), and the reader's
  JPEG defects lived in the wrappers (truncated files filled with grey, orientation, colour conversion, marker
  handling), which differ here. Lossless JPEGs (which Pillow cannot read beyond 8 bits): Chris Rorden's decoder
  (imagecodecs' `jpegsof3`), exact. 12-bit lossy JPEGs: Richter's libjpeg, within 4 of 4095 (the two inverse DCTs differ
  by up to 3). (Where damage leaves a stream decodable, such other codecs recover their own way: see `Expected.codec`.)
- DICOM: GDCM (python-gdcm; the reader uses pydicom, and pylibjpeg's decoders for compressed pixel data): GDCM's
  stored values and GDCM's reading of the attributes; the display rules (modality LUT, VOI LUT, windows, the
  BitsStored range, MONOCHROME1) written out from the standard (PS3.3 C.11) and the reader's docstring. Lossy
  syntaxes (JPEG baseline and extended) allow the stored values to differ by a little between GDCM's codec and
  pylibjpeg's (a different implementation of the inverse DCT).

Where the documented float arithmetic of a DICOM lands within 1e-6 of a rounding tie, either neighbour is accepted.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import warnings
import zlib

import gdcm
import imagecodecs
import libjpeg
import numpy as np
import png
import pydicom
from PIL import Image, ImageFile
from pydicom import encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (HTJ2K, JPEG2000, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian,
                         HTJ2KLossless, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless, generate_uid)

FORMATS = ("png", "jpeg", "dicom")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATION_TAG = 0x0112
LUMA = np.array([19595, 38470, 7471])  # ITU-R 601-2 x 65536, Pillow's integers (the reader's documented luma)
assert ImageFile.LOAD_TRUNCATED_IMAGES is False


class Refused(Exception):
    """The reference decoder reports an error for the file. `codec`: the refusal came from a codec implementation
    other than the reader's (on damaged data, see `Expected.codec`)."""

    def __init__(self, message: str, codec: str | None = None):
        super().__init__(message)
        self.codec = codec


@dataclasses.dataclass
class Case:
    format: str
    description: str  # what was written, for failure reports
    data: bytes


@dataclasses.dataclass
class Expected:
    """The reader's pixels must lie in [low, high] (uint8 (H, W)); equal bounds: exactly those pixels.

    `codec` names the reference's codec where it is another implementation than the reader's (lossless and 12-bit
    JPEG, compressed DICOM). Both decode valid files alike, but where damage leaves a stream they can still read,
    each recovers its own way (libjpeg-turbo, liblj92, jpegsof3 and Richter's libjpeg all differ on the same
    damaged lossless JPEG), so on damaged files neither their refusal nor a difference decides anything."""

    format: str
    low: np.ndarray
    high: np.ndarray
    note: str = ""
    codec: str | None = None


def exact(fmt: str, gray: np.ndarray, note: str = "", codec: str | None = None) -> Expected:
    gray = np.ascontiguousarray(gray, np.uint8)
    return Expected(fmt, gray, gray, note, codec)


# ---------------------------------------------------------------------------------------------------------------
# The documented conversions, written out (imaging/images.py and dicom.py docstrings, docs/data.md "The image
# reader"): never by calling the reader's functions.

def round_half_up(numerator, denominator) -> np.ndarray:
    return (2 * np.asarray(numerator, np.int64) + denominator) // (2 * denominator)


def luma65536(colour: np.ndarray) -> np.ndarray:
    """65536 x the luma of (H, W, 3) samples, or of (H, W) gray."""
    colour = np.asarray(colour, np.int64)
    return colour @ LUMA if colour.ndim == 3 else colour * 65536


def high_depth_bits(max_sample: int, sbit: int | None) -> int:
    """The bit-depth rule without overrides: sBIT when every sample fits, else 12 bits if every sample is below 4096,
    else 16."""
    if sbit and sbit < 16 and max_sample < 2 ** sbit:
        return sbit
    return 12 if max_sample < 4096 else 16


def to_8bit(colour: np.ndarray, bits: int) -> np.ndarray:
    """Gray (H, W) or colour (H, W, 3) samples (alpha already dropped) of `bits` bits -> 8 bits: 8-bit samples give
    their (luma) value rounded half up; high-depth ones round(L * 255 / (2**bits - 1)) half up."""
    if bits == 8:
        return round_half_up(luma65536(colour), 65536).astype(np.uint8)
    return round_half_up(luma65536(colour) * 255, 65536 * (2 ** bits - 1)).astype(np.uint8)


def gray_from_samples(colour: np.ndarray, depth: int, sbit: int | None = None) -> np.ndarray:
    """`to_8bit` with the bits of the container's depth: 8 for 8-bit containers, the bit-depth rule above."""
    return to_8bit(colour, 8 if depth <= 8 else high_depth_bits(int(colour.max()) if colour.size else 0, sbit))


def oriented(gray: np.ndarray, orientation: int) -> np.ndarray:
    """The EXIF orientation (TIFF 6.0 tag 274) applied by index arithmetic: the displayed pixel (i, j) of each
    orientation is the stored pixel given here (H x W stored)."""
    height, width = gray.shape
    if orientation in (5, 6, 7, 8):  # displayed W x H
        i, j = np.indices((width, height))
        source = {5: (j, i), 6: (height - 1 - j, i), 7: (height - 1 - j, width - 1 - i), 8: (j, width - 1 - i)}
    else:
        i, j = np.indices((height, width))
        source = {2: (i, width - 1 - j), 3: (height - 1 - i, width - 1 - j), 4: (height - 1 - i, j)}
    if orientation not in source:
        return gray
    rows, cols = source[orientation]
    return gray[rows, cols]


def exif_orientation(exif_body: bytes | None) -> int:
    """The orientation an EXIF block (with or without the "Exif\\0\\0" prefix) declares, read by Pillow's parser;
    1 when absent, unreadable or out of range."""
    if not exif_body:
        return 1
    try:
        exif = Image.Exif()
        exif.load(exif_body if exif_body.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif_body)
        value = exif.get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: no orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# ---------------------------------------------------------------------------------------------------------------
# Writers.

def _size(rng, largest: int = 24) -> tuple[int, int]:
    small = rng.random() < 0.2  # 1-pixel rows and columns, 1 x 1 images
    return tuple(int(rng.integers(1, 4 if small else largest + 1)) for _ in range(2))


def _values(rng, shape, top: int, dtype) -> np.ndarray:
    """Samples in 0..top: uniform noise, a smooth field, a constant, or only the extremes."""
    kind = rng.choice(["noise", "smooth", "constant", "extremes"], p=[0.4, 0.4, 0.1, 0.1])
    if kind == "noise":
        out = rng.integers(0, top + 1, shape)
    elif kind == "smooth":
        walk = np.cumsum(rng.normal(0, top / 20 + 1, shape), axis=0) + rng.integers(0, top + 1)
        out = np.clip(np.rint(walk), 0, top)
    elif kind == "constant":
        out = np.full(shape, rng.integers(0, top + 1))
    else:
        out = rng.choice([0, top], shape)
    return np.asarray(out).astype(dtype)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(start, end, type) of each chunk of a well-formed PNG, up to the end of the file."""
    pos, out = len(PNG_SIGNATURE), []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = min(pos + 12 + length, len(data))
        out.append((pos, end, kind))
        pos = end
    return out


def _insert_after_ihdr(data: bytes, chunks: bytes) -> bytes:
    at = len(PNG_SIGNATURE) + 25
    return data[:at] + chunks + data[at:]


PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
PNG_PLANES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_case(rng) -> Case:
    """PNG of colour type 0, 2, 3, 4 or 6 at any legal depth, interlaced or not, with or without tRNS, sBIT
    absent, true or lying, sometimes an eXIf orientation; written by pypng."""
    colour_type = int(rng.choice(list(PNG_DEPTHS)))
    depth = int(rng.choice(PNG_DEPTHS[colour_type]))
    height, width = _size(rng)
    planes = PNG_PLANES[colour_type]
    interlace = bool(rng.random() < 0.3)
    writer = {"bitdepth": depth, "interlace": interlace}
    notes = [f"colour type {colour_type}", f"{depth}-bit", f"{width}x{height}"] + (["interlaced"] if interlace else [])
    data_bits = depth
    if colour_type == 3:
        entries = int(rng.integers(1, 2 ** depth + 1))
        colours = rng.integers(0, 256, (entries, 3))
        if rng.random() < 0.3:  # gray palettes (R = G = B), as X-ray copies have
            colours[:, 1] = colours[:, 2] = colours[:, 0]
        with_alpha = int(rng.integers(0, entries + 1)) if rng.random() < 0.4 else 0  # tRNS: the first entries
        writer["palette"] = [tuple(int(c) for c in colour) + ((int(rng.integers(0, 256)),) if k < with_alpha else ())
                             for k, colour in enumerate(colours)]
        samples = rng.integers(0, entries, (height, width)).astype(np.uint8)
        notes += [f"{entries} palette entries"] + ([f"tRNS {with_alpha}"] if with_alpha else [])
    else:
        writer["greyscale"] = colour_type in (0, 4)
        writer["alpha"] = colour_type in (4, 6)
        if depth == 16:
            data_bits = int(rng.choice([16, 12, 10, 8, 14]))
        top = 2 ** data_bits - 1
        samples = _values(rng, (height, width, planes), top, np.uint16 if depth == 16 else np.uint8)
        if depth == 16 and data_bits < 16 and rng.random() < 0.25:  # shifted up, as the PNG standard intends
            samples = (samples.astype(np.uint32) << (16 - data_bits)).astype(np.uint16)
            notes.append(f"{data_bits}-bit data shifted to 16")
        elif depth == 16:
            notes.append(f"{data_bits}-bit data")
        if colour_type in (0, 2) and rng.random() < 0.3:  # tRNS: one colour is transparent
            pixel = samples[int(rng.integers(height)), int(rng.integers(width))]
            writer["transparent"] = int(pixel[0]) if colour_type == 0 else tuple(int(v) for v in pixel)
            notes.append("tRNS")
    buffer = io.BytesIO()
    png.Writer(width, height, **writer).write(buffer, samples.reshape(height, -1))
    data = buffer.getvalue()
    extra = b""
    sbit_kind = rng.choice(["absent", "true", "lying"], p=[0.5, 0.25, 0.25])
    if sbit_kind != "absent":
        entries = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[colour_type]
        most = 8 if colour_type == 3 else depth
        value = min(data_bits, most) if sbit_kind == "true" else int(rng.integers(1, most + 1))
        extra += png_chunk(b"sBIT", bytes([value] * entries))
        notes.append(f"sBIT {value} ({sbit_kind})")
    if rng.random() < 0.2:
        orientation = int(rng.integers(0, 10))
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        extra += png_chunk(b"eXIf", exif.tobytes()[6:])  # without the JPEG APP1 "Exif\0\0" prefix
        notes.append(f"eXIf orientation {orientation}")
    return Case("png", "PNG " + ", ".join(notes), _insert_after_ihdr(data, extra))


def _with_exif(jpeg: bytes, orientation: int) -> bytes:
    """An APP1 Exif segment with the orientation, right after SOI."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    body = exif.tobytes()  # starts with "Exif\0\0"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def jpeg_case(rng) -> Case:
    """JPEG gray, RGB or CMYK (Pillow: baseline or progressive, optimised or not, chroma subsampling, restart
    markers), 12-bit gray and lossless gray of 2 to 16 bits (imagecodecs' libjpeg-turbo); EXIF orientation 1-8 (or
    none, or out of range)."""
    kind = str(rng.choice(["gray", "rgb", "cmyk", "gray12", "lossless"], p=[0.3, 0.25, 0.15, 0.1, 0.2]))
    height, width = _size(rng, 40)
    notes = [kind, f"{width}x{height}"]
    if kind in ("gray", "rgb", "cmyk"):
        planes = {"gray": 1, "rgb": 3, "cmyk": 4}[kind]
        samples = _values(rng, (height, width, planes), 255, np.uint8)
        if kind == "rgb" and rng.random() < 0.3:
            samples[..., 1] = samples[..., 2] = samples[..., 0]
        image = Image.fromarray(samples[..., 0] if planes == 1 else samples, {1: "L", 3: "RGB", 4: "CMYK"}[planes])
        options = {"quality": int(rng.integers(20, 101)), "progressive": bool(rng.random() < 0.3),
                   "optimize": bool(rng.random() < 0.3)}
        if kind == "rgb":
            options["subsampling"] = int(rng.integers(0, 3))
        if rng.random() < 0.3:
            options["restart_marker_blocks" if rng.random() < 0.5 else "restart_marker_rows"] = int(rng.integers(1, 4))
        notes += [f"{k}={v}" for k, v in options.items()]
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", **options)
        data = buffer.getvalue()
    elif kind == "gray12":
        level = int(rng.integers(20, 101))
        data = imagecodecs.jpeg8_encode(_values(rng, (height, width), 4095, np.uint16), level=level, bitspersample=12)
        notes.append(f"quality={level}")
    else:
        bits = int(rng.integers(2, 17))
        predictor = int(rng.integers(1, 8))
        samples = _values(rng, (height, width), 2 ** bits - 1, np.uint8 if bits <= 8 else np.uint16)
        data = imagecodecs.jpeg8_encode(samples, lossless=True, predictor=predictor, bitspersample=bits)
        notes += [f"{bits}-bit", f"predictor {predictor}"]
    if rng.random() < 0.4:
        orientation = int(rng.choice([*range(1, 9), 0, 9]))
        data = _with_exif(data, orientation)
        notes.append(f"EXIF orientation {orientation}")
    return Case("jpeg", "JPEG " + ", ".join(notes), data)


# Transfer syntaxes the installed encoders write: pydicom itself (native, RLE) and imagecodecs (libjpeg-turbo:
# JPEG baseline, extended and lossless; CharLS: JPEG-LS; OpenJPEG: JPEG 2000; OpenJPH: HTJ2K), whose frames pydicom
# encapsulates. pydicom's own encoders cover RLE and JPEG 2000 only (the latter with pylibjpeg-openjpeg, for images
# of 32 pixels a side or more); pyjpegls would add JPEG-LS.
DICOM_SYNTAXES = ("explicit", "implicit", "no meta", RLELossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2K,
                  JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
                  JPEGLSNearLossless)
ENCAPSULATED = DICOM_SYNTAXES[4:]
LOSSY = (JPEG2000, HTJ2K, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)


def _dicom_dataset(stored: np.ndarray, bits_stored: int, signed: bool, photometric: str, uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * stored.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.tobytes()
    return ds


def _dicom_stored(rng, syntax, shape) -> tuple[np.ndarray, int, bool]:
    """Stored values the syntax can carry: (values, BitsStored, signed)."""
    if syntax == JPEGBaseline8Bit:
        return _values(rng, shape, 255, np.uint8), 8, False
    if syntax == JPEGExtended12Bit:
        return _values(rng, shape, 4095, np.uint16), 12, False
    compressed_unsigned = syntax in (JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless)
    bits = int(rng.integers(8, 17)) if rng.random() < 0.9 else 8
    signed = not compressed_unsigned and rng.random() < 0.3
    # 8 bits in 16-bit words natively only: pydicom's RLE encoder writes them wrong, GDCM aborts on JPEG-LS ones
    compressed = syntax == RLELossless or syntax in ENCAPSULATED
    container = np.uint8 if bits == 8 and (rng.random() < 0.5 or compressed) else np.uint16
    values = _values(rng, shape, 2 ** bits - 1, np.int64)
    if signed:
        values -= 2 ** (bits - 1)
        container = np.int8 if container == np.uint8 else np.int16
    native = syntax in ("explicit", "implicit", "no meta", RLELossless)
    if native and container in (np.uint16, np.int16) and bits < 16 and rng.random() < 0.05:  # bits above BitsStored
        values = values.astype(container).view(np.uint16) | np.uint16(0xF000 & ~(2 ** bits - 1) & 0xFFFF)
        return values.view(container), bits, signed
    return values.astype(container), bits, signed


def _encode_frame(syntax, stored: np.ndarray, bits: int, rng) -> bytes:
    """`stored` (BitsStored `bits`) encoded in `syntax` by imagecodecs."""
    if bits <= 8 and stored.dtype.itemsize > 1:
        stored = stored.astype(np.int8 if stored.dtype.kind == "i" else np.uint8)
    level = int(rng.integers(30, 101))
    if syntax == JPEGBaseline8Bit:
        return imagecodecs.jpeg8_encode(stored, level=level)
    if syntax == JPEGExtended12Bit:
        return imagecodecs.jpeg8_encode(stored, level=level, bitspersample=12)
    if syntax in (JPEGLossless, JPEGLosslessSV1):
        predictor = 1 if syntax == JPEGLosslessSV1 else int(rng.integers(1, 8))
        return imagecodecs.jpeg8_encode(stored, lossless=True, predictor=predictor, bitspersample=bits)
    if syntax in (JPEGLSLossless, JPEGLSNearLossless):
        near = 0 if syntax == JPEGLSLossless else int(rng.integers(1, 4))
        return imagecodecs.jpegls_encode(stored, level=near, bitspersample=bits)
    resolutions = int(rng.integers(1, 1 + max(1, min(6, int(np.log2(min(stored.shape))) + 1))))
    lossless = syntax in (JPEG2000Lossless, HTJ2KLossless)
    if syntax in (JPEG2000Lossless, JPEG2000):
        return imagecodecs.jpeg2k_encode(stored, level=0 if lossless else level, codecformat="J2K",
                                         reversible=lossless, resolutions=resolutions, bitspersample=bits)
    return imagecodecs.htj2k_encode(stored, **({} if lossless else {"level": level}), reversible=lossless,
                                    resolutions=resolutions, bitspersample=bits)


def _voi_lut(rng, bits_out: int, first: int, entries: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits_out]
    item.add_new(0x00283006, "US", [int(v) for v in rng.integers(0, 2 ** bits_out, entries)])  # LUT Data
    return item


def _attribute_lie(rng, ds: Dataset) -> str:
    """Make one attribute of a well-formed dataset say something false or odd; what was done."""
    lies = {
        "Rows": lambda: setattr(ds, "Rows", int(ds.Rows) + int(rng.choice([-1, 1, 7, 1000]))),
        "Columns": lambda: setattr(ds, "Columns", max(0, int(ds.Columns) + int(rng.choice([-1, 1, 1000])))),
        "BitsAllocated": lambda: setattr(ds, "BitsAllocated", int(rng.choice([0, 1, 12, 32, 64]))),
        "BitsStored": lambda: setattr(ds, "BitsStored", int(rng.choice([0, 1, 7, 17, 32]))),
        "HighBit": lambda: setattr(ds, "HighBit", int(rng.choice([0, 15, 31]))),
        "PixelRepresentation": lambda: setattr(ds, "PixelRepresentation",
                                               int(rng.choice([2, 1 - ds.PixelRepresentation]))),
        "SamplesPerPixel": lambda: setattr(ds, "SamplesPerPixel", int(rng.choice([0, 3]))),
        "PhotometricInterpretation": lambda: setattr(ds, "PhotometricInterpretation",
                                                     str(rng.choice(["", "RGB", "MONOCHROME3", "PALETTE COLOR"]))),
        "NumberOfFrames": lambda: setattr(ds, "NumberOfFrames", int(rng.choice([0, 1, 2]))),
        "RescaleSlope": lambda: setattr(ds, "RescaleSlope", str(rng.choice(["0", "-1", "1e300", "NaN", ""]))),
        "WindowWidth": lambda: (setattr(ds, "WindowCenter", "100"),
                                setattr(ds, "WindowWidth", str(rng.choice(["0", "-5", "0.5", "inf", "1"])))),
        "VOILUTFunction": lambda: (setattr(ds, "WindowCenter", "100"), setattr(ds, "WindowWidth", "50"),
                                   setattr(ds, "VOILUTFunction", str(rng.choice(["", "CUBIC", "sigmoid"])))),
        "LUTDescriptor": lambda: setattr(ds, "VOILUTSequence", Sequence([_voi_lut(rng, 8, 0, 4)]))
        or setattr(ds.VOILUTSequence[0], "LUTDescriptor", [int(rng.choice([0, 2, 9])), int(rng.choice([0, 5])),
                                                           int(rng.choice([0, 8, 17]))]),
        # (encapsulated data keep their first item's tag: pydicom refuses to write them otherwise)
        "PixelData": lambda: setattr(ds, "PixelData", ds.PixelData[:int(rng.integers(
            8 if ds["PixelData"].is_undefined_length else 0, len(ds.PixelData) + 1))]),
    }
    name = str(rng.choice(sorted(lies)))
    lies[name]()
    return f"lying {name}"


def dicom_case(rng, lie: bool = False) -> Case:
    """A single-frame DICOM written by pydicom: preamble or not, file meta or not, explicit or implicit VR or
    compressed (RLE, JPEG 2000 and HTJ2K lossless and lossy, JPEG baseline, extended, lossless, JPEG-LS lossless
    and near-lossless), MONOCHROME1/2, signed or unsigned, BitsStored 8..16, rescale slope/intercept, windows absent,
    empty, single or multi-valued with each VOI LUT function, a VOI LUT sequence; with `lie`, an attribute lies."""
    syntax = DICOM_SYNTAXES[int(rng.integers(len(DICOM_SYNTAXES)))]
    height, width = _size(rng)
    stored, bits, signed = _dicom_stored(rng, syntax, (height, width))
    photometric = "MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2"
    uid = generate_uid(entropy_srcs=[str(rng.integers(2 ** 62))])  # from rng: the same file from the same seed
    ds = _dicom_dataset(stored, bits, signed, photometric, uid)
    notes = [str(getattr(syntax, "name", syntax)), f"{width}x{height}", f"BitsStored {bits}",
             f"{stored.dtype}", photometric]
    integer_rescale = True
    if rng.random() < 0.4:
        slope, intercept = rng.choice([1, 2, 0.5, 1.5, -1]), rng.choice([0, -1024, 100, 0.25])
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        integer_rescale = float(slope).is_integer() and float(intercept).is_integer()
        notes.append(f"rescale {slope:g}/{intercept:g}")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    window = rng.choice(["absent", "empty", "single", "multi"], p=[0.35, 0.15, 0.3, 0.2])
    if window == "empty":
        ds.add_new(0x00281050, "DS", None)
        ds.add_new(0x00281051, "DS", None)
    elif window != "absent":
        count = 1 if window == "single" else int(rng.integers(2, 4))
        centers = [f"{c:g}" for c in rng.uniform(low, high, count).round(1)]
        widths = [f"{w:g}" for w in rng.uniform(1, (high - low) * 1.5 + 2, count).round(1)]
        ds.WindowCenter, ds.WindowWidth = centers if count > 1 else centers[0], widths if count > 1 else widths[0]
        function = rng.choice(["", "LINEAR", "LINEAR_EXACT", "SIGMOID"])
        if function:
            ds.VOILUTFunction = function
        notes.append(f"window {window} c={centers} w={widths} {function}")
    if integer_rescale and not signed and rng.random() < 0.15:
        entries = int(rng.integers(2, 300))
        first = int(rng.integers(0, max(1, high // 2)))
        ds.VOILUTSequence = Sequence([_voi_lut(rng, int(rng.choice([8, 10, 12, 16])), first, entries)])
        notes.append(f"VOI LUT ({entries} entries from {first})")
    if syntax == RLELossless:
        ds.compress(syntax, encoding_plugin="pydicom")
    elif syntax in ENCAPSULATED:
        ds.PixelData = encaps.encapsulate([_encode_frame(syntax, stored, bits, rng)])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax in LOSSY:
            ds.LossyImageCompression = "01"
    if lie:
        notes.append(_attribute_lie(rng, ds))
    buffer = io.BytesIO()
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    preamble = syntax == "no meta" or rng.random() < 0.8
    if syntax == "no meta":
        del ds.file_meta
        ds.save_as(buffer, implicit_vr=bool(rng.random() < 0.5), little_endian=True, enforce_file_format=False)
    elif preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        ds.preamble = None
        ds.save_as(buffer, enforce_file_format=False)
        notes.append("no preamble")
    return Case("dicom", "DICOM " + ", ".join(notes), buffer.getvalue())


def write_case(fmt: str, rng, lie: bool = False) -> Case:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings about the lies it is asked to write
        if fmt == "png":
            return png_case(rng)
        if fmt == "jpeg":
            return jpeg_case(rng)
        return dicom_case(rng, lie)


# ---------------------------------------------------------------------------------------------------------------
# Reference decoders.

def reference(data: bytes, path: str) -> Expected:
    """What the reader must return for the file `path` holding `data` (see the module docstring); raises Refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if data.startswith(PNG_SIGNATURE):
            return reference_png(data)
        if data.startswith(b"\xff\xd8"):
            return reference_jpeg(data)
        return reference_dicom(path)


def reference_png(data: bytes) -> Expected:
    try:
        reader = png.Reader(bytes=data)
        width, height, rows, info = reader.read()
        planes, depth = info["planes"], info["bitdepth"]
        samples = np.array([np.asarray(row) for row in rows], np.int64).reshape(height, width, planes)
        palette = reader.palette() if info.get("palette") else None
        exif = next((body for kind, body in png.Reader(bytes=data).chunks() if kind == b"eXIf"), None)
    except Exception as exc:  # noqa: BLE001 - every pypng error is a refusal
        raise Refused(f"pypng: {type(exc).__name__}: {exc}") from exc
    if palette is not None:
        colours = np.array([entry[:3] for entry in palette], np.int64)
        if samples.size and samples.max() >= len(colours):
            raise Refused("pypng: a palette index beyond the palette")
        colour, depth = colours[samples[..., 0]], 8
    else:
        colour = samples[..., :3] if planes >= 3 else samples[..., 0]  # alpha dropped
        if depth < 8:  # low-depth gray expanded to 0..255
            colour, depth = colour * 255 // (2 ** depth - 1), 8
    sbit_entries = reader.sbit if getattr(reader, "sbit", None) else None
    sbit = None
    if sbit_entries:
        sbit = max(sbit_entries[:3] if colour.ndim == 3 else sbit_entries[:1])
    gray = gray_from_samples(colour, depth, sbit)
    return exact("png", oriented(gray, exif_orientation(exif)))


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The SOFn marker of a JPEG (walking its segments from SOI), or None."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def reference_jpeg(data: bytes) -> Expected:
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            mode = image.mode
            orientation = exif_orientation(image.info.get("exif"))
            if mode == "L":
                image.load()
                gray = np.asarray(image)
                return exact("jpeg", oriented(gray, orientation))
    except Exception as exc:  # noqa: BLE001 - not something Pillow reads: 12-bit or lossless, or broken
        pillow_error = exc
    else:
        pillow_error = None
    if pillow_error is None:  # 8-bit colour or CMYK: the pixels by imagecodecs
        try:
            samples = imagecodecs.jpeg8_decode(data)
        except Exception as exc:  # noqa: BLE001
            raise Refused(f"imagecodecs: {exc}") from exc
        if mode == "CMYK":
            cmyk = 255 - samples.astype(np.int64)  # stored inverted, as Adobe writes it (Pillow assumes so always)
            black = 255 - cmyk[..., 3:4]
            samples = black - round_half_up(cmyk[..., :3] * black, 255)  # Pillow's CMYK -> RGB
        elif mode != "RGB" or samples.ndim != 3 or samples.shape[2] != 3:
            raise Refused(f"imagecodecs gives {samples.shape} for a {mode} JPEG")
        return exact("jpeg", oriented(gray_from_samples(samples, 8), orientation))
    marker = _jpeg_frame_marker(data)
    orientation = exif_orientation(_first_exif_segment(data))
    # lossless: Chris Rorden's decoder (imagecodecs' jpegsof3), exact; 12-bit: Richter's libjpeg, within 4 of 4095
    codec, decode = ("jpegsof3", imagecodecs.jpegsof3_decode) if marker == 0xC3 else ("libjpeg", libjpeg.decode)
    try:
        samples = np.asarray(decode(data))
    except Exception as exc:  # noqa: BLE001
        raise Refused(f"Pillow: {pillow_error}; {codec}: {exc}", codec) from exc
    if samples.ndim != 2:
        raise Refused(f"{samples.shape} samples: only gray JPEGs are read beyond Pillow")
    bits = 8 if samples.dtype == np.uint8 else high_depth_bits(int(samples.max()) if samples.size else 0, None)
    if marker == 0xC3:
        return exact("jpeg", oriented(to_8bit(samples, bits), orientation), "lossless JPEG, jpegsof3", codec)
    low = to_8bit(np.clip(samples.astype(np.int64) - 4, 0, None), bits)
    high = to_8bit(np.clip(samples.astype(np.int64) + 4, None, 2 ** bits - 1), bits)
    return Expected("jpeg", oriented(low, orientation), oriented(high, orientation), "12-bit JPEG, libjpeg +-4",
                    codec)


def _first_exif_segment(data: bytes) -> bytes | None:
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9):
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        body = data[pos + 4:pos + 2 + length]
        if data[pos + 1] == 0xE1 and body.startswith(b"Exif\x00\x00"):
            return body
        pos += 2 + length
    return None


_GDCM_TYPES = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16, "UINT32": np.uint32,
               "INT32": np.int32}
JPEG_FAMILY = (*pydicom.uid.JPEGTransferSyntaxes, *pydicom.uid.JPEGLSTransferSyntaxes,
               *pydicom.uid.JPEG2000TransferSyntaxes)  # decoded by other codecs than the reader's (pylibjpeg)
LOSSY_SYNTAX_TOLERANCE = {"1.2.840.10008.1.2.4.50": 1, "1.2.840.10008.1.2.4.51": 2}  # baseline, extended (stored units)


def reference_dicom(path: str) -> Expected:
    """GDCM's stored values and attributes, through the display rules written out in `display`."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        if not _known_sop_class(path):  # a policy of GDCM's, not a decoding error: it decides nothing
            raise Refused("GDCM reads no image of a SOP class it does not know", "GDCM's SOP class check")
        raise Refused("GDCM cannot read the file as a DICOM image")
    image = reader.GetImage()
    if image.GetNumberOfDimensions() == 3 and image.GetDimension(2) > 1:
        raise Refused(f"GDCM: {image.GetDimension(2)} frames (the reader reads single frames)")
    pixel_format = image.GetPixelFormat()
    photometric = image.GetPhotometricInterpretation().GetString().strip()
    if pixel_format.GetSamplesPerPixel() != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise Refused(f"GDCM: {photometric}, {pixel_format.GetSamplesPerPixel()} samples (not gray)")
    kind = _GDCM_TYPES.get(pixel_format.GetScalarTypeAsString())
    width, height = image.GetDimension(0), image.GetDimension(1)
    syntax = reader.GetFile().GetHeader().GetDataSetTransferSyntax().GetString().strip("\x00 ")
    codec = f"GDCM's {pydicom.uid.UID(syntax).name} codec" if syntax in JPEG_FAMILY else None
    buffer, raw = image.GetBuffer(), None
    if buffer is not None:
        raw = buffer.encode("utf-8", "surrogateescape")  # python-gdcm hands the bytes over as a str
    elif syntax == RLELossless and kind is not None:  # GDCM refuses RLE frames below 64 pixels
        raw = _rle_frame(reader.GetFile().GetDataSet(), width * height, np.dtype(kind).itemsize)
    if kind is None or raw is None:
        raise Refused(f"GDCM cannot decode the pixel data ({pixel_format.GetScalarTypeAsString()})", codec)
    if len(raw) != width * height * np.dtype(kind).itemsize or width * height == 0:
        raise Refused(f"GDCM decodes {len(raw)} bytes for {width} x {height} {np.dtype(kind)} pixels")
    stored = np.frombuffer(raw, kind).reshape(height, width).astype(np.int64)
    attributes = _gdcm_attributes(reader.GetFile())
    tolerance = LOSSY_SYNTAX_TOLERANCE.get(syntax, 0)
    bits = int(_decimal(attributes.get("BitsStored"), "Bits Stored") or pixel_format.GetBitsStored())
    signed = (_decimal(attributes.get("PixelRepresentation"), "Pixel Representation") or 0) == 1
    if not 1 <= bits <= 8 * np.dtype(kind).itemsize:
        raise Refused(f"Bits Stored {bits} for {np.dtype(kind)} samples")
    # The stored values are Bits Stored-bit integers, two's complement when Pixel Representation is 1 (PS3.5
    # 8.1.1), whatever a JPEG 2000 codestream says of its sign (GDCM follows the codestream; pydicom corrects it).
    stored &= (1 << bits) - 1
    if signed:
        stored = np.where(stored >= 1 << (bits - 1), stored - (1 << bits), stored)
    gray = [display(stored + delta, bits, signed, photometric, attributes)
            for delta in range(-tolerance, tolerance + 1)]
    low = np.minimum.reduce([g[0] for g in gray])
    high = np.maximum.reduce([g[1] for g in gray])
    return Expected("dicom", low, high, f"GDCM, stored values +-{tolerance}" if tolerance else "GDCM", codec)


def _known_sop_class(path) -> bool:
    """Whether GDCM knows the file's SOP class (its ImageReader refuses every other file, whatever its pixels)."""
    reader = gdcm.Reader()
    reader.SetFileName(str(path))
    if not reader.Read():
        return True  # not even a DICOM to GDCM: a refusal of its own
    storage = gdcm.MediaStorage()
    storage.SetFromFile(reader.GetFile())
    return str(storage) != "INVALID MEDIA STORAGE"


def _rle_frame(dataset, pixels: int, sample_bytes: int) -> bytes | None:
    """A DICOM RLE frame (PS3.5 Annex G) decoded here: the fragment as GDCM reads it, each segment by imagecodecs'
    PackBits decoder; segment k holds byte k of every sample, most significant first; samples little-endian."""
    fragments = dataset.GetDataElement(gdcm.Tag(0x7FE0, 0x0010)).GetSequenceOfFragments()
    if fragments is None or fragments.GetNumberOfFragments() != 1:
        return None
    value = fragments.GetFragment(0).GetByteValue()
    frame = b"" if value is None else value.GetBuffer().encode("utf-8", "surrogateescape")
    if len(frame) < 64:
        return None
    header = struct.unpack("<16I", frame[:64])
    count, offsets = header[0], list(header[1:header[0] + 1]) + [len(frame)]
    if count != sample_bytes or any(not 64 <= a <= b <= len(frame) for a, b in zip(offsets, offsets[1:])):
        return None
    segments = [imagecodecs.packbits_decode(frame[a:b])[:pixels] for a, b in zip(offsets, offsets[1:])]
    if any(len(segment) != pixels for segment in segments):
        return None
    return np.stack([np.frombuffer(segment, np.uint8) for segment in reversed(segments)], axis=-1).tobytes()


def _gdcm_attributes(file) -> dict:
    """The attributes of the display rules as GDCM reads them: strings of the top-level elements, and the first VOI
    LUT (descriptor, data) of the VOI LUT Sequence."""
    dataset = file.GetDataSet()
    strings = gdcm.StringFilter()
    strings.SetFile(file)
    out = {}
    for name, tag in {"BitsStored": (0x0028, 0x0101), "PixelRepresentation": (0x0028, 0x0103),
                      "RescaleSlope": (0x0028, 0x1053), "RescaleIntercept": (0x0028, 0x1052),
                      "WindowCenter": (0x0028, 0x1050), "WindowWidth": (0x0028, 0x1051),
                      "VOILUTFunction": (0x0028, 0x1056)}.items():
        if dataset.FindDataElement(gdcm.Tag(*tag)):
            out[name] = strings.ToString(gdcm.Tag(*tag)).strip("\x00 ")
    sequence_tag = gdcm.Tag(0x0028, 0x3010)
    if dataset.FindDataElement(sequence_tag):
        sequence = dataset.GetDataElement(sequence_tag).GetValueAsSQ()
        if sequence is not None and sequence.GetNumberOfItems() > 0:
            item = sequence.GetItem(1).GetNestedDataSet()
            out["VOILUT"] = tuple(_gdcm_bytes(item, tag) for tag in ((0x0028, 0x3002), (0x0028, 0x3006)))
    return out


def _gdcm_bytes(dataset, tag) -> bytes | None:
    if not dataset.FindDataElement(gdcm.Tag(*tag)):
        return None
    value = dataset.GetDataElement(gdcm.Tag(*tag)).GetByteValue()
    return None if value is None else value.GetBuffer().encode("utf-8", "surrogateescape")


def _decimal(text: str | None, name: str) -> float | None:
    """The first value of a DS / IS string; None when absent or empty."""
    if text is None or not text.split("\\")[0].strip():
        return None
    try:
        value = float(text.split("\\")[0])
    except ValueError:
        raise Refused(f"{name} {text!r} is not a number") from None
    if not np.isfinite(value):
        raise Refused(f"{name} {text!r} is not finite")
    return value


def display(stored: np.ndarray, bits: int, signed: bool, photometric: str, attributes: dict
            ) -> tuple[np.ndarray, np.ndarray]:
    """The reader's documented display rules (dicom.py; DICOM PS3.3 C.11): the lowest and highest 8-bit results
    (they differ only where the exact value is a rounding tie, within 1e-6)."""
    slope = _decimal(attributes.get("RescaleSlope"), "Rescale Slope")
    intercept = _decimal(attributes.get("RescaleIntercept"), "Rescale Intercept")
    if slope is not None and intercept is not None:  # the modality LUT: Rescale Slope and Intercept, both present
        if slope == 0:
            raise Refused("Rescale Slope 0: every pixel would map to one value")
        modality = lambda v: np.asarray(v, np.float64) * slope + intercept  # noqa: E731
    else:
        modality = lambda v: np.asarray(v, np.float64)  # noqa: E731
    values = modality(stored)
    center = _decimal(attributes.get("WindowCenter"), "Window Center")
    width = _decimal(attributes.get("WindowWidth"), "Window Width")
    function = (attributes.get("VOILUTFunction") or "LINEAR").strip().upper() or "LINEAR"
    if attributes.get("VOILUT"):
        gray = _voi_lut_display(values, *attributes["VOILUT"])
    elif center is not None and width is not None:
        if function == "LINEAR":
            if width < 1:
                raise Refused(f"Window Width {width} < 1 with LINEAR")
            bottom, top = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                inside = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
            gray = np.where(values <= bottom, 0.0, np.where(values > top, 255.0, inside))
        elif function in ("LINEAR_EXACT", "SIGMOID"):
            if width <= 0:
                raise Refused(f"Window Width {width} <= 0 with {function}")
            if function == "LINEAR_EXACT":
                gray = np.where(values <= center - width / 2, 0.0, np.where(
                    values > center + width / 2, 255.0, ((values - center) / width + 0.5) * 255))
            else:
                gray = 255 / (1 + np.exp(-4 * (values - center) / width))
        else:
            raise Refused(f"VOI LUT Function {function!r} is none of LINEAR, LINEAR_EXACT, SIGMOID")
    else:  # the BitsStored range through the modality LUT, linearly to 0..255
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        ends = modality([low, high])
        bottom, top = float(ends.min()), float(ends.max())
        gray = (values - bottom) * 255 / (top - bottom)
    gray = np.clip(gray, 0.0, 255.0)
    if photometric == "MONOCHROME1":
        gray = 255.0 - gray
    below = np.floor(gray)
    tie = np.abs(gray - below - 0.5) < 1e-6
    rounded = np.rint(gray)
    return (np.where(tie, below, rounded).astype(np.uint8),
            np.where(tie, np.minimum(below + 1, 255), rounded).astype(np.uint8))


def _voi_lut_display(values: np.ndarray, descriptor: bytes | None, data: bytes | None) -> np.ndarray:
    """PS3.3 C.11.2.1.1: input values below the first mapped value take the first entry, above the last one the
    last entry; the output, of the descriptor's bit depth, scaled to 0..255."""
    if descriptor is None or data is None or len(descriptor) != 6:
        raise Refused("VOI LUT without a 3-value descriptor or data")
    entries, first, lut_bits = struct.unpack("<HHH", descriptor)  # (the LUTs written here map unsigned values)
    entries = entries or 65536
    if lut_bits not in (8, *range(10, 17)):
        raise Refused(f"VOI LUT of {lut_bits} bits per entry")
    table = np.frombuffer(data[:len(data) // 2 * 2], "<u2").astype(np.int64)
    if len(table) < entries:
        raise Refused(f"VOI LUT with {len(table)} of its {entries} entries")
    table = table[:entries]
    if table.max() >= 2 ** lut_bits:
        raise Refused(f"VOI LUT entries above {lut_bits} bits")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)  # nearest integer, ties to even
    return table[index] * 255 / (2 ** lut_bits - 1)

