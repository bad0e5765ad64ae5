"""The image reader: raw chest X-ray files (PNG, JPEG, DICOM, ...) -> 8-bit gray, used by the dataset builders
and by inference (`metachex_jax.predict`) alike.

Every raw image goes through `read_gray(path)` (full size) or `load_gray(path, resolution)` (resized). The rule,
in one sentence: every source is mapped to 8-bit gray with ONE rounding, then every source goes through the SAME
resize, which rounds once; so every lossless encoding of the same 8-bit pixels (gray, RGB, RGBA, palette, 12-bit
in a 16-bit PNG, a 12-bit DICOM, MONOCHROME1 or 2) gives the identical model input, bit for bit (tested).

1. The format is decided by CONTENT, never by the extension (real collections hold JPEGs named .png, PNGs named
   .jpg, upper-case extensions; `file_formats.sniff`): PNG and JPEG by their signatures, DICOM by 'DICM' at byte
   128 or, for a file without that preamble, by parsing it (pydicom must find Rows, Columns and PixelData;
   `dicom.probe`), the other formats Pillow reads (TIFF, BMP, GIF, WebP, JPEG 2000, PNM) by theirs.
   - PNG, every colour type and depth, is decoded by imagecodecs (libpng), at full depth. Before decoding, every
     chunk is walked: a truncated file, a missing IEND or a bad CRC is an error (libpng checks the IDAT CRCs).
   - JPEG: the markers are walked from SOI to EOI first: a JPEG without its end-of-image marker is truncated and
     refused (libjpeg-turbo would fill the missing rows with grey; Pillow refuses it too). Gray JPEGs (8- or
     12-bit, lossy or lossless) are decoded by imagecodecs (libjpeg-turbo), colour and CMYK JPEGs by Pillow
     (which takes every CMYK JPEG as Adobe writes it, inverted). JPEG carries no checksum: damage inside the
     compressed data that leaves the markers intact decodes to wrong pixels without an error, as in viewers.
   - EXIF orientation (1-8) of JPEG (APP1) and PNG (eXIf): applied, as browsers and viewers do (Pillow's
     `ImageOps.exif_transpose`), recorded in `ImageInfo.orientation`; width and height are those of the image
     as displayed.
   - DICOM: `metachex_jax.imaging.dicom` (pydicom; its display rules are documented there).
   - TIFF of more than 8 bits per sample: libtiff (imagecodecs) at full depth, gray or RGB with or without alpha
     (Pillow keeps the high byte of 16-bit colour); MINISWHITE is inverted after the mapping; other photometric
     interpretations above 8 bits (CMYK, YCbCr, ...) are refused, naming them.
   - Anything else goes to Pillow, whose full decode is forced (`LOAD_TRUNCATED_IMAGES` is never enabled).
   A file that cannot be read raises `ImageDecodeError` whose message starts with the file's path.
2. Refused before anything is decoded (bounded memory): a header (PNG IHDR, JPEG SOF, DICOM Rows x Columns,
   Pillow's header) declaring more than `max_pixels` pixels, default DEFAULT_MAX_PIXELS = 100 megapixels
   (about 5x the largest radiographs, 4020 x 4892 Montgomery originals: 19.7 megapixels); an option of the
   builders (`prepare --max_pixels`) and of `predict`. Pillow's own limit (`Image.MAX_IMAGE_PIXELS`) is set to
   the same default for any other use of Pillow in the process; the reader applies its caller's limit itself.
3. Mapping to 8-bit gray, one rounding (`gray_8bit`):
   - alpha is dropped (never blended: the X-ray copies that carry it have it fully opaque), as is a gray PNG's
     tRNS transparency (libpng gives it as an alpha channel);
   - colour (RGB, palette, CMYK / YCbCr via Pillow's RGB) becomes ITU-R 601-2 luma, with Pillow's integer
     weights: L = (19595 R + 38470 G + 7471 B) / 65536 (the weights sum to 65536, so gray stored as colour,
     R = G = B, comes out exactly);
   - 8-bit samples: L itself, rounded half up (8-bit gray is used as is); low-depth gray PNGs (1, 2, 4 bits) are
     expanded by libpng to 0..255 (1 bit: 0 / 255);
   - high-depth samples (16-bit containers: PNG gray, gray + alpha, RGB, RGBA; TIFF; 12-bit and lossless JPEG) are
     scaled LINEARLY, round(v x 255 / (2**bits - 1)) (for colour v = L, computed in integers, so the luma is not
     truncated to 8 bits first), never clipped at 255 and never min/max-stretched, with `bits` chosen by
     `choose_bit_depth`, in this order:
       a. `bit_depth` given by the caller (`--bit_depth` of prepare and predict): used as is (samples above it
          are an error). It applies to high-depth sources only: an 8-bit file ignores it, and its
          `bit_depth_source` says so;
       b. the dataset's own metadata (`declared_bits`, e.g. PadChest's BitsStored_DICOM), when every sample fits;
       c. the PNG's sBIT chunk (the largest of its gray or colour entries), when every sample fits (a writer that
          shifted 12-bit data up to 16 bits, as the PNG standard intends, has samples above 4095: 16-bit data);
       d. the data: 12 bits if every sample is below 4096 (12-bit X-rays are commonly stored in 16-bit PNGs
          without sBIT; dividing them by 65535 leaves them almost black), else 16.
     DICOM's BitsStored plays the part of (b) inside the DICOM rules, whose result is rounded once to 8 bits.
   The bit depth used and where it came from are returned (`ImageInfo`): builds store it per record, `predict`
   writes it per row. For 8-bit data stored at 10 to 16 bits (round(v x (2**bits - 1) / 255)) the mapping gives
   v back exactly: the error of the stored value, at most 0.5, shrinks by (2**bits - 1) / 255 on the way back.
4. Optionally (`square=True`, the torchxrayvision pixel contract) the centre square of the image is cut out
   (`geometry.square_box`: torchxrayvision's XRayCenterCrop). Then the resize to R x R, aspect ratio NOT
   preserved (CheXNet-style), `resize.resize_gray`: the exact area average, rounded once, when downscaling;
   bilinear, rounded once, when upscaling (only tiny synthetic images).

`decode_many` runs `load_gray` over many files in a process pool (`decoding_pool`, every core by default; order
preserved, so builds are deterministic) and reports failures as values instead of raising, so a caller can
collect every bad file before deciding. Every failure of one file is that file's error: an exception anywhere in
its decode, crop or resize, and in a pool a decoder that crashes or spins past the per-file CPU-time limit (the
worker is replaced, `workers.WorkerPool`).

The reader is fuzzed against independent reference decoders (tests/reader_fuzz.py, docs/tests.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import os
from collections.abc import Iterator, Sequence

import imagecodecs
import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from metachex_jax.core import files
from metachex_jax.imaging import dicom, file_formats, workers
from metachex_jax.imaging.geometry import square_box
from metachex_jax.imaging.resize import resize_gray

DEFAULT_MAX_PIXELS = file_formats.DEFAULT_MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never decode half-grey
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS  # Pillow's own check, for other uses; the reader checks max_pixels
LUMA_WEIGHTS = (19595, 38470, 7471)  # ITU-R 601-2 luma x 65536, Pillow's integers (they sum to 65536)


class ImageDecodeError(ValueError):
    """A raw image file cannot be decoded; the message starts with the file path."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the reader found and decided for one file."""

    format: str  # "png", "jpeg", "dicom", ... (from the content, not the name)
    width: int  # as displayed (after the EXIF orientation), before any resizing
    height: int
    bit_depth: int  # the sample depth the 0..255 scale was computed from (8 for 8-bit files)
    bit_depth_source: str  # "8-bit file", "override", "dataset metadata", "png sBIT", "data", or the DICOM rule
    orientation: int = 1  # the EXIF orientation applied, JPEG and PNG (1: none; every other format: 1)


def choose_bit_depth(max_sample: int, *, bit_depth: int | None = None, declared_bits: int | None = None,
                     sbit: int | None = None) -> tuple[int, str]:
    """(bits, source) for a high-depth source whose largest sample is `max_sample`; see the module docstring."""
    if bit_depth:
        if max_sample >= 2 ** bit_depth:
            raise ValueError(f"bit_depth={bit_depth} was requested but samples reach {max_sample} "
                             f"(> {2 ** bit_depth - 1})")
        return bit_depth, "override"
    if declared_bits and max_sample < 2 ** declared_bits:
        return declared_bits, "dataset metadata"
    if sbit and sbit < 16 and max_sample < 2 ** sbit:
        return sbit, "png sBIT"
    note = f" (declared {declared_bits} bits, but samples reach {max_sample})" if declared_bits else ""
    return (12, "data" + note) if max_sample < 4096 else (16, "data" + note)


def eight_bit_source(bit_depth: int | None) -> str:
    """The `bit_depth_source` of an 8-bit file: a `bit_depth` override is for high-depth sources only."""
    return f"8-bit file (bit_depth={bit_depth} not applied)" if bit_depth and bit_depth != 8 else "8-bit file"


def gray_8bit(samples: np.ndarray, *, sbit: int | None = None, bit_depth: int | None = None,
              declared_bits: int | None = None) -> tuple[np.ndarray, int, str]:
    """Decoded samples, (H, W) gray or (H, W, C) with C = 2 (gray + alpha), 3 (RGB) or 4 (RGBA), 8-bit or high
    depth -> (uint8 (H, W), bits, source): the mapping of the module docstring, rounded once."""
    samples = np.asarray(samples)
    if samples.ndim == 3:
        if samples.shape[2] in (2, 4):
            samples = samples[..., :-1]  # alpha dropped
        if samples.shape[2] == 1:
            samples = samples[..., 0]
    if samples.ndim not in (2, 3) or (samples.ndim == 3 and samples.shape[2] != 3):
        raise ValueError(f"unsupported sample layout {samples.shape}")
    if samples.dtype == np.uint8:
        return (samples if samples.ndim == 2 else _luma_8bit(samples)), 8, eight_bit_source(bit_depth)
    if samples.dtype.kind not in "ui":
        raise ValueError(f"unsupported sample type {samples.dtype}")
    low, high = (int(samples.min()), int(samples.max())) if samples.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError("an image with samples outside 0..65535 is not a 16-bit image")
    bits, source = choose_bit_depth(high, bit_depth=bit_depth, declared_bits=declared_bits, sbit=sbit)
    top = 2**bits - 1
    if samples.ndim == 2:  # round(v * 255 / top), half up (exact in integers; there are no ties)
        scaled = samples.astype(np.uint32)
        scaled *= 510
        scaled += top
        scaled //= 2 * top
        return scaled.astype(np.uint8), bits, source
    luma = _luma_sum(samples, np.int64)  # 65536 x L: round(L * 255 / top), half up, in integers
    return ((luma * 510 + 65536 * top) // (131072 * top)).astype(np.uint8), bits, source


def _luma_sum(rgb: np.ndarray, dtype) -> np.ndarray:
    """65536 x the ITU-R 601-2 luma of (H, W, 3) samples, exact in integers."""
    total = rgb[..., 0].astype(dtype) * LUMA_WEIGHTS[0]
    total += rgb[..., 1].astype(dtype) * LUMA_WEIGHTS[1]
    total += rgb[..., 2].astype(dtype) * LUMA_WEIGHTS[2]
    return total


def _luma_8bit(rgb: np.ndarray) -> np.ndarray:
    """Luma of 8-bit RGB rounded half up: Pillow's convert("L"), bit for bit (the 16-bit formula with top 255)."""
    return ((_luma_sum(rgb, np.uint32) + 32768) >> 16).astype(np.uint8)


def orient(gray: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) as Pillow's `ImageOps.exif_transpose` does."""
    return {
        2: lambda a: a[:, ::-1],  # mirrored
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1, :],  # mirrored vertically
        5: lambda a: a.T,  # transposed
        6: lambda a: np.rot90(a, -1),  # stored rotated 90 counter-clockwise: turn it clockwise
        7: lambda a: np.rot90(a, 2).T,  # transversed
        8: lambda a: np.rot90(a, 1),
    }.get(orientation, lambda a: a)(gray)


def _read_png(data: bytes, options: dict) -> tuple[np.ndarray, ImageInfo]:
    layout = file_formats.png_layout(data)
    file_formats.check_pixels(layout.width, layout.height, options["max_pixels"])
    gray, bits, source = gray_8bit(imagecodecs.png_decode(data), sbit=layout.color_significant_bits,
                                   bit_depth=options["bit_depth"], declared_bits=options["declared_bits"])
    gray = np.ascontiguousarray(orient(gray, layout.orientation))
    return gray, ImageInfo("png", gray.shape[1], gray.shape[0], bits, source, layout.orientation)


def _read_jpeg(data: bytes, options: dict) -> tuple[np.ndarray, ImageInfo]:
    layout = file_formats.jpeg_layout(data)
    file_formats.check_pixels(layout.width, layout.height, options["max_pixels"])
    if layout.components == 1:
        samples = imagecodecs.jpeg8_decode(data)
    else:  # colour and CMYK: Pillow's conversion to RGB (the Adobe CMYK conventions included)
        samples = np.asarray(_pillow_rgb(data, options["max_pixels"]))
    gray, bits, source = gray_8bit(samples, bit_depth=options["bit_depth"], declared_bits=options["declared_bits"])
    gray = np.ascontiguousarray(orient(gray, layout.orientation))
    return gray, ImageInfo("jpeg", gray.shape[1], gray.shape[0], bits, source, layout.orientation)


def _pillow_rgb(data: bytes, max_pixels: int | None) -> Image.Image:
    with _pillow_open(data, max_pixels) as image:
        return image.convert("RGB")


@contextlib.contextmanager
def _pillow_open(data: bytes, max_pixels: int | None) -> Iterator[Image.Image]:
    """Pillow's image with its size checked before the pixels are decoded, and then fully decoded."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # checked below, against the caller's limit
    try:
        image = Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with image:
        file_formats.check_pixels(image.width, image.height, max_pixels)
        image.load()
        yield image


def _pillow_samples(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> samples for `gray_8bit`: gray, gray + alpha, RGB or RGBA, 8 or 16 bits."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.asarray(image).astype(np.int64 if image.mode == "I" else np.uint16)
    if image.mode in ("1", "La"):
        return np.asarray(image.convert("L"))
    if image.mode in ("P", "PA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    raise ValueError(f"unsupported image mode {image.mode!r}")


_TIFF_PHOTOMETRIC = {0: "MINISWHITE", 1: "MINISBLACK", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr",
                     8: "CIELab"}


def _read_high_depth_tiff(data: bytes, layout: file_formats.TiffLayout, options: dict
                          ) -> tuple[np.ndarray, ImageInfo]:
    """A TIFF of more than 8 bits per sample, by libtiff (imagecodecs) at full depth: gray or RGB, with or without
    extra samples such as alpha (Pillow keeps only the high byte of 16-bit colour, cannot open gray + alpha or
    separate planes, and leaves 16-bit MINISWHITE uninverted)."""
    file_formats.check_pixels(layout.width, layout.height, options["max_pixels"])
    colour = {0: 1, 1: 1, 2: 3}.get(layout.photometric)
    name = _TIFF_PHOTOMETRIC.get(layout.photometric, str(layout.photometric))
    if colour is None:
        raise file_formats.FormatError(f"{layout.bits}-bit {name} TIFF: above 8 bits per sample only gray "
                                       "(MINISBLACK, MINISWHITE) and RGB TIFFs are read")
    samples = imagecodecs.tiff_decode(data)
    planes = samples.shape[2] if samples.ndim == 3 else 1
    if samples.ndim not in (2, 3) or planes not in (colour, colour + 1):
        raise file_formats.FormatError(f"{name} TIFF with {planes} samples per pixel (expected {colour}, or "
                                       f"{colour + 1} with alpha)")
    gray, bits, source = gray_8bit(samples, bit_depth=options["bit_depth"], declared_bits=options["declared_bits"])
    if layout.photometric == 0:  # MINISWHITE: 0 is white; inverted after the mapping, like DICOM's MONOCHROME1
        gray = 255 - gray
        source += ", MINISWHITE inverted"
    return gray, ImageInfo("tiff", gray.shape[1], gray.shape[0], bits, source)


def _read_with_pillow(data: bytes, options: dict) -> tuple[np.ndarray, ImageInfo]:
    with _pillow_open(data, options["max_pixels"]) as image:
        samples = _pillow_samples(image)
        file_format = (image.format or "unknown").lower()
    gray, bits, source = gray_8bit(samples, bit_depth=options["bit_depth"], declared_bits=options["declared_bits"])
    return gray, ImageInfo(file_format, gray.shape[1], gray.shape[0], bits, source)


def _read_dicom(dataset, options: dict) -> tuple[np.ndarray, ImageInfo]:
    gray, bits, rule = dicom.read_dicom(dataset, options["bit_depth"], max_pixels=options["max_pixels"])
    return gray, ImageInfo("dicom", gray.shape[1], gray.shape[0], bits, rule)


def read_gray(path: str | os.PathLike, *, bit_depth: int | None = None, declared_bits: int | None = None,
              max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Decode `path` at full size to uint8 gray (H, W) as displayed; see the module docstring.

    Raises ImageDecodeError naming the file for empty, truncated, corrupt, unsupported or refused files.
    """
    options = {"bit_depth": bit_depth, "declared_bits": declared_bits, "max_pixels": max_pixels}
    try:
        if files.is_url(path):  # an image of a raw copy in Cloud Storage (data/build/staging.py)
            data = files.read_bytes(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
        if not data:
            raise ValueError("the file is empty")
        kind = file_formats.sniff(data[:file_formats.HEAD_BYTES])
        if kind == "png":
            return _read_png(data, options)
        if kind == "jpeg":
            return _read_jpeg(data, options)
        if kind == "dicom":
            return _read_dicom(dicom.parse(data), options)
        if kind == "unknown":  # no signature: a DICOM file without preamble?
            dataset = dicom.probe(data)
            if dataset is not None:
                return _read_dicom(dataset, options)
        if data.startswith(file_formats.TIFF_SIGNATURES):
            layout = file_formats.tiff_layout(data)
            if layout is not None and layout.bits > 8:
                return _read_high_depth_tiff(data, layout, options)
        return _read_with_pillow(data, options)
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise ImageDecodeError(f"{os.fspath(path)}: cannot decode image ({_reason(exc)})") from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, (dicom.DicomError, file_formats.FormatError)):
        return str(exc)
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not an image file this reader knows (PNG, JPEG, DICOM, TIFF, ...)"
    return f"{type(exc).__name__}: {exc}"


def load_gray(path: str | os.PathLike, resolution: int | None, *, bit_depth: int | None = None,
              declared_bits: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode `path` to uint8 gray, resized to (resolution, resolution) (or full size when resolution is None).

    Raises ImageDecodeError naming the file for truncated, corrupt, unsupported or refused images.
    """
    return load_gray_with_info(path, resolution, bit_depth=bit_depth, declared_bits=declared_bits,
                               max_pixels=max_pixels)[0]


def load_gray_with_info(path: str | os.PathLike, resolution: int | None, *, bit_depth: int | None = None,
                        declared_bits: int | None = None, square: bool = False,
                        max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """`load_gray` and the reader's `ImageInfo` (format, size, bit depth used, orientation). `square`: cut out
    the centre square before resizing (see the module docstring)."""
    gray, info = read_gray(path, bit_depth=bit_depth, declared_bits=declared_bits, max_pixels=max_pixels)
    if square:
        top, left, side = square_box(*gray.shape)
        gray = gray[top:top + side, left:left + side]
    return (gray if resolution is None else resize_gray(gray, resolution)), info


@dataclasses.dataclass(frozen=True)
class _Job:
    path: str
    resolution: int | None
    bit_depth: int | None = None
    declared_bits: int | None = None
    square: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS


def _decode_one(job: _Job) -> tuple[np.ndarray | None, str | None, ImageInfo | None]:
    """One file's (image, None, info), or (None, error naming the file, None): whatever fails for this file
    (reading, cropping, resizing) is this file's error, never the end of a build or `predict` run."""
    try:
        image, info = load_gray_with_info(job.path, job.resolution, bit_depth=job.bit_depth,
                                          declared_bits=job.declared_bits, square=job.square,
                                          max_pixels=job.max_pixels)
        return image, None, info
    except ImageDecodeError as exc:
        return None, str(exc), None
    except Exception as exc:  # noqa: BLE001 - e.g. the resize of an image of an odd shape
        return None, f"{job.path}: cannot decode image ({_reason(exc)})", None


def _lost(job: _Job, reason: str) -> tuple[None, str, None]:
    """The result of a file whose decoding process died or spun (workers.WorkerPool)."""
    return None, f"{job.path}: cannot decode image ({reason})", None


def default_num_workers() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _keep_large_buffers_on_the_heap() -> None:
    """Decoding workers' initializer: glibc maps and unmaps every buffer above 32 MB by default (a dynamic
    threshold that large images keep resetting); a 2000 x 2000 image is 8 MB of file, 8 MB of samples and 16 MB
    of float32, so each decode paid page faults on fresh mappings, about a third of its time (measured: a 16-bit
    PadChest-like decode went from 1.37x to 1.5-1.6x a naive PIL loop). Buffers up to 64 MB now come from the
    heap, which keeps up to 128 MB of freed memory per worker. A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def decoding_pool(num_workers: int | None = None, *, pool_for_one: bool = False,
                  cpu_limit_s: int = workers.DEFAULT_CPU_LIMIT_S) -> Iterator[workers.WorkerPool | None]:
    """A pool of decoding processes for `decode_many` (None when num_workers == 1, unless pool_for_one: decode in
    this process, without the pool's protection).

    One file cannot break the pool (`workers.WorkerPool`): a decoder that crashes or spins past `cpu_limit_s` of CPU
    time on a file costs its worker, which is replaced, and that file is reported as bad with the reason; the other
    files go on. "spawn" workers: a script that builds datasets needs an `if __name__ == "__main__":` guard (without
    one the workers die as they start: RuntimeError). Workers keep large buffers on the heap
    (`_keep_large_buffers_on_the_heap`).
    """
    num_workers = num_workers or default_num_workers()
    if num_workers <= 1 and not pool_for_one:
        yield None
        return
    with workers.WorkerPool(num_workers, cpu_limit_s=cpu_limit_s,
                            initializer=_keep_large_buffers_on_the_heap) as pool:
        yield pool


_CHUNK = 16  # images per task: few round trips, yet smooth progress and load balance
_CHUNKS_IN_FLIGHT_PER_WORKER = 4  # bounds the decoded images held in memory when the consumer is slower


def decode_many(
    paths: Sequence[str | os.PathLike],
    resolution: int | None,
    *,
    pool: workers.WorkerPool | None = None,
    desc: str = "decoding images",
    progress: bool = True,
    bit_depth: int | None = None,
    declared_bits: Sequence[int | None] | None = None,
    with_info: bool = False,
    square: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple]:
    """Yield (image, None) or (None, error message) for each path, in order (so builds are deterministic);
    with `with_info`, (image, None, ImageInfo) or (None, error, None). Never raises for a file: every failure of
    one (decoding, cropping, resizing, a decoder that crashes or hangs in a pool) is that file's error message,
    which starts with its path.

    Decodes in `pool` (see `decoding_pool`) or, when pool is None, in this process. With resolution=None images
    are decoded at full size (a check). `bit_depth` overrides the depth of every high-depth file; `declared_bits`
    gives each path's depth from the dataset's metadata (None where unknown); see `choose_bit_depth`. `square`
    cuts out each image's centre square before resizing (`load_gray_with_info`); `max_pixels` refuses larger
    images (None: no limit).
    """
    if declared_bits is not None and len(declared_bits) != len(paths):
        raise ValueError(f"{len(declared_bits)} declared bit depths for {len(paths)} paths")
    declared = declared_bits if declared_bits is not None else [None] * len(paths)
    jobs = [_Job(os.fspath(p), resolution, bit_depth, d, square, max_pixels) for p, d in zip(paths, declared)]
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, mininterval=1.0) as bar:
        if pool is None:
            results = map(_decode_one, jobs)
        else:
            results = pool.map(_decode_one, jobs, lost=_lost, chunk=_CHUNK,
                               in_flight=_CHUNKS_IN_FLIGHT_PER_WORKER * pool.num_workers)
        for result in results:
            bar.update(1)
            yield result if with_info else result[:2]


def check_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """None when `path` decodes fully, else the error message (used by the raw-data verifier)."""
    return _decode_one(_Job(os.fspath(path), None, max_pixels=max_pixels))[1]


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageInfo",
    "choose_bit_depth",
    "check_image",
    "decode_many",
    "decoding_pool",
    "default_num_workers",
    "gray_8bit",
    "load_gray",
    "load_gray_with_info",
    "orient",
    "read_gray",
    "resize_gray",
]
