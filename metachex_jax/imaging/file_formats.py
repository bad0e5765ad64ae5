"""What an image file's bytes say before any pixel is decoded: its format (by content, never by name), its
dimensions (so that a decompression bomb is refused before anything is allocated) and whether it is complete.

    sniff(head)            "png", "jpeg", "dicom" (preamble + 'DICM'), "pillow" (another format Pillow reads,
                           known by its signature: TIFF, BMP, GIF, WebP, JPEG 2000, PNM) or "unknown" (then the
                           reader tries DICOM by parsing, dicom.py, and Pillow last)
    png_layout(data)       IHDR, sBIT (before IDAT), the EXIF orientation (first eXIf chunk, IFD0 tag 0x0112);
                           walks every chunk to IEND: a truncated file, a missing IEND or a bad CRC of any chunk
                           but IDAT is an error (libpng checks the IDAT CRCs while it decodes)
    jpeg_layout(data)      the frame header (SOF: size, components, precision), the EXIF orientation (first APP1
                           "Exif" segment, IFD0 tag 0x0112) and the end-of-image marker: a JPEG without EOI is
                           truncated (libjpeg-turbo would fill the missing rows with grey, Pillow refuses it)
    tiff_layout(data)      the first image's size, bits and samples per pixel, photometric interpretation (IFD0 of
                           a classic TIFF; None for BigTIFF)
    check_pixels(...)      refuses width x height above `max_pixels`

Every function raises `FormatError` (a ValueError) with a message that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib

# The reader's default limit: about 5x the largest radiographs (Montgomery's 4020 x 4892 originals: 19.7 MP).
DEFAULT_MAX_PIXELS = 100_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
HEAD_BYTES = 132  # a DICOM preamble + 'DICM'

# Signatures of the other formats Pillow reads that X-ray copies come in. A file without any known signature is
# tried as DICOM first (files without preamble), because some of Pillow's plugins (TGA) have no signature at all.
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF, BigTIFF
_PILLOW_SIGNATURES = (
    *TIFF_SIGNATURES,
    b"BM",  # BMP
    b"GIF87a", b"GIF89a",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51",  # JPEG 2000 (JP2 box, raw codestream)
)
_PNM = re.compile(rb"P[1-7]\s")
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE_MARKERS = frozenset((0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))
# In entropy-coded data a 0xFF byte is followed by 0x00 (a stuffed byte), a restart marker (D0-D7) or a fill
# byte (FF); anything else is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
EXIF_ORIENTATION_TAG = 0x0112


class FormatError(ValueError):
    """The file's structure is broken (truncated, bad checksum, missing header) or it declares too many pixels."""


def sniff(head: bytes) -> str:
    """The format the first bytes (at least HEAD_BYTES when the file has them) announce; see the module docstring."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PILLOW_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or _PNM.match(head):
        return "pillow"
    return "unknown"


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image whose header declares more than `max_pixels` pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise FormatError(f"the file declares {width} x {height} = {width * height:,} pixels, above the limit "
                          f"max_pixels={max_pixels:,}: refused before decoding (a corrupt header or a "
                          "decompression bomb; raise max_pixels if the image is real)")


@dataclasses.dataclass(frozen=True)
class PngLayout:
    width: int
    height: int
    bit_depth: int  # per sample: 1, 2, 4, 8 or 16
    color_type: int  # 0 gray, 2 RGB, 3 palette, 4 gray + alpha, 6 RGBA
    significant_bits: bytes | None  # the sBIT chunk (one byte per channel), or None
    orientation: int = 1  # EXIF orientation 1..8 of the eXIf chunk (1: as stored, or no eXIf, or unreadable)

    @property
    def color_significant_bits(self) -> int | None:
        """The depth sBIT declares for the gray or colour samples (the largest of R, G, B; alpha left out)."""
        if not self.significant_bits:
            return None
        channels = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}.get(self.color_type, 1)
        return max(self.significant_bits[:channels])


def png_layout(data: bytes) -> PngLayout:
    """Walk every chunk of a PNG (see the module docstring); the layout it declares."""
    if not data.startswith(PNG_SIGNATURE):
        raise FormatError("not a PNG file (no PNG signature)")
    pos, ihdr, sbit, orientation, after_image_data = len(PNG_SIGNATURE), None, None, None, False
    while True:
        if pos + 8 > len(data):
            raise FormatError("truncated PNG: the file ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise FormatError(f"truncated PNG: the file ends inside a {kind!r} chunk")
        body = data[pos + 8:pos + 8 + length]
        if kind != b"IDAT":
            (stored_crc,) = struct.unpack(">I", data[end - 4:end])
            if zlib.crc32(body, zlib.crc32(kind)) != stored_crc:
                raise FormatError(f"corrupt PNG: CRC error in its {kind!r} chunk")
        if ihdr is None:
            if kind != b"IHDR" or length != 13:
                raise FormatError("corrupt PNG: the first chunk is not a 13-byte IHDR")
            ihdr = struct.unpack(">IIBB", body[:10])
        elif kind == b"sBIT" and not after_image_data:  # an sBIT after IDAT is out of place: libpng ignores it
            sbit = body
        elif kind == b"IDAT":
            after_image_data = True
        elif kind == b"eXIf" and orientation is None:
            orientation = exif_orientation(body[6:] if body.startswith(b"Exif\x00\x00") else body)
        elif kind == b"IEND":
            width, height, depth, color_type = ihdr
            return PngLayout(width, height, depth, color_type, sbit or None, orientation or 1)
        pos = end


@dataclasses.dataclass(frozen=True)
class JpegLayout:
    width: int
    height: int
    components: int  # 1 gray, 3 YCbCr / RGB, 4 CMYK / YCCK
    precision: int  # bits per sample: 8, or 12 / 16 for lossless and extended JPEGs
    orientation: int  # EXIF orientation 1..8 (1: as stored; 1 also when there is no EXIF or it is unreadable)


def jpeg_layout(data: bytes) -> JpegLayout:
    """Walk the markers of a JPEG from SOI to EOI (see the module docstring); the layout it declares."""
    if not data.startswith(b"\xff\xd8"):
        raise FormatError("not a JPEG file (no SOI marker)")
    pos, frame, orientation = 2, None, None
    while True:
        pos = data.find(b"\xff", pos)  # bytes between segments are skipped, as libjpeg does (with a warning)
        while 0 <= pos < len(data) - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos < 0 or pos + 1 >= len(data):
            raise FormatError("truncated JPEG: the file ends before its end-of-image marker")
        marker, pos = data[pos + 1], pos + 2
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE_MARKERS or marker == 0x00:
            continue
        if pos + 2 > len(data):
            raise FormatError("truncated JPEG: the file ends inside a marker segment")
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2 or pos + length > len(data):
            raise FormatError(f"truncated or corrupt JPEG: a marker segment (0xFF{marker:02X}) of length {length} "
                              "runs past the end of the file")
        segment = data[pos + 2:pos + length]
        if marker in _SOF_MARKERS and frame is None:
            if len(segment) < 6:
                raise FormatError("corrupt JPEG: short frame header")
            precision, height, width, components = struct.unpack(">BHHB", segment[:6])
            frame = (width, height, components, precision)
        elif marker == 0xE1 and orientation is None and segment.startswith(b"Exif\x00\x00"):
            orientation = exif_orientation(segment[6:])
        pos += length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            if frame is None:
                raise FormatError("corrupt JPEG: a scan before the frame header")
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                raise FormatError("truncated JPEG: the file ends inside the image data (no end-of-image marker)")
            pos = found.start()
    if frame is None:
        raise FormatError("corrupt JPEG: no frame header (SOF)")
    width, height, components, precision = frame
    return JpegLayout(width, height, components, precision, orientation or 1)


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF block (a TIFF header and IFDs); 1 when absent, out of
    range or unreadable, as Pillow's `ImageOps.exif_transpose` then leaves the image as it is."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    magic, ifd = struct.unpack(order + "HI", tiff[2:8])
    if magic != 42 or ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        tag, kind, n = struct.unpack(order + "HHI", tiff[entry:entry + 8])
        if tag == EXIF_ORIENTATION_TAG:
            if n != 1 or kind not in (3, 4):  # SHORT or LONG
                return 1
            (value,) = struct.unpack(order + ("H" if kind == 3 else "I"), tiff[entry + 8:entry + (10 if kind == 3
                                                                                                  else 12)])
            return value if 1 <= value <= 8 else 1
    return 1


@dataclasses.dataclass(frozen=True)
class TiffLayout:
    width: int
    height: int
    bits: int  # the largest BitsPerSample
    samples: int  # SamplesPerPixel (colour or gray, plus extra samples such as alpha)
    photometric: int  # 0 MINISWHITE, 1 MINISBLACK, 2 RGB, 3 palette, 5 CMYK, 6 YCbCr, 8 CIELab, ...


_TIFF_TYPES = {3: "H", 4: "I"}  # SHORT, LONG: the types of the tags read here


def tiff_layout(data: bytes) -> TiffLayout | None:
    """The first image's layout of a classic TIFF (IFD0); None for a BigTIFF. FormatError when IFD0 is cut or
    lacks the image's size."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        raise FormatError("not a TIFF file")
    magic, ifd = struct.unpack(order + "HI", data[2:8])
    if magic == 43:
        return None
    if ifd + 2 > len(data):
        raise FormatError("truncated or corrupt TIFF: its first image directory lies past the end of the file")
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    if ifd + 2 + 12 * count > len(data):
        raise FormatError("truncated TIFF: the file ends inside its first image directory")
    tags = {}
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind, n = struct.unpack(order + "HHI", data[entry:entry + 8])
        if kind in _TIFF_TYPES and n:
            size = struct.calcsize(_TIFF_TYPES[kind]) * n
            at = entry + 8 if size <= 4 else struct.unpack(order + "I", data[entry + 8:entry + 12])[0]
            if at + size <= len(data):
                tags[tag] = struct.unpack(order + _TIFF_TYPES[kind] * n, data[at:at + size])
    if 256 not in tags or 257 not in tags:
        raise FormatError("corrupt TIFF: its first image directory gives no width or height")
    return TiffLayout(width=tags[256][0], height=tags[257][0], bits=max(tags.get(258, (1,))),
                      samples=tags.get(277, (1,))[0], photometric=tags.get(262, (1,))[0])
