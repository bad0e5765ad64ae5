"""A raw copy in Cloud Storage (`--manual_dir=gs://...`), read by every family's reader as if it were local.

The readers (data/raw) parse local folders: they walk them, open the CSVs, lists and readings, and check that each
image exists. For a gs:// raw copy the driver lists the bucket prefix once, downloads the files that are not
images (by suffix: `IMAGE_SUFFIXES`) into a local staging folder, where every image is an empty placeholder of
the same name, and the family's reader parses that. Each planned record's path is then mapped back to its gs://
URL (`Staged.url`), which is what the workers read (imaging/images.py reads gs:// through etils.epath). No family
needs code of its own for this, and nothing but the metadata is copied.

A `--csv` of the csv family may be a gs:// URL too: it is downloaded into the staging folder
(`Staged.local_file`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from metachex_jax.core import files

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".gif", ".webp",
                            ".jp2", ".j2k", ".pgm", ".ppm", ".pnm"})


@dataclasses.dataclass
class Staged:
    url: str  # the raw copy (gs://...)
    root: str  # the local staging folder standing for it
    downloaded: int
    placeholders: int

    def to_url(self, path: str) -> str:
        """A path below the staging folder -> the object it stands for."""
        relative = os.path.relpath(path, self.root)
        if relative.startswith(".."):
            raise ValueError(f"{path} is not below the staged copy {self.root}")
        return files.join(self.url, *Path(relative).parts)

    def local_file(self, url: str) -> str:
        """Download one more object (a csv family's CSV) into the staging folder; returns its local path."""
        target = os.path.join(self.root, "_files", os.path.basename(url.rstrip("/")))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fsspec.open(url, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
        return target

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def stage(url: str) -> Staged:
    """List `url` (a folder in Cloud Storage), download its non-image files, make image placeholders."""
    filesystem, prefix = fsspec.core.url_to_fs(url)
    root = tempfile.mkdtemp(prefix="metachex-raw-")
    downloaded = placeholders = 0
    for name in filesystem.find(prefix):
        relative = os.path.relpath(name, prefix)
        target = os.path.join(root, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if Path(name).suffix.lower() in IMAGE_SUFFIXES:
            Path(target).touch()
            placeholders += 1
        else:
            filesystem.get_file(name, target)
            downloaded += 1
    if not downloaded + placeholders:
        shutil.rmtree(root)
        raise FileNotFoundError(f"{url}: no files there (the raw copy's folder)")
    return Staged(url.rstrip("/"), root, downloaded, placeholders)


def with_urls(plan: dict[str, list], staged: Staged) -> dict[str, list]:
    """The plan's records with their image paths mapped back to the objects they stand for."""
    return {split: [dataclasses.replace(record, path=staged.to_url(record.path)) for record in records]
            for split, records in plan.items()}
