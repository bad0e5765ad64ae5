"""Apply a model to X-ray files and write the results: `run(Request(model=..., inputs=[...]))`, the library behind
`python -m metachex_jax.predict` (its help lists the inputs it takes and the files it writes: predictions.csv,
summary.json, features.npy, heatmaps/, index.html).

Every file is written atomically; the CSV and the summary before any heatmap, and again with the heatmaps'
outcome. A file that fails at any stage (read, pixel contract, prediction, heatmap) gets its error, naming the file
and the stage; the others still run. Usage errors (bad MODEL, unknown output, no inputs) raise `UsageError` before
any work starts.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import sys

import numpy as np
from PIL import Image

from metachex_jax.core import files
from metachex_jax.core.errors import ModelError
from metachex_jax.data.raw.common import not_dataset_file
from metachex_jax.imaging import images as image_reader
from metachex_jax.imaging.file_formats import DEFAULT_MAX_PIXELS
from metachex_jax.serving import gradcam, report_page
from metachex_jax.serving.predictor import Predictor, file_error, one_by_one

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")


class UsageError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Request:
    """What to predict and write: the flags of `python -m metachex_jax.predict` (see its --help)."""

    model: str
    inputs: tuple[str, ...] = ()
    list_file: str | None = None
    out: str = "predictions"
    features: bool = False
    tta: str | None = None
    heatmaps: str = ""
    heatmap_layer: str = "final"
    batch_size: int = 32
    bit_depth: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    step: str = "best"
    workers: int | None = None
    image_size: int | None = None
    resolution: int | None = None
    calibrated: bool = False
    ood_reference: str | None = None
    report: bool = False


def expand_inputs(inputs: list[str], list_file: str | None = None) -> tuple[list[str], dict]:
    """Input arguments -> (absolute file paths in order, duplicates removed; what folders held besides images)."""
    items = list(inputs)
    if list_file:
        try:
            with open(list_file) as f:
                items += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise UsageError(f"--list={list_file}: {e}") from e
    paths, missing, left_out = [], [], {"not_images_of_the_collection": [], "not_named_like_images": []}
    for item in items:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(dirs)
                for name in sorted(names):
                    path = os.path.join(root, name)
                    suffix = os.path.splitext(name)[1].lower()
                    if not_dataset_file(os.path.relpath(path, item)):  # AppleDouble, hidden, Thumbs.db
                        left_out["not_images_of_the_collection"].append(path)
                    elif suffix in IMAGE_SUFFIXES or not suffix:
                        paths.append(path)
                    else:
                        left_out["not_named_like_images"].append(path)
        elif os.path.isfile(item):
            paths.append(item)
        elif glob.has_magic(item):
            matched = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matched:
                missing.append(f"{item} (the pattern matches no file)")
            paths += matched
        else:
            missing.append(f"{item} (no such file or folder)")
    if missing:
        raise UsageError("input(s) not found:\n  " + "\n  ".join(missing))
    paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    if not paths:
        raise UsageError("no input images found (give files, folders, globs or --list=FILE)")
    return paths, left_out


def heatmap_folder(path: str, base: str) -> str:
    """heatmaps/ sub-folder of an input: its path below `base`, extension included, so a.png, a.dcm and an
    extensionless DICOM `a` each get their own folder (a file's path is never a folder of another's)."""
    return os.path.relpath(path, base)


def write_csv(path: str, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomic(path, buffer.getvalue())


def write_npy(path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    files.write_atomic(path, buffer.getvalue())


def write_png(path: str, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    files.write_atomic(path, buffer.getvalue())


def write_heatmaps(predictor, result, names: list[str], layer: str, out_dir: str,
                   bit_depth: int | None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[list[str], dict[int, str]]:
    """Grad-CAM for every predicted input and output in `names`: .npy maps and overlay PNGs.

    Returns (the files written, {input index: error}): a file whose heatmap fails at any stage (its read, Grad-CAM,
    the overlay, the writing) gets that error; the others are still written. A batch whose Grad-CAM fails is
    computed again one file at a time."""
    ok = [i for i, e in enumerate(result.errors) if e is None]
    base = heatmap_base(result)
    written, errors = [], {}

    def fail(i, exc):
        errors[i] = file_error(result.paths[i], "heatmap", exc)

    def write(i, maps, k):
        original, _ = image_reader.read_gray(result.paths[i], bit_depth=bit_depth, max_pixels=max_pixels)
        original = np.asarray(original, np.float32)
        overlays = {name: gradcam.overlay(original, maps[name][k], predictor.contract) for name in names}
        folder = os.path.join(out_dir, "heatmaps", heatmap_folder(result.paths[i], base))
        os.makedirs(folder, exist_ok=True)
        for name in names:  # everything is computed: only a failing disk leaves a file's heatmaps incomplete
            write_npy(os.path.join(folder, f"{name}.npy"), maps[name][k])
            write_png(os.path.join(folder, f"{name}.png"), overlays[name])
            written.extend([os.path.join(folder, f"{name}.npy"), os.path.join(folder, f"{name}.png")])

    def run(rows, crops):
        maps = predictor.gradcam(np.stack(crops), names, layer=layer)
        for k, i in enumerate(rows):
            try:
                write(i, maps, k)
            except Exception as exc:  # noqa: BLE001 - one file's failure is that file's error
                fail(i, exc)

    for start in range(0, len(ok), predictor.batch_size):
        rows, crops = [], []
        for i in ok[start:start + predictor.batch_size]:
            try:
                crops.append(predictor.contract.from_file(result.paths[i], bit_depth=bit_depth,
                                                            max_pixels=max_pixels)[0])
                rows.append(i)
            except Exception as exc:  # noqa: BLE001 - e.g. the file changed since it was predicted
                fail(i, exc)
        if not rows:
            continue
        try:
            run(rows, crops)
        except Exception:  # noqa: BLE001 - Grad-CAM of the batch failed: one file at a time names the failing ones
            crop_of = dict(zip(rows, crops))
            one_by_one(rows, lambda i: run([i], [crop_of[i]]), fail)
    return written, errors


def heatmap_base(result) -> str:
    """The folder below which every predicted input's heatmap folder is named (their common folder)."""
    ok = [i for i, e in enumerate(result.errors) if e is None]
    return os.path.commonpath([os.path.dirname(result.paths[i]) for i in ok]) if ok else ""


def heatmap_overlays(out_dir: str, result, names: list[str], written: list[str]) -> dict[int, dict[str, str]]:
    """{input index: {output name: its overlay PNG, relative to out_dir}} of the heatmaps written."""
    done, base = set(written), heatmap_base(result)
    out: dict[int, dict[str, str]] = {}
    for i, error in enumerate(result.errors):
        for name in names if error is None else []:
            png = os.path.join("heatmaps", heatmap_folder(result.paths[i], base), f"{name}.png")
            if os.path.join(out_dir, png) in done:
                out.setdefault(i, {})[name] = png
    return out


def file_errors(result, heatmap_errors: dict[int, str]) -> list[str | None]:
    """Each input's error: its prediction's (read, pixel contract, prediction), else its heatmap's, else None."""
    return [e or heatmap_errors.get(i) for i, e in enumerate(result.errors)]


def csv_rows(result, heatmap_errors: dict[int, str]) -> list[dict]:
    rows = result.rows()
    for row, error in zip(rows, file_errors(result, heatmap_errors)):
        row["error"] = error or ""
    return rows


def summary(predictor, result, args: Request, left_out: dict, heatmap_files: list[str] | None,
            heatmap_errors: dict[int, str]) -> dict:
    errors = file_errors(result, heatmap_errors)
    failed = [i for i, e in enumerate(errors) if e is not None]
    predicted = [i for i, e in enumerate(result.errors) if e is None]
    out = {
        "model": predictor.info,
        "input_contract": predictor.contract.to_json(),
        "outputs": [o.to_json() for o in predictor.outputs],
        "images": len(result.paths),
        "predicted": len(predicted),
        "failed": len(failed),
        "failures": [{"path": result.paths[i], "error": errors[i]} for i in failed],
        "left_out_of_folders": {k: {"count": len(v), "examples": v[:10]} for k, v in left_out.items()},
        "tta": args.tta,
        "bit_depth_override": args.bit_depth,
        "bit_depths": _count([(result.infos[i].bit_depth, result.infos[i].bit_depth_source) for i in predicted]),
        "seconds": result.seconds,
        "images_per_s": len(predicted) / max(result.seconds, 1e-9),
        # files None: the heatmaps are not written yet (this summary is the one written before them)
        "heatmaps": {"outputs": args.heatmaps, "layer": args.heatmap_layer,
                     "files": None if heatmap_files is None else len(heatmap_files), "failed": len(heatmap_errors)}
        if args.heatmaps.strip() else None,
        "features": "features.npy" if args.features else None,
        "ood": ood_summary(predictor, result),
        "report": report_page.PAGE if args.report else None,
    }
    for output in predictor.outputs:
        if output.threshold is not None:
            values = result.column(output.name)
            out.setdefault("decisions", {})[output.name] = {
                "threshold": output.threshold, "positive": int(np.sum(values[~np.isnan(values)] >= output.threshold))}
    return out


def ood_summary(predictor, result) -> dict:
    """The OOD columns' description: where the reference came from, its threshold and how many were flagged; or
    why there are no such columns."""
    if predictor.ood is None:
        return {"columns": False, "why": predictor.ood_note}
    flags = result.ood_flags
    info = predictor.ood.info
    return {"columns": True, "description": predictor.ood_note, "threshold": predictor.ood.threshold,
            "quantile": info.get("quantile"), "expected_flag_rate": info.get("expected_flag_rate"),
            "threshold_from": info.get("threshold_from"), "reference_images": info.get("reference_images"),
            "flagged": int(np.sum(flags == 1)), "scored": int(np.sum(flags >= 0))}


def _count(pairs) -> list[dict]:
    counts: dict = {}
    for bits, source in pairs:
        counts[bits, source] = counts.get((bits, source), 0) + 1
    return [{"bits": b, "source": s, "images": n} for (b, s), n in sorted(counts.items())]


def run(args: Request) -> int:
    """Predict every input, write the files into `args.out`; 1 if any file failed, else 0."""
    if args.bit_depth is not None and not 1 <= args.bit_depth <= 16:
        raise UsageError(f"--bit_depth={args.bit_depth}: must be in 1..16")
    if args.max_pixels < 1:
        raise UsageError(f"--max_pixels={args.max_pixels}: must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size={args.batch_size}: must be >= 1")
    paths, left_out = expand_inputs(args.inputs, args.list_file)
    step = args.step if args.step in ("best", "latest") else int(args.step)
    try:
        predictor = Predictor.load(args.model, step=step, batch_size=args.batch_size, image_size=args.image_size,
                                   resolution=args.resolution)
        heatmaps = [n.strip() for n in args.heatmaps.split(",") if n.strip()]
        if heatmaps:
            if predictor.exported:
                raise ModelError(f"--heatmaps: {args.model} is an exported model, which carries no Grad-CAM; run "
                                 "predict on the workdir it was exported from to get heatmaps")
            heatmaps = predictor.check_outputs(heatmaps)
            if args.heatmap_layer not in predictor.layer_names:
                raise ModelError(f"--heatmap_layer={args.heatmap_layer}: choose one of "
                                 f"{', '.join(predictor.layer_names)}")
    except (ModelError, FileNotFoundError, ValueError) as e:  # an unusable MODEL or option: before any work
        raise UsageError(str(e)) from e
    if not predictor.outputs and not args.features:
        raise UsageError(f"{args.model} has no outputs (a bare backbone): pass --features to write its features")
    if args.calibrated and not any(o.calibration is not None for o in predictor.outputs):
        raise UsageError(f"--calibrated: {args.model} has no calibrated output (a transfer run's deployed model "
                         "carries one)")
    if args.ood_reference:
        reference_paths, _ = expand_inputs([args.ood_reference])
        try:
            predictor.ood = predictor.reference_from_files(reference_paths, bit_depth=args.bit_depth,
                                                           workers=args.workers, max_pixels=args.max_pixels)
        except ValueError as e:
            raise UsageError(f"--ood_reference={args.ood_reference}: {e}") from e
        predictor.ood_note = f"--ood_reference={os.path.abspath(args.ood_reference)}"
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    skipped = {k: len(v) for k, v in left_out.items() if v}
    print(f"model: {predictor.info}; {len(paths)} images" + (f" (left out of folders: {skipped})" if skipped else ""),
          file=sys.stderr)

    result = predictor.predict_files(paths, tta=args.tta, features=args.features, bit_depth=args.bit_depth,
                                     workers=args.workers, progress=True, max_pixels=args.max_pixels,
                                     calibrated=args.calibrated,
                                     thumbnails=report_page.THUMBNAIL if args.report else None)
    if args.features:
        write_npy(os.path.join(out_dir, "features.npy"), result.features)
    # The predictions are on disk before any heatmap is made; the heatmaps' outcome is then added to both files.
    report = write_report(out_dir, predictor, result, args, left_out, None, {})
    if heatmaps:
        heatmap_files, heatmap_errors = write_heatmaps(predictor, result, heatmaps, args.heatmap_layer, out_dir,
                                                       args.bit_depth, args.max_pixels)
        report = write_report(out_dir, predictor, result, args, left_out, heatmap_files, heatmap_errors)
    else:
        heatmap_files, heatmap_errors = [], {}
    if args.report:
        report_page.write_page(out_dir, result, csv_rows(result, heatmap_errors), report,
                               heatmap_overlays(out_dir, result, heatmaps, heatmap_files))
    print(f"{report['predicted']} of {report['images']} images predicted in {result.seconds:.1f} s "
          f"({report['images_per_s']:.1f} img/s) -> {out_dir}/predictions.csv", file=sys.stderr)
    if predictor.ood is None:
        print(f"no OOD columns: {predictor.ood_note}", file=sys.stderr)
    else:
        print(f"OOD: {report['ood']['flagged']} of {report['ood']['scored']} images flagged (distance > "
              f"{predictor.ood.threshold:.4g}; about {report['ood']['expected_flag_rate']:.1%} of images like the "
              "training images are)", file=sys.stderr)
    for failure in report["failures"]:
        print(f"failed: {failure['error']}", file=sys.stderr)
    return 1 if report["failed"] else 0


def write_report(out_dir: str, predictor, result, args, left_out: dict, heatmap_files, heatmap_errors) -> dict:
    """predictions.csv and summary.json (each atomically); returns the summary."""
    write_csv(os.path.join(out_dir, "predictions.csv"), csv_rows(result, heatmap_errors))
    report = summary(predictor, result, args, left_out, heatmap_files, heatmap_errors)
    files.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(report, indent=1, default=str) + "\n")
    return report
