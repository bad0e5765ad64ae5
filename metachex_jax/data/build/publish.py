"""Where a build's files go, and how a build becomes visible: on a local disk, a shared mount or Cloud Storage alike,
with no lock and no folder rename (neither exists on object storage).

    <data_dir>/<dataset>/<config>/<version>/
        dataset_info.json            the PUBLISHED build: written last, as one object, naming its folder
        build-20250101T120000Z-3f9a1c/
            <dataset>-train.array_record-00000-of-00004 ...   the shards (shards.py)
            skip_report.json, label_counts.json
        build-20250101T130000Z-77e0b2/  an unpublished build: running, failed, killed, or a concurrent loser

A build writes everything into its own new folder, then publishes by creating `dataset_info.json` (`publish`). A
reader opens only what a `dataset_info.json` names (records.py), so it sees a complete build or none: an object
on Cloud Storage appears only when its upload has finished, and a local info file is written to a temporary file
and linked into place. The skip report and the label counts live in the build's folder, so they always belong to
the records they describe.

Two builds of one config at once: both write their own folders; the info is CREATED, never replaced
(files.write_atomic with exclusive=True; Cloud Storage: a create-only upload, gcsfs mode "xb" =
ifGenerationMatch=0; locally: os.link, which fails when the name exists), so the first to finish publishes and the
second finds the name taken, deletes its own folder and reports the published build as reused. Builds are
deterministic, so both would have published the same records. `--overwrite` replaces the info (last writer wins,
atomically) and then deletes the build it replaced; a run that is reading that build at that moment loses its
files (Cloud Storage) or keeps them until it closes them (POSIX).

Leftovers: a killed build's folder is never named by an info, so nothing reads it. A build deletes unreferenced
folders older than STALE_AFTER (by the time in their name; a younger one may be a live build elsewhere), and
`prepare --clean` deletes every unreferenced folder of a config at once (when no build of it is running).
"""

from __future__ import annotations

import datetime
import json
import re
import secrets

from etils import epath

from metachex_jax.core import files

INFO_FILE = "dataset_info.json"
FORMAT = "metachex-records"  # the info's "format": builds of this module (builders 2.0.0 on)
STALE_AFTER = datetime.timedelta(hours=48)
_BUILD_NAME = re.compile(r"^build-(\d{8}T\d{6}Z)-[0-9a-f]+$")


def new_build_name(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"build-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def build_time(name: str) -> datetime.datetime | None:
    """When the build of folder `name` started (from its name), or None for a name no build gives."""
    match = _BUILD_NAME.match(name)
    if not match:
        return None
    return datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)


def read_info(version_dir: str) -> dict | None:
    """The published build's info (see the module docstring), or None when nothing is published there."""
    path = epath.Path(files.join(version_dir, INFO_FILE))
    if not path.exists():
        return None
    return json.loads(path.read_text())


def is_published(version_dir: str) -> bool:
    return epath.Path(files.join(version_dir, INFO_FILE)).exists()


def build_folder(version_dir: str, info: dict) -> str:
    """The folder holding a published build's files."""
    return files.join(version_dir, info["build"])


def publish(version_dir: str, info: dict, *, replace: bool = False) -> bool:
    """Make the build `info["build"]` THE build of `version_dir`: create its info file, or replace it when
    `replace`. False when another build was published first (and `replace` is off): nothing was written."""
    payload = (json.dumps(info, indent=1, sort_keys=True) + "\n").encode()
    path = files.join(version_dir, INFO_FILE)
    if replace:
        files.write_atomic(path, payload)
        return True
    try:
        files.write_atomic(path, payload, exclusive=True)
    except FileExistsError:
        return False
    return True


def build_folders(version_dir: str) -> list[str]:
    """Every build folder under `version_dir` (published or not), by name."""
    root = epath.Path(version_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if build_time(p.name) is not None)


def unreferenced(version_dir: str) -> list[str]:
    """Build folders no published info names."""
    info = read_info(version_dir)
    published = info["build"] if info else None
    return [name for name in build_folders(version_dir) if name != published]


def remove_folder(folder: str) -> None:
    path = epath.Path(folder)
    if path.exists():
        path.rmtree()


def remove_unreferenced(version_dir: str, older_than: datetime.timedelta | None = STALE_AFTER,
                        now: datetime.datetime | None = None) -> list[str]:
    """Delete the unreferenced build folders started more than `older_than` ago (None: all of them); returns their
    paths."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    removed = []
    for name in unreferenced(version_dir):
        if older_than is None or now - build_time(name) > older_than:
            remove_folder(files.join(version_dir, name))
            removed.append(files.join(version_dir, name))
    return removed
