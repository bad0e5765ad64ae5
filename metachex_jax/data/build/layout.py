"""The record layout of a prepared dataset (builders 2.0.0 on): what one record's bytes hold, how a raw record and its
image become them, and how a reader gets the dict back. Runs in decoding workers (the local build's process pool,
Beam's workers): imports neither jax nor tensorflow_datasets.

One record is

    [image: R x R uint8][label arrays][scalars, little-endian, packed][each text: uint32 length + UTF-8 bytes]

The first three parts have a fixed size for a build (the pixels are raw bytes, the label block a few dozen bytes);
only the texts (image name, patient id, a TB reading) vary. A record is written as one ArrayRecord record (one
riegeli chunk, uncompressed, with its own hash: `check.py`). A reader learns the layout from the build's
`dataset_info.json` (`RecordCodec.to_json`), never from this code, so a change of layout is a new builder VERSION
and older builds still describe themselves.

`RecordCodec.decode` returns what TFDS's `data_source` returned for the tf.Example records of builders before
2.0.0, key for key and type for type: numpy arrays for tensors (read-only views of the record's bytes), Python
int / float / bool for scalars, bytes for text. Encoding is a concatenation of byte strings, so the same record
gives the same bytes in every process and on every runner (TFDS's protobuf serialisation without
`deterministic=True` did not: the order of the feature map changed with each process's hash seed).

The record kinds (registry.py `kind`) and their fields:

    nih       image, image_name, patient_id, follow_up, labels uint8 (14,), age, age_valid, sex_male, view_ap,
              bit_depth
    tb        image, image_id, tb, sex_male, age, age_valid, fold, reading, bit_depth
    labelled  image, image_id, patient_id, patient_key, labels int8 (K,) 1/0/-1, age, age_valid, sex_male,
              view_ap, view, fold, bit_depth
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.raw import labelled

KINDS = ("nih", "tb", "labelled")
_SCALAR_CODES = {"int64": "q", "float32": "f", "bool": "?"}
_PYTHON_SCALAR = {"int64": int, "float32": float, "bool": bool}
_TEXT_LENGTH = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # numpy dtype name; "text" for UTF-8 text
    shape: tuple[int, ...] = ()  # () for a scalar


class RecordCodec:
    """Bytes <-> record dict for one layout (the fields, in order; see the module docstring)."""

    def __init__(self, fields: Sequence[Field]):
        self.fields = tuple(fields)
        self._arrays = [f for f in self.fields if f.shape]
        self._scalars = [f for f in self.fields if not f.shape and f.dtype != "text"]
        self._texts = [f for f in self.fields if f.dtype == "text"]
        unknown = [f.name for f in self._scalars if f.dtype not in _SCALAR_CODES]
        if unknown:
            raise ValueError(f"record layout: scalar fields {unknown} have no storage code")
        offset, self._array_slices = 0, []
        for f in self._arrays:
            count = int(np.prod(f.shape))
            self._array_slices.append((f.name, np.dtype(f.dtype), f.shape, count, offset))
            offset += count * np.dtype(f.dtype).itemsize
        self._scalar_struct = struct.Struct("<" + "".join(_SCALAR_CODES[f.dtype] for f in self._scalars))
        self._scalar_offset = offset
        self._scalar_types = [_PYTHON_SCALAR[f.dtype] for f in self._scalars]
        self.fixed_size = offset + self._scalar_struct.size  # bytes before the texts

    def encode(self, example: dict[str, Any]) -> bytes:
        parts = []
        for name, dtype, shape, _, _ in self._array_slices:
            value = np.asarray(example[name])
            if value.shape != shape:
                raise ValueError(f"record field {name!r}: shape {value.shape}, the layout says {shape}")
            parts.append(np.ascontiguousarray(value, dtype).tobytes())
        parts.append(self._scalar_struct.pack(*(kind(example[f.name]) for f, kind in
                                                zip(self._scalars, self._scalar_types))))
        for f in self._texts:
            text = example[f.name]
            data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            parts += [_TEXT_LENGTH.pack(len(data)), data]
        return b"".join(parts)

    def decode(self, data: bytes) -> dict[str, Any]:
        record = {name: np.frombuffer(data, dtype, count, offset).reshape(shape)
                  for name, dtype, shape, count, offset in self._array_slices}
        values = self._scalar_struct.unpack_from(data, self._scalar_offset)
        record.update(zip((f.name for f in self._scalars), values))
        offset = self.fixed_size
        for f in self._texts:
            (length,) = _TEXT_LENGTH.unpack_from(data, offset)
            offset += _TEXT_LENGTH.size
            record[f.name] = data[offset:offset + length]
            offset += length
        if offset != len(data):
            raise ValueError(f"a record of {len(data)} bytes where its layout reads {offset}")
        return record

    def to_json(self) -> list[list]:
        return [[f.name, f.dtype, list(f.shape)] for f in self.fields]

    def __reduce__(self):  # (struct.Struct does not pickle: a codec is rebuilt from its fields)
        return RecordCodec, (self.fields,)

    @classmethod
    def from_json(cls, fields: list[list]) -> RecordCodec:
        return cls([Field(name, dtype, tuple(shape)) for name, dtype, shape in fields])


def fields(kind: str, resolution: int, num_labels: int) -> list[Field]:
    """The fields of a record of `kind` (module docstring), images R x R x 1."""
    image = Field("image", "uint8", (resolution, resolution, 1))
    if kind == "nih":
        return [image, Field("image_name", "text"), Field("patient_id", "int64"), Field("follow_up", "int64"),
                Field("labels", "uint8", (len(PATHOLOGIES),)), Field("age", "float32"), Field("age_valid", "bool"),
                Field("sex_male", "int64"), Field("view_ap", "int64"), Field("bit_depth", "int64")]
    if kind == "tb":
        return [image, Field("image_id", "text"), Field("tb", "int64"), Field("sex_male", "int64"),
                Field("age", "float32"), Field("age_valid", "bool"), Field("fold", "int64"),
                Field("reading", "text"), Field("bit_depth", "int64")]
    if kind == "labelled":
        return [image, Field("image_id", "text"), Field("patient_id", "text"), Field("patient_key", "int64"),
                Field("labels", "int8", (num_labels,)), Field("age", "float32"), Field("age_valid", "bool"),
                Field("sex_male", "int64"), Field("view_ap", "int64"), Field("view", "text"), Field("fold", "int64"),
                Field("bit_depth", "int64")]
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")


def example(kind: str, record, image: np.ndarray, bit_depth: int) -> dict[str, Any]:
    """A raw record (data/raw: NihRecord, TbRecord, LabelledRecord) and its R x R x 1 image -> the record's
    values, field by field."""
    common = {"image": image, "age": float(np.float32(record.age)), "age_valid": bool(record.age_valid),
              "sex_male": int(record.sex_male), "bit_depth": int(bit_depth)}
    if kind == "nih":
        return {**common, "image_name": record.image_name, "patient_id": record.patient_id,
                "follow_up": record.follow_up, "labels": np.asarray(record.labels, np.uint8),
                "view_ap": record.view_ap}
    if kind == "tb":
        return {**common, "image_id": record.image_id, "tb": record.tb, "fold": record.fold, "reading": record.reading}
    if kind == "labelled":
        return {**common, "image_id": record.image_id, "patient_id": record.patient_id,
                "patient_key": labelled.patient_key(record.patient_id),
                "labels": np.asarray(record.labels, np.int8), "view_ap": record.view_ap, "view": record.view,
                "fold": record.fold}
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")


def label_names(kind: str, dataset_labels: Sequence[str]) -> tuple[str, ...]:
    """The names of a record's `labels` entries: NIH's 14, a label table's own, none for the TB sets."""
    return {"nih": PATHOLOGIES, "tb": (), "labelled": tuple(dataset_labels)}[kind]


def counted_flags(kind: str) -> tuple[str, ...]:
    """The binary metadata counted next to the labels in `label_counts.json`."""
    return ("tb", "sex_male") if kind == "tb" else ("sex_male", "view_ap")


def record_name(record) -> str:
    """How a problem names a raw record: NIH's image name, otherwise its image id."""
    return getattr(record, "image_name", None) or record.image_id
