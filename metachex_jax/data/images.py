"""Decode raw chest X-ray PNGs to 8-bit gray and resize them once, at dataset build time.

Every raw image goes through `load_gray(path, resolution)`:

1. Open with Pillow and force a full decode (`Image.load()`), so a truncated or corrupt file fails here with an
   `ImageDecodeError` naming the file (Pillow's `LOAD_TRUNCATED_IMAGES` is never enabled).
2. Convert to gray on a 0..255 scale (`to_gray`):
   - 8-bit gray ("L") is used as is; "1" (bilevel) becomes 0/255.
   - RGB / RGBA / LA / palette ("P") go through Pillow's ITU-R 601-2 luma conversion; alpha is dropped (the X-ray
     copies that carry alpha have it fully opaque).
   - 16-bit gray ("I;16", "I;16B", "I;16L") and 32-bit integer "I" holding 16-bit samples are scaled LINEARLY by
     their true bit range, v * 255 / (2**bits - 1), never clipped at 255 (Pillow's own I->L conversion clips, which
     turns a 16-bit X-ray into a white sheet). `bits` is 16, the PNG container depth, unless the file carries an
     sBIT chunk with fewer significant bits AND all samples fit in that many bits (a writer that stored 12-bit data
     unshifted); then the 12-bit range is used. There is no per-image min/max stretch: contrast is the file's.
3. Resize to R x R with aspect ratio NOT preserved (CheXNet-style). Downscaling uses Pillow's BOX filter, an exact
   area average (like OpenCV's INTER_AREA): no ringing, no aliasing. Upscaling (only tiny synthetic images) uses
   BILINEAR. 16-bit sources are resized in float ("F" mode) before rounding, so only one rounding happens.

`decode_many` runs `load_gray` over many files in a process pool (`decoding_pool`, every core by default; order
preserved, so builds are deterministic) and reports failures as values instead of raising, so a caller can
collect every bad file before deciding.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, never decode half-grey

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageDecodeError(ValueError):
    """A raw image file cannot be decoded; the message starts with the file path."""


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


def to_gray(image: Image.Image, significant_bits: int | None = None) -> Image.Image:
    """Convert a decoded image to gray on a 0..255 scale: mode "L", or mode "F" for 16-bit sources."""
    if image.mode == "L":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)  # uint16 for "I;16*", int32 for "I"
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise ValueError(f"mode {image.mode} image with samples outside 0..65535 is not a 16-bit gray image")
        bits = 16
        if significant_bits and significant_bits < 16 and high < 2**significant_bits:
            bits = significant_bits
        scaled = values.astype(np.float32)
        scaled *= np.float32(255.0 / (2**bits - 1))
        return Image.fromarray(scaled, mode="F")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGB")  # drop alpha before the luma conversion
    if image.mode in ("RGB", "P", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("L")
    raise ValueError(f"unsupported image mode {image.mode!r}")


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


def load_gray(path: str | os.PathLike, resolution: int | None) -> np.ndarray:
    """Decode `path` to uint8 gray, resized to (resolution, resolution) (or full size when resolution is None).

    Raises ImageDecodeError naming the file for truncated, corrupt or unsupported images.
    """
    try:
        with Image.open(path) as image:
            image.load()
            gray = to_gray(image, png_significant_bits(path) if image.mode in _SIXTEEN_BIT_MODES else None)
            return resize_gray(gray, resolution)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... for bad files
        raise ImageDecodeError(f"{os.fspath(path)}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def _decode_one(job: tuple[str, int | None]) -> tuple[np.ndarray | None, str | None]:
    path, resolution = job
    try:
        return load_gray(path, resolution), None
    except ImageDecodeError as exc:
        return None, str(exc)


def _decode_chunk(jobs: list[tuple[str, int | None]]) -> list[tuple[np.ndarray | None, str | None]]:
    return [_decode_one(job) for job in jobs]


def default_num_workers() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def decoding_pool(num_workers: int | None = None) -> Iterator[ProcessPoolExecutor | None]:
    """A process pool for `decode_many` (None when num_workers == 1: decode in this process).

    "spawn" start method: forking a process that has imported JAX or TFDS (threads) can deadlock. As with any spawn
    pool, a script that builds datasets needs an `if __name__ == "__main__":` guard; without one the workers die
    and the build fails with BrokenProcessPool (a ProcessPoolExecutor, unlike multiprocessing.Pool, does not hang).
    """
    num_workers = num_workers or default_num_workers()
    if num_workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
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
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Yield (image, None) or (None, error message) for each path, in order (so builds are deterministic).

    Decodes in `pool` (see `decoding_pool`) or, when pool is None, in this process. With resolution=None images
    are decoded at full size (a check).
    """
    from tqdm import tqdm

    jobs = [(os.fspath(p), resolution) for p in paths]
    chunks = [jobs[i:i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, mininterval=1.0) as bar:
        if pool is None:
            results = map(_decode_chunk, chunks)
        else:
            results = _ordered_bounded_map(pool, _decode_chunk, chunks,
                                           in_flight=_CHUNKS_IN_FLIGHT_PER_WORKER * default_num_workers())
        for chunk_results in results:
            bar.update(len(chunk_results))
            yield from chunk_results


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
    return _decode_one((os.fspath(path), None))[1]


__all__ = [
    "ImageDecodeError",
    "check_image",
    "decode_many",
    "decoding_pool",
    "default_num_workers",
    "load_gray",
    "png_significant_bits",
    "resize_gray",
    "to_gray",
]
