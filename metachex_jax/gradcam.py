"""The Grad-CAM pointing game on NIH-format bounding boxes (metachex_jax/evaluation/pointing_game.py):

    python -m metachex_jax.gradcam --model=RUN --nih_dir=DIR [--bbox_csv=FILE] [--split_list=test_list.txt]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.gradcam",
                                     description="The Grad-CAM pointing game on NIH-format bounding boxes: a hit "
                                                 "when the map's maximum lies inside a box of that finding.")
    parser.add_argument("--model", required=True, help="a pretraining workdir (or any MODEL predict takes)")
    parser.add_argument("--nih_dir", required=True, help="the ChestX-ray14 folder (real or the demo's)")
    parser.add_argument("--bbox_csv", default=None, help="default: NIH_DIR/BBox_List_2017.csv")
    parser.add_argument("--split_list", default="test_list.txt", help="only images of this list ('' = all)")
    parser.add_argument("--layer", default="final")
    parser.add_argument("--out", default=None, help="also write the report here (JSON)")
    args = parser.parse_args(argv)
    console.setup()
    try:
        report = pointing_game.pointing_game_run(args.model, args.nih_dir, bbox_csv=args.bbox_csv, layer=args.layer,
                                                 split_list=args.split_list or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("all", report["all"])] + list(report["per_finding"].items())
    print(f"pointing game, {report['images']} images, layer {args.layer}:")
    for name, r in rows:
        low, high = r["hit_rate_ci95"]
        print(f"  {name:14s} {r['hits']:4d}/{r['cases']:<4d} hit rate {r['hit_rate']:.3f} [{low:.3f}, {high:.3f}]  "
              f"random point {r['random_point_baseline']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({"hit_rate": report["all"]["hit_rate"], "random_point": report["all"]["random_point_baseline"],
                      "cases": report["all"]["cases"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
