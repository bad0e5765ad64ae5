"""Shared test set-up. Tests run on CPU with tiny models and tiny images."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain's multiprocess prefetch reads absl flags; under pytest they were never parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------------------------------
# A stand-in for Cloud Storage: gs://BUCKET/... served from a local folder.
# etils.epath sends gs:// paths to fsspec's "gcs" filesystem (gcsfs in production; not installed here, and no
# bucket is reachable from the tests). The fake maps gs://bucket/key to <root>/bucket/key and, like Cloud
# Storage, refuses to append to an object and needs no folders created before writing. tensorboardX's gs://
# writer (google-cloud-storage in production) is replaced the same way: its whole buffer uploaded per flush.

import importlib  # noqa: E402

import pytest  # noqa: E402


class FakeBucket:
    def __init__(self, root):
        self.root = root  # local folder holding the "buckets"
        self.url = "gs://test-bucket"

    def local(self, url: str):
        """The local file standing for gs://... (to inspect what was 'uploaded')."""
        assert url.startswith("gs://")
        return self.root / url[len("gs://"):]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.local import LocalFileSystem
    from tensorboardX import record_writer

    root = tmp_path / "fake-gcs"
    root.mkdir()

    class FakeGcsFileSystem(LocalFileSystem):
        protocol = ("gs", "gcs")

        def __init__(self, *args, **kwargs):
            # Objects need no folders; gcsfs's keyword arguments (finalize_on_close=...) do not apply here.
            super().__init__(auto_mkdir=True)

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            for scheme in ("gs://", "gcs://"):
                if path.startswith(scheme):
                    path = os.path.join(str(root), path[len(scheme):])
            return super()._strip_protocol(path)

        def unstrip_protocol(self, name):
            return "gs://" + os.path.relpath(name, root)

        def _open(self, path, mode="rb", **kwargs):
            if "a" in mode:
                raise NotImplementedError("Cloud Storage objects cannot be appended to")
            return super()._open(path, mode, **kwargs)

    class FakeGcsEventWriter:
        def __init__(self, path):
            self.path, self.buffer = path, bytearray()

        def write(self, data):
            self.buffer += data

        def flush(self):
            with fsspec.open(self.path, "wb") as f:
                f.write(bytes(self.buffer))

        def close(self):
            self.flush()

    class FakeGcsEventWriterFactory:
        def open(self, path):
            return FakeGcsEventWriter(path)

        def directory_check(self, path):
            pass

    registry = importlib.import_module("fsspec.registry")._registry  # protocol -> class (instantiated ones)
    previous = {p: registry.get(p) for p in ("gs", "gcs")}
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, FakeGcsFileSystem, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", FakeGcsEventWriterFactory())
    yield FakeBucket(root)
    backend.fsspec_backend._get_filesystem.cache_clear()
    for protocol, cls in previous.items():
        if cls is None:
            registry.pop(protocol, None)
        else:
            registry[protocol] = cls
