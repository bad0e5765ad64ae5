"""The Grad-CAM pointing game on a dataset's bounding boxes (metachex_jax/evaluation/pointing_game.py):

    python -m metachex_jax.gradcam --model=RUN --nih_dir=DIR [--bbox_csv=FILE] [--split_list=test_list.txt]
    python -m metachex_jax.gradcam --model=TRANSFER_WORKDIR --boxes=tbx11k --manual_dir=TBX11K_DIR [--split=test]
    python -m metachex_jax.gradcam --model=RUN --boxes=vindr --manual_dir=VINDR_DIR [--split=test]
        [--layer=final] [--out=REPORT.json]

Prints the hit rate per finding with its 95% CI and the random-point baseline, then one JSON line; exit status 2
for a bad MODEL, folder or box file.
"""

from __future__ import annotations

import argparse
import json
import sys

from metachex_jax.core import console
from metachex_jax.evaluation import pointing_game

BOX_SOURCES = ("nih", "tbx11k", "vindr")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.gradcam",
                                     description="The Grad-CAM pointing game on a dataset's bounding boxes: a hit "
                                                 "when the map's maximum lies inside a box of that finding.")
    parser.add_argument("--model", required=True, help="a pretraining or transfer workdir (or any MODEL predict "
                                                        "takes)")
    parser.add_argument("--boxes", default="nih", choices=BOX_SOURCES,
                        help="whose boxes: NIH's BBox_List_2017.csv, TBX11K's or VinDr-CXR's")
    parser.add_argument("--nih_dir", help="--boxes=nih: the ChestX-ray14 folder (real or the demo's)")
    parser.add_argument("--bbox_csv", default=None, help="--boxes=nih: default NIH_DIR/BBox_List_2017.csv")
    parser.add_argument("--split_list", default="test_list.txt", help="--boxes=nih: only images of this list "
                                                                      "('' = all)")
    parser.add_argument("--manual_dir", help="--boxes=tbx11k or vindr: the raw copy (as `prepare` takes it)")
    parser.add_argument("--split", default="test", choices=pointing_game.SPLITS,
                        help="--boxes=tbx11k or vindr: the test images (TBX11K's original val set, VinDr's test "
                             "set) or all boxed images")
    parser.add_argument("--layer", default="final")
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    if args.boxes == "nih" and not args.nih_dir:
        parser.error("--boxes=nih needs --nih_dir=DIR")
    if args.boxes != "nih" and not args.manual_dir:
        parser.error(f"--boxes={args.boxes} needs --manual_dir=DIR (the raw copy)")
    console.setup()
    try:
        if args.boxes == "nih":
            source = pointing_game.nih_boxes(args.nih_dir, bbox_csv=args.bbox_csv, split_list=args.split_list or None)
        elif args.boxes == "tbx11k":
            source = pointing_game.tbx11k_boxes(args.manual_dir, split=args.split)
        else:
            source = pointing_game.vindr_boxes(args.manual_dir, split=args.split)
        report = pointing_game.pointing_game_run(args.model, source, layer=args.layer)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("all", report["all"])] + list(report["per_finding"].items())
    print(f"pointing game, {report['boxes']} boxes ({report['source']}), {report['images']} images, layer "
          f"{args.layer}:")
    for name, r in rows:
        low, high = r["hit_rate_ci95"]
        print(f"  {name:14s} {r['hits']:4d}/{r['cases']:<4d} hit rate {r['hit_rate']:.3f} [{low:.3f}, {high:.3f}]  "
              f"random point {r['random_point_baseline']:.3f}")
    for why, count in report["left_out"].items():
        print(f"  left out: {count} {why}")
    if report["not_scored"]:
        print(f"  not scored (no such model output): {', '.join(report['not_scored'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({"hit_rate": report["all"]["hit_rate"], "random_point": report["all"]["random_point_baseline"],
                      "cases": report["all"]["cases"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
