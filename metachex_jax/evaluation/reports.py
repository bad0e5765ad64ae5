"""Writing and reading evaluation outputs: per-image prediction CSVs, metric JSON, markdown tables.

Every published number should be recomputable from a per-image predictions CSV: `recompute` (the command
`python -m metachex_jax.reports recompute PREDICTIONS_CSV [--n_boot 1000] [--seed 0] [--json OUT]`)
reads the CSV and runs `metrics.evaluate_multitask`; the command prints the markdown table. Such a CSV holds the
`metrics.TASK_ARRAYS` arrays and `patient_id` (other columns, e.g. image_name, are carried along), written
with `write_predictions_csv(path, predictions, column_names=MULTITASK_COLUMN_NAMES)`.

Predictions CSV format. One row per image. Each header cell is `name:dtype`, or `name[sub]:dtype` for
the columns of a 2-D (N, K) array (e.g. `pathology_prob[Effusion]:float32`), so the reader restores names,
shapes and dtypes without guessing. Floats are written as the shortest decimal that reads back as the same
float64 (`repr`); float16/32 values upcast to float64 exactly, so they are read back bit for bit, NaN as
`nan`. Integers are written in full, booleans as 0/1, strings as text (bytes are decoded as UTF-8).
Metrics recomputed from the CSV are therefore identical to the ones computed in memory.

Writes are atomic: the text is built completely in memory, then written with `files.write_atomic` (a local
file via a temporary file and os.replace; a gs:// object with one upload), so an error never leaves a partial
file or damages an existing one. Paths may be local or gs:// URLs, for reading too.
JSON: NaN (undefined metrics) is written as null, infinities are refused, keys keep their insertion order
(deterministic: `evaluate_multitask` builds its dict in a fixed order).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metachex_jax.core import files
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.evaluation import metrics

# Column names of the 2-D arrays of `metrics.evaluate_multitask` predictions, for write_predictions_csv.
MULTITASK_COLUMN_NAMES = {key: PATHOLOGIES for key in metrics.TASK_ARRAYS["pathology"]}


def multitask_column_names(label_names: Sequence[str] = PATHOLOGIES) -> dict[str, Sequence[str]]:
    """MULTITASK_COLUMN_NAMES for another label space (a mixture's, data/input/mixture.py)."""
    return {key: tuple(label_names) for key in metrics.TASK_ARRAYS["pathology"]}


def pathology_names_in(path: str | os.PathLike) -> tuple[str, ...]:
    """The pathology sub-column names of a predictions CSV's header, in order (NIH's 14 when it has none)."""
    header = next(csv.reader(io.StringIO(files.read_bytes(os.fspath(path)).decode("utf-8"), newline="")), [])
    names = [m["sub"] for m in map(_HEADER_CELL.match, header) if m and m["name"] == "pathology" and m["sub"]]
    return tuple(names) or PATHOLOGIES

_HEADER_CELL = re.compile(r"^(?P<name>[^\[\]:]+)(\[(?P<sub>[^\[\]]+)\])?:(?P<dtype>[a-z0-9]+)$")


# ----------------------------------------------------------------------------------------------------
# Atomic text files
# ----------------------------------------------------------------------------------------------------

def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (local or gs://) atomically: readers see the old file or the new one."""
    files.write_atomic(path, text)


# ----------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------

def _json_ready(obj: Any, where: str, errors: list[str]) -> Any:
    """Plain-Python copy of obj for json: numpy values unwrapped, NaN -> None; problems go to errors."""
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                errors.append(f"{where}: key {key!r} is not a string")
            out[str(key)] = _json_ready(value, f"{where}[{key!r}]", errors)
        return out
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]", errors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            errors.append(f"{where}: infinite value {obj!r} has no JSON form")
        return obj
    errors.append(f"{where}: unsupported type {type(obj).__name__}")
    return None


def to_json_text(obj: Any) -> str:
    """JSON text (indent 2, trailing newline) with NaN as null; raises naming every bad entry."""
    errors: list[str] = []
    ready = _json_ready(obj, "$", errors)
    if errors:
        raise ValueError("cannot write as JSON:\n  " + "\n  ".join(errors))
    return json.dumps(ready, indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write obj as JSON atomically (NaN as null, insertion key order); nothing is written on error."""
    write_text(path, to_json_text(obj))


# ----------------------------------------------------------------------------------------------------
# Predictions CSV
# ----------------------------------------------------------------------------------------------------

def _format_cells(values: np.ndarray) -> list[str]:
    """Text of each value of a 1-D array, exact for every supported dtype."""
    kind = values.dtype.kind
    if kind == "f":
        return [repr(v) for v in values.astype(np.float64).tolist()]
    if kind in "iub":
        return [str(int(v)) for v in values.tolist()]
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values.tolist()]


def _dtype_name(values: np.ndarray, where: str, errors: list[str]) -> str | None:
    kind = values.dtype.kind
    if kind in "fiub":
        return values.dtype.name
    if kind in "US" or (kind == "O" and all(isinstance(v, (str, bytes)) for v in values.ravel().tolist())):
        return "str"
    errors.append(f"{where}: unsupported dtype {values.dtype} (numbers, booleans or strings only)")
    return None


def write_predictions_csv(path: str | os.PathLike, columns: Mapping[str, Any],
                          column_names: Mapping[str, Sequence[str]] | None = None) -> None:
    """Write per-image arrays as one CSV row per image (format in the module docstring), atomically.

    Args:
      columns: name -> 1-D (N,) or 2-D (N, K) array; all share N.
      column_names: name -> K sub-column names for 2-D arrays (default "0".."K-1"; entries for absent
        columns are ignored); for the evaluate_multitask arrays pass MULTITASK_COLUMN_NAMES.
    """
    column_names = dict(column_names or {})
    errors: list[str] = []
    header: list[str] = []
    cells: list[list[str]] = []
    lengths = {}
    for name, raw in columns.items():
        values = np.asarray(raw)
        if not _HEADER_CELL.match(f"{name}:x"):
            errors.append(f"column {name!r}: names must be non-empty without '[', ']' or ':'")
            continue
        if values.ndim not in (1, 2):
            errors.append(f"column {name!r}: must be 1-D or 2-D, got shape {values.shape}")
            continue
        lengths[name] = values.shape[0]
        dtype = _dtype_name(values, f"column {name!r}", errors)
        if dtype is None:
            continue
        if values.ndim == 1:
            header.append(f"{name}:{dtype}")
            cells.append(_format_cells(values))
            continue
        subs = [str(s) for s in column_names.get(name, range(values.shape[1]))]
        if len(subs) != values.shape[1] or len(set(subs)) != len(subs):
            errors.append(f"column {name!r}: needs {values.shape[1]} distinct sub-column names, got {subs}")
            continue
        bad = [s for s in subs if not _HEADER_CELL.match(f"{name}[{s}]:x")]
        if bad:
            errors.append(f"column {name!r}: sub-column names may not contain '[', ']' or ':': {bad}")
            continue
        for j, sub in enumerate(subs):
            header.append(f"{name}[{sub}]:{dtype}")
            cells.append(_format_cells(values[:, j]))
    if len(set(lengths.values())) > 1:
        errors.append(f"columns differ in length: {lengths}")
    if not columns:
        errors.append("no columns to write")
    if errors:
        raise ValueError(f"cannot write {os.fspath(path)}:\n  " + "\n  ".join(errors))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(*cells))
    write_text(path, text.getvalue())


def _parse_column(cells: list[str], dtype: str, label: str, errors: list[str]) -> np.ndarray | None:
    """Parse one column's cells; errors name the CSV line (header = line 1) and value of each bad cell."""
    if dtype == "str":
        return np.array(cells, dtype=str)
    if dtype == "bool":
        parse, target = (lambda c: {"0": False, "1": True}[c]), np.bool_
    elif dtype.startswith(("int", "uint")):
        parse, target = int, np.dtype(dtype)
    elif dtype.startswith("float"):
        parse, target = float, np.dtype(dtype)
    else:
        errors.append(f"{label}: unknown dtype {dtype!r}")
        return None
    values, bad = [], []
    for line, cell in enumerate(cells, start=2):
        try:
            values.append(parse(cell))
        except (ValueError, KeyError):
            bad.append(f"line {line}: {cell!r}")
    if bad:
        errors.append(f"{label}: not {dtype}: " + ", ".join(bad))
        return None
    return np.array(values, dtype=np.float64 if dtype.startswith("float") else None).astype(target)


def read_predictions_csv(path: str | os.PathLike,
                         column_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, np.ndarray]:
    """Read a CSV written by write_predictions_csv: name -> array with the written dtype and shape.

    `column_names`: name -> the sub-column names a 2-D array must have, in order (e.g.
    MULTITASK_COLUMN_NAMES, so that a reordered pathology column can never be scored as another
    pathology); names absent from the file are not required. Raises naming every malformed header cell,
    short or long row, unparseable value and unexpected sub-column names.
    """
    path = os.fspath(path)
    # Bytes decoded as they are (no newline translation), as open(..., newline="") would give the csv reader.
    rows = list(csv.reader(io.StringIO(files.read_bytes(path).decode("utf-8"), newline="")))
    if not rows:
        raise ValueError(f"{path}: empty file, expected a header row")
    header, body = rows[0], rows[1:]
    errors = []
    parsed_header = []
    for i, cell in enumerate(header):
        match = _HEADER_CELL.match(cell)
        if match is None:
            errors.append(f"header cell {i + 1} {cell!r} is not 'name:dtype' or 'name[sub]:dtype'")
        parsed_header.append(match)
    errors += [f"line {line}: {len(row)} cells, header has {len(header)}"
               for line, row in enumerate(body, start=2) if len(row) != len(header)]
    if errors:
        raise ValueError(f"malformed predictions CSV {path}:\n  " + "\n  ".join(errors))

    # Group header cells by name, in order of first appearance.
    groups: dict[str, list[tuple[int, str | None, str]]] = {}
    for i, match in enumerate(parsed_header):
        groups.setdefault(match["name"], []).append((i, match["sub"], match["dtype"]))
    columns: dict[str, np.ndarray] = {}
    for name, cells in groups.items():
        subs = [sub for _, sub, _ in cells]
        dtypes = {dtype for _, _, dtype in cells}
        if (None in subs and len(cells) > 1) or len(set(subs)) != len(subs) or len(dtypes) > 1:
            errors.append(f"column {name!r}: inconsistent header cells {[header[i] for i, _, _ in cells]}")
            continue
        expected = list((column_names or {}).get(name, subs))
        if subs != expected:
            errors.append(f"column {name!r}: sub-columns must be {expected} in this order; got {subs}")
            continue
        parts = [_parse_column([row[i] for row in body], dtype, header[i], errors) for i, _, dtype in cells]
        if any(p is None for p in parts):
            continue
        if subs == [None]:
            columns[name] = parts[0]
        else:
            columns[name] = np.stack(parts, axis=1) if body else np.empty((0, len(parts)), parts[0].dtype)
    if errors:
        raise ValueError(f"malformed predictions CSV {path}:\n  " + "\n  ".join(errors))
    return columns


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------

def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed and '|' escaped. Raises naming rows of wrong width."""
    bad = [i for i, row in enumerate(rows) if len(row) != len(header)]
    if bad:
        raise ValueError(f"rows {bad} do not have {len(header)} cells like the header")

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header))] + [line(row) for row in rows]) + "\n"


def format_number(value: Any, digits: int = 4) -> str:
    """Fixed-point with `digits` decimals; 'n/a' for None/NaN (undefined metrics)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _metric_row(label: str, entry: Mapping[str, Any], digits: int) -> list[str]:
    ci = f"[{format_number(entry['ci_low'], digits)}, {format_number(entry['ci_high'], digits)}]"
    if entry.get("n_undefined"):
        ci += f" ({entry['n_undefined']} resamples undefined)"
    return [label, format_number(entry["value"], digits), ci]


def multitask_markdown(result: Mapping[str, Any], title: str | None = None) -> str:
    """Markdown table (metric | value | CI) of a `metrics.evaluate_multitask` result, with its counts;
    keys the result does not know (e.g. losses added by the caller) are ignored."""
    rows = []
    if "pathology" in result:
        for name, per_label in result["pathology"].items():
            rows.append(_metric_row(f"AUROC {name}", per_label["auroc"], 4))
        mean = result["mean_auroc"]
        rows.append(_metric_row(f"Mean AUROC ({len(mean['labels'])} pathologies)", mean, 4))
    for task, task_label in (("sex_male", "Sex (male)"), ("view_ap", "View (AP)")):
        if task in result:
            rows.append(_metric_row(f"{task_label} AUROC", result[task]["auroc"], 4))
            threshold = result[task]["accuracy_threshold"]
            rows.append(_metric_row(f"{task_label} accuracy (p >= {threshold:g})", result[task]["accuracy"], 4))
    if "age" in result:
        rows.append(_metric_row("Age MAE (years)", result["age"]["mae_years"], 2))
        rows.append(_metric_row("Age Pearson r", result["age"]["pearson_r"], 4))
    boot = result["bootstrap"]
    counts = result["counts"]
    ci_label = f"{100 * (1 - boot['alpha']):g}% CI"
    notes = [f"{counts['images']} images, {counts['patients']} patients."]
    if "age" in counts:
        notes.append(f"Ages known for {counts['age']['labelled']} images ({counts['age']['masked']} masked).")
    notes.append(f"CIs: {boot['interval']} bootstrap over {boot['resampled']}, {boot['n_boot']} resamples, "
                 f"seed {boot['seed']}; undefined resamples are left out.")
    heading = f"### {title}\n\n" if title else ""
    return heading + markdown_table(["Metric", "Value", ci_label], rows) + "\n" + " ".join(notes) + "\n"


def recompute(predictions_csv: str, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Every metric of a per-image predictions CSV (`write_predictions_csv`'s format), recomputed from it alone."""
    label_names = pathology_names_in(predictions_csv)
    predictions = read_predictions_csv(predictions_csv, multitask_column_names(label_names))
    return metrics.evaluate_multitask(predictions, n_boot=n_boot, seed=seed, alpha=alpha, label_names=label_names)
