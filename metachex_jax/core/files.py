"""Paths that may be local or remote (gs://bucket/...): the few file operations the package's own outputs need.

Every workdir / output / data path in the package goes through these helpers, so a Cloud Storage workdir works
wherever a local one does. Remote paths (anything with "://") go through `etils.epath`, which hands gs:// to
fsspec's `gcsfs` (it must be installed: `pip install gcsfs`); local paths use the os module directly.

    is_url(path)                  "gs://b/x" -> True, "/tmp/x" or "~/x" -> False
    absolute(path)                a local path made absolute (~ expanded); a URL unchanged
    join(base, *parts)            os.path.join for both kinds (a URL is joined with "/")
    makedirs(path)                os.makedirs(exist_ok=True); a no-op for a URL (object stores have no folders)
    exists(path), is_file(path), is_dir(path)
    glob(pattern)                 the sorted paths matching a pattern (* ? [..] in any part after the first)
    read_text(path), read_bytes(path)
    write_atomic(path, data)      str or bytes; readers see the old file or the new one, never a partial one
                                  (exclusive=True: create only, FileExistsError when the file exists)

Atomic writes: a local file is written to a temporary file in the same folder and moved over the target with
os.replace (atomic on POSIX). A remote object is written with ONE upload of the complete bytes, which Cloud
Storage makes atomic by itself: an object becomes visible only when its upload has finished, so a reader sees the
old object or the new one, never a partial one, and a failed upload leaves the old object as it was. In both
cases the data must be complete in memory before the call: a caller that fails while building its data has
written nothing.
"""

from __future__ import annotations

import os
import tempfile

import fsspec
from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
    """A local path made absolute (with ~ expanded); a URL such as gs://bucket/run is returned unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base: PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_url(base):
        return os.fspath(epath.Path(base).joinpath(*parts))
    return os.path.join(base, *parts)


def _path(path: PathLike) -> epath.Path:
    return epath.Path(os.fspath(path))


def makedirs(path: PathLike) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def exists(path: PathLike) -> bool:
    return _path(path).exists()


def is_file(path: PathLike) -> bool:
    return _path(path).is_file()


def is_dir(path: PathLike) -> bool:
    return _path(path).is_dir()


GLOB_CHARACTERS = "*?["


def has_glob(path: PathLike) -> bool:
    return any(c in os.fspath(path) for c in GLOB_CHARACTERS)


def glob(pattern: PathLike) -> list[str]:
    """The paths matching `pattern` (local or remote), sorted; [] when none does. The pattern's parts before the
    first one with a wildcard are a folder that is listed (e.g. /runs/seed* or gs://b/runs/*/seed_[012])."""
    pattern = os.fspath(pattern)
    url = is_url(pattern)
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if has_glob(part)), len(parts))
    if first == len(parts):
        return [pattern] if exists(pattern) else []
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    base = base if url else absolute(base)
    return sorted(os.fspath(p) for p in _path(base).glob("/".join(parts[first:])))


def read_text(path: PathLike) -> str:
    return _path(path).read_text(encoding="utf-8")


def read_bytes(path: PathLike) -> bytes:
    return _path(path).read_bytes()


def write_atomic(path: PathLike, data: str | bytes, *, exclusive: bool = False) -> None:
    """Write `data` (str: as UTF-8, newlines unchanged) to `path` so that no reader ever sees a partial file.

    `exclusive`: create `path`, never replace it: FileExistsError when it exists, and nothing is written (of two
    writers, the first wins). Cloud Storage: a create-only upload (gcsfs mode "xb", ifGenerationMatch=0); a local
    file: os.link of the complete temporary file, which fails when the name exists."""
    path = os.fspath(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if is_url(path):
        # One upload of the complete object: atomic on Cloud Storage (see the module docstring).
        if exclusive:
            with fsspec.open(path, "xb") as f:
                f.write(payload)
        else:
            _path(path).write_bytes(payload)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        if exclusive:
            os.link(tmp, path)  # fails when the name exists; the temporary name is removed below
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):  # os.replace moved it; anything else leaves it
            os.unlink(tmp)
