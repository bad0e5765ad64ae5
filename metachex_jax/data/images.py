"""The image reader: raw chest X-ray files (PNG, JPEG, DICOM, ...) -> 8-bit gray, used by the dataset builders
and by inference (`metachex_jax.predict`) alike.

Every raw image goes through `read_gray(path)` (full size) or `load_gray(path, resolution)` (resized):

1. The format is decided by CONTENT, never by the extension (real collections hold JPEGs named .png, PNGs named
   .jpg, upper-case extensions): DICOM ('DICM' at byte 128, or a file without the preamble that starts with a
   group 0002/0008 tag) goes to `metachex_jax.data.dicom` (pydicom; its rules are documented there); everything
   else is opened by Pillow, which also identifies formats from their first bytes (PNG, JPEG, TIFF, BMP, ...).
   A full decode is forced, so a truncated or corrupt file fails here with an `ImageDecodeError` naming the file
   (Pillow's `LOAD_TRUNCATED_IMAGES` is never enabled). Gray 8/16-bit PNGs and gray JPEGs, what X-ray
   collections hold, are decoded by imagecodecs (`_decode_gray_fast`: zlib-ng and libjpeg-turbo in one C call,
   about twice Pillow's speed on a 2000x2000 16-bit PNG; the same pixels, tested); every other file by Pillow.
2. Conversion to gray on a 0..255 scale:
   - 8-bit gray ("L") is used as is; "1" (bilevel) becomes 0/255.
   - RGB / RGBA / LA / palette ("P") go through Pillow's ITU-R 601-2 luma conversion; alpha is dropped (the X-ray
     copies that carry alpha have it fully opaque). Gray stored as colour (R = G = B) thus comes out unchanged.
   - 16-bit gray ("I;16*", or 32-bit "I" holding 16-bit samples) is scaled LINEARLY, v * 255 / (2**bits - 1),
     never clipped at 255 and never min/max-stretched, with `bits` chosen by `choose_bit_depth`, in this order:
       a. `bit_depth` given by the caller (`--bit_depth`): used as is (samples above it are an error);
       b. the dataset's own metadata (`declared_bits`, e.g. PadChest's BitsStored_DICOM), when every sample fits;
       c. the PNG's sBIT chunk, when every sample fits (a writer that shifted 12-bit data up to 16 bits, as the
          PNG standard intends, has samples above 4095: those are 16-bit data);
       d. the data: 12 bits if every sample is below 4096 (12-bit X-rays are commonly stored in 16-bit PNGs
          without sBIT; dividing them by 65535 leaves them almost black), else 16.
     DICOM's BitsStored plays the part of (b) inside the DICOM rules.
   The bit depth used and where it came from are returned (`ImageInfo`): builds store it per record, `predict`
   writes it per row.
3. Optionally (`square=True`, the torchxrayvision pixel contract) the centre square of the image is cut out first
   (`augment.square_box`: torchxrayvision's XRayCenterCrop).
   Resize to R x R with aspect ratio NOT preserved (CheXNet-style). Downscaling uses Pillow's BOX filter, an exact
   area average (like OpenCV's INTER_AREA): no ringing, no aliasing. Upscaling (only tiny synthetic images) uses
   BILINEAR. High-depth sources are resized in float ("F" mode) before rounding, so only one rounding happens.

`decode_many` runs `load_gray` over many files in a process pool (`decoding_pool`, every core by default; order
preserved, so builds are deterministic) and reports failures as values instead of raising, so a caller can
collect every bad file before deciding.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import imagecodecs
import numpy as np
from PIL import Image, ImageFile

from metachex_jax.data import dicom

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never decode half-grey

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_HEAD_BYTES = 132  # enough for the DICOM preamble + 'DICM' (and a PNG's IHDR chunk)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """A raw image file cannot be decoded; the message starts with the file path."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the reader found and decided for one file."""

    format: str  # "png", "jpeg", "dicom", ... (from the content, not the name)
    width: int  # of the file, before any resizing
    height: int
    bit_depth: int  # the sample depth the 0..255 scale was computed from (8 for 8-bit files)
    bit_depth_source: str  # "8-bit file", "override", "dataset metadata", "png sBIT", "data", or the DICOM rule


def png_significant_bits(path: str | os.PathLike) -> int | None:
    """The gray sample depth recorded in a PNG's sBIT chunk, or None (no chunk / not a PNG).

    Pillow does not expose sBIT, so this walks the chunk list up to the first IDAT.
    """
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            header = f.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind in (b"IDAT", b"IEND"):
                return None
            data = f.read(length)
            f.read(4)  # CRC
            if kind == b"sBIT" and length >= 1:
                return data[0]


def choose_bit_depth(max_sample: int, *, bit_depth: int | None = None, declared_bits: int | None = None,
                     sbit: int | None = None) -> tuple[int, str]:
    """(bits, source) for a 16-bit container whose largest sample is `max_sample`; see the module docstring."""
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


def to_gray(image: Image.Image, significant_bits: int | None = None, *, bit_depth: int | None = None,
            declared_bits: int | None = None) -> Image.Image:
    """Convert a decoded image to gray on a 0..255 scale: mode "L", or mode "F" for 16-bit sources."""
    return _to_gray(image, significant_bits, bit_depth=bit_depth, declared_bits=declared_bits)[0]


def _scale_high_depth(values: np.ndarray, sbit: int | None, *, bit_depth: int | None,
                      declared_bits: int | None) -> tuple[Image.Image, int, str]:
    """(mode "F" image on 0..255, bits, source) for 16-bit samples (rule of the module docstring)."""
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError("an image with samples outside 0..65535 is not a 16-bit gray image")
    bits, source = choose_bit_depth(high, bit_depth=bit_depth, declared_bits=declared_bits, sbit=sbit)
    scaled = values.astype(np.float32)
    scaled *= np.float32(255.0 / (2**bits - 1))
    return Image.fromarray(scaled), bits, source  # float32 -> mode "F" (naming the mode takes a 5x slower path)


def _to_gray(image: Image.Image, sbit: int | None, *, bit_depth: int | None,
             declared_bits: int | None) -> tuple[Image.Image, int, str]:
    """(gray image, bits, source) for a Pillow image."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _scale_high_depth(np.asarray(image), sbit, bit_depth=bit_depth, declared_bits=declared_bits)
    if bit_depth and bit_depth != 8:
        raise ValueError(f"bit_depth={bit_depth} was requested for an 8-bit {image.mode} image")
    if image.mode == "L":
        return image, 8, "8-bit file"
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGB")  # drop alpha before the luma conversion
    if image.mode in ("RGB", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("L"), 8, "8-bit file"
    raise ValueError(f"unsupported image mode {image.mode!r}")


def _decode_gray_fast(path: str | os.PathLike, head: bytes) -> tuple[np.ndarray, str] | None:
    """(samples, format) of a gray 8/16-bit PNG or a gray JPEG, decoded by imagecodecs; None for any other file."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR" and head[25] == 0 and head[24] in (8, 16):
        with open(path, "rb") as f:
            return imagecodecs.png_decode(f.read()), "png"
    if head.startswith(b"\xff\xd8\xff"):
        with open(path, "rb") as f:
            samples = imagecodecs.jpeg8_decode(f.read())
        return (samples, "jpeg") if samples.ndim == 2 else None  # colour: Pillow's luma conversion, below
    return None


def read_gray(path: str | os.PathLike, *, bit_depth: int | None = None,
              declared_bits: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """Decode `path` at full size to a gray Pillow image ("L", or "F" on 0..255 for high-depth sources).

    Raises ImageDecodeError naming the file for empty, truncated, corrupt, unsupported or refused files.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
        if not head:
            raise ValueError("the file is empty")
        if dicom.is_dicom(head):
            pixels, bits, rule = dicom.read_dicom(path, bit_depth)
            gray = Image.fromarray(np.asarray(pixels, np.float32))  # mode "F"
            return gray, ImageInfo("dicom", gray.width, gray.height, bits, rule)
        fast = _decode_gray_fast(path, head)
        if fast is not None:
            samples, file_format = fast
            if samples.dtype == np.uint16:
                gray, bits, source = _scale_high_depth(samples, png_significant_bits(path), bit_depth=bit_depth,
                                                       declared_bits=declared_bits)
            elif bit_depth and bit_depth != 8:
                raise ValueError(f"bit_depth={bit_depth} was requested for an 8-bit L image")
            else:
                gray, bits, source = Image.fromarray(samples), 8, "8-bit file"
            return gray, ImageInfo(file_format, samples.shape[1], samples.shape[0], bits, source)
        with Image.open(path) as image:
            image.load()
            sbit = png_significant_bits(path) if image.mode in _SIXTEEN_BIT_MODES else None
            gray, bits, source = _to_gray(image, sbit, bit_depth=bit_depth, declared_bits=declared_bits)
            return gray, ImageInfo((image.format or "unknown").lower(), image.width, image.height, bits, source)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise ImageDecodeError(f"{os.fspath(path)}: cannot decode image ({_reason(exc)})") from exc


def _reason(exc: Exception) -> str:
    if isinstance(exc, dicom.DicomError):
        return str(exc)
    if type(exc).__name__ == "UnidentifiedImageError":
        return "not an image file this reader knows (PNG, JPEG, DICOM, TIFF, ...)"
    return f"{type(exc).__name__}: {exc}"


def resize_gray(gray: Image.Image, resolution: int | None) -> np.ndarray:
    """Resize a gray ("L" or "F") image to (resolution, resolution) uint8 (None: keep the size).

    See the module docstring for the filters.
    """
    if resolution is not None:
        downscaling = gray.width >= resolution and gray.height >= resolution
        resample = Image.Resampling.BOX if downscaling else Image.Resampling.BILINEAR
        gray = gray.resize((resolution, resolution), resample=resample)
    if gray.mode == "F":
        return np.clip(np.rint(np.asarray(gray)), 0, 255).astype(np.uint8)
    return np.asarray(gray, dtype=np.uint8)


def load_gray(path: str | os.PathLike, resolution: int | None, *, bit_depth: int | None = None,
              declared_bits: int | None = None) -> np.ndarray:
    """Decode `path` to uint8 gray, resized to (resolution, resolution) (or full size when resolution is None).

    Raises ImageDecodeError naming the file for truncated, corrupt or unsupported images.
    """
    return load_gray_with_info(path, resolution, bit_depth=bit_depth, declared_bits=declared_bits)[0]


def load_gray_with_info(path: str | os.PathLike, resolution: int | None, *, bit_depth: int | None = None,
                        declared_bits: int | None = None, square: bool = False) -> tuple[np.ndarray, ImageInfo]:
    """`load_gray` and the reader's `ImageInfo` (format, original size, bit depth used). `square`: cut out the
    centre square before resizing (see the module docstring)."""
    gray, info = read_gray(path, bit_depth=bit_depth, declared_bits=declared_bits)
    if square:
        from metachex_jax.data.augment import square_box

        top, left, side = square_box(gray.height, gray.width)
        gray = gray.crop((left, top, left + side, top + side))
    return resize_gray(gray, resolution), info


@dataclasses.dataclass(frozen=True)
class _Job:
    path: str
    resolution: int | None
    bit_depth: int | None = None
    declared_bits: int | None = None
    square: bool = False


def _decode_one(job: _Job) -> tuple[np.ndarray | None, str | None, ImageInfo | None]:
    try:
        image, info = load_gray_with_info(job.path, job.resolution, bit_depth=job.bit_depth,
                                          declared_bits=job.declared_bits, square=job.square)
        return image, None, info
    except ImageDecodeError as exc:
        return None, str(exc), None


def _decode_chunk(jobs: list[_Job]) -> list[tuple[np.ndarray | None, str | None, ImageInfo | None]]:
    return [_decode_one(job) for job in jobs]


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
def decoding_pool(num_workers: int | None = None, *,
                  pool_for_one: bool = False) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool for `decode_many` (None when num_workers == 1, unless pool_for_one: decode in this process).

    "spawn" start method: forking a process that has imported JAX or TFDS (threads) can deadlock. As with any spawn
    pool, a script that builds datasets needs an `if __name__ == "__main__":` guard; without one the workers die
    and the build fails with BrokenProcessPool (a ProcessPoolExecutor, unlike multiprocessing.Pool, does not hang).
    Workers keep large buffers on the heap (`_keep_large_buffers_on_the_heap`).
    """
    num_workers = num_workers or default_num_workers()
    if num_workers <= 1 and not pool_for_one:
        yield None
        return
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_keep_large_buffers_on_the_heap) as pool:
        yield pool


_CHUNK = 16  # images per task: few round trips, yet smooth progress and load balance
_CHUNKS_IN_FLIGHT_PER_WORKER = 4  # bounds the decoded images held in memory when the consumer is slower


def decode_many(
    paths: Sequence[str | os.PathLike],
    resolution: int | None,
    *,
    pool: ProcessPoolExecutor | None = None,
    desc: str = "decoding images",
    progress: bool = True,
    bit_depth: int | None = None,
    declared_bits: Sequence[int | None] | None = None,
    with_info: bool = False,
    square: bool = False,
) -> Iterator[tuple]:
    """Yield (image, None) or (None, error message) for each path, in order (so builds are deterministic);
    with `with_info`, (image, None, ImageInfo) or (None, error, None).

    Decodes in `pool` (see `decoding_pool`) or, when pool is None, in this process. With resolution=None images
    are decoded at full size (a check). `bit_depth` overrides every file's depth; `declared_bits` gives each
    path's depth from the dataset's metadata (None where unknown); see `choose_bit_depth`. `square` cuts out each
    image's centre square before resizing (`load_gray_with_info`).
    """
    from tqdm import tqdm

    if declared_bits is not None and len(declared_bits) != len(paths):
        raise ValueError(f"{len(declared_bits)} declared bit depths for {len(paths)} paths")
    declared = declared_bits if declared_bits is not None else [None] * len(paths)
    jobs = [_Job(os.fspath(p), resolution, bit_depth, d, square) for p, d in zip(paths, declared)]
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, mininterval=1.0) as bar:
        if pool is None:
            results = map(_decode_chunk, chunks)
        else:
            results = _ordered_bounded_map(pool, _decode_chunk, chunks,
                                           in_flight=_CHUNKS_IN_FLIGHT_PER_WORKER * default_num_workers())
        for chunk_results in results:
            bar.update(len(chunk_results))
            for result in chunk_results:
                yield result if with_info else result[:2]


def _ordered_bounded_map(pool: ProcessPoolExecutor, fn, items: list, in_flight: int) -> Iterator:
    """pool.map, but with at most `in_flight` tasks submitted and not yet consumed."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as exc:
        raise RuntimeError("an image decoding worker died; if this runs from a script, put the work under "
                           "`if __name__ == '__main__':` (spawned workers re-import the main module)") from exc


def check_image(path: str | os.PathLike) -> str | None:
    """None when `path` decodes fully, else the error message (used by the raw-data verifier)."""
    return _decode_one(_Job(os.fspath(path), None))[1]


__all__ = [
    "ImageDecodeError",
    "ImageInfo",
    "choose_bit_depth",
    "read_gray",
    "load_gray_with_info",
    "check_image",
    "decode_many",
    "decoding_pool",
    "default_num_workers",
    "load_gray",
    "png_significant_bits",
    "resize_gray",
    "to_gray",
]
