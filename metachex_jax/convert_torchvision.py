"""Convert a torchvision DenseNet state dict into a backbone checkpoint for `--config.model_init`.

    python -m metachex_jax.convert_torchvision densenet121-a639ec97.pth /ckpt/densenet121_imagenet
    python -m metachex_jax.convert_torchvision weights.safetensors DEST --arch densenet121 --overwrite

SRC is a `.pth`/`.pt` (read without torch by `metachex_jax.interop.torch_pickle`, which runs nothing from the
file), `.npz` or `.safetensors` torchvision state dict. The classifier is dropped (training configs bring their own
heads); see `metachex_jax.interop.convert` for the format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metachex_jax.core import console
from metachex_jax.interop.convert import (CheckpointReadError, StateDictMismatchError, densenet_from_state_dict,
                                          describe, read_state_dict, save_backbone)
from metachex_jax.models import SPECS, count_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.convert_torchvision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="torchvision DenseNet state dict (.pth, .pt, .npz, .safetensors)")
    parser.add_argument("dest", help="backbone checkpoint directory to create")
    parser.add_argument("--arch", choices=sorted(SPECS), default=None,
                        help="expected architecture (default: inferred from the state dict)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup()
    try:
        state_dict = read_state_dict(args.src)
        model, dropped = densenet_from_state_dict(state_dict, num_classes=None, arch=args.arch, what=args.src)
        dest = save_backbone(model, args.dest, source=str(Path(args.src).absolute()), overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ImportError, CheckpointReadError, StateDictMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"arch:       {describe(model.spec)} ({model.num_features} features)")
    print(f"parameters: {count_params(model):,} (backbone; {len(state_dict)} tensors read, "
          f"{len(dropped)} dropped: num_batches_tracked and classifier)")
    print(f"written:    {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
