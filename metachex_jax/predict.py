"""Apply a model to X-ray files: `python -m metachex_jax.predict --model=MODEL INPUT...`.

    python -m metachex_jax.predict --model=/tmp/metachex_demo ~/xrays/ scan.dcm 'more/*.png' --out=preds
    python -m metachex_jax.predict --model=/tmp/tb_demo --list=files.txt --tta=flip
    python -m metachex_jax.predict --model=/tmp/metachex_demo img.png --heatmaps=Cardiomegaly,age --features
    python -m metachex_jax.predict --model=/tmp/tb_demo scans/ --report --calibrated   # + index.html to review

MODEL: a pretraining workdir (best checkpoint; --step), a transfer workdir (its deployable TB model), a model
directory (a TB model, an exported model, a convert_torchxrayvision output) or a convert_torchvision backbone
(features only); see
`metachex_jax.serving.predictor`. INPUT: files (any name: the format is read from the content), folders (searched
recursively for files named like images: .png .jpg .jpeg .dcm .dicom .tif .tiff .bmp in any case, or with no
extension, as DICOM files often are; hidden files, AppleDouble `._*` files and Thumbs.db are left out and
counted), and globs;
`--list=FILE` adds one path per line.

Writes into --out (default ./predictions):
    predictions.csv     one row per input, in input order: path, every output of the model (probabilities,
                        age in years; `<name>_decision` for outputs with a threshold, e.g. tb; with --calibrated
                        `<name>_calibrated` for outputs with a calibrator), `ood_distance` and `ood_flag` (when
                        the model carries a description of its training images, or --ood_reference gives one),
                        the reader's format, original size (as displayed), bit depth and its source, JPEG EXIF
                        orientation, and `error` (empty when all went well)
    summary.json        the model, its pixel contract and outputs, counts, failures with reasons, timings, the
                        OOD description used (or why there is none) and how many images it flagged
    index.html          (--report) one self-contained page to review the predictions: a card per image with
                        its thumbnail (and heatmaps), outputs, decisions, OOD flag, bit depth and error; sortable
                        and filterable; opens from disk, no server or network
    features.npy        (--features) float32 (N, F) pooled features, row i = CSV row i (NaN rows for failures)
    heatmaps/REL/NAME.npy, NAME.png   (--heatmaps) the Grad-CAM map at model-input resolution and an overlay on
                        the original image; REL is the input's path below the inputs' common folder, extension
                        included (heatmaps/x/a.png/, heatmaps/x/a.dcm/), so no two inputs share a folder
Files are written atomically; the CSV and the summary before any heatmap, and again with the heatmaps' outcome.
A file that fails at any stage (read, pixel contract, prediction, heatmap) gets its error, naming the file and
the stage, in the CSV and the summary (a failed heatmap leaves the file's predictions in place); the others still
run; the exit status is 1 if any file failed, 2 for usage errors (bad MODEL, unknown output, no inputs), reported
before any work starts.
"""

from __future__ import annotations

import argparse
import sys
import time

from metachex_jax.core import console
from metachex_jax.imaging.file_formats import DEFAULT_MAX_PIXELS
from metachex_jax.serving import predict


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="image files, folders (recursive) or globs")
    parser.add_argument("--model", required=True, help="pretraining/transfer workdir, model directory, backbone")
    parser.add_argument("--list", dest="list_file", help="a text file with one input path per line")
    parser.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--features", action="store_true", help="also write features.npy (pooled features)")
    parser.add_argument("--tta", choices=["flip"], default=None, help="test-time augmentation")
    parser.add_argument("--heatmaps", default="", help="comma-separated output names, or 'all': Grad-CAM maps")
    parser.add_argument("--heatmap_layer", default="final",
                        help="the layer Grad-CAM uses (final = ReLU of the last BatchNorm, the pooled tensor; "
                             "e.g. block3 for low-resolution models)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--bit_depth", type=int, default=None,
                        help="read high-depth sources (16-bit PNG/TIFF, DICOM) as this many bits (default: the "
                             "reader's rule); 8-bit files ignore it, and their bit_depth_source says so")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse (as that file's error) images whose header declares more pixels, before "
                             f"decoding them (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--step", default="best", help="pretraining checkpoint: best, latest or a step")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: automatic)")
    parser.add_argument("--image_size", type=int, default=None, help="backbone-only models: model input size")
    parser.add_argument("--resolution", type=int, default=None, help="backbone-only models: resize before crop")
    parser.add_argument("--calibrated", action="store_true",
                        help="add <name>_calibrated: the calibrated probability of outputs with a calibrator (a "
                             "transfer run's deployed model: Platt scaling fitted on its out-of-fold predictions)")
    parser.add_argument("--ood_reference", default=None, metavar="DIR",
                        help="reference images (a folder, file or glob) that describe what the model should see: "
                             "the OOD distance and flag are computed against them (for models that carry no "
                             "description, e.g. converted torchvision or torchxrayvision weights)")
    parser.add_argument("--report", action="store_true", help="also write index.html, a page to review the "
                                                               "predictions (self-contained)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = predict.Request(**vars(parse_args(argv)))
    console.setup()
    began = time.perf_counter()
    try:
        status = predict.run(args)
    except predict.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
