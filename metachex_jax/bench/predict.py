"""Inference benchmark: `python -m metachex_jax.bench predict [--torch] [--batch 32 --resolution 224]`.

A MetaChexNet (DenseNet-121 and every head, random weights, eval mode) behind `inference.Predictor`, the code
`python -m metachex_jax.predict` runs. Figures, all from one run:

    forward_img_per_s      the bare batched forward (uint8 batch already on the device -> outputs + features)
    torch_img_per_s        (--torch) torchvision's densenet121 eager inference (no_grad, eval) on the same batch,
                           timed in turns with the JAX forward; ratio_vs_torch = forward / torch (goal >= 1.0)
    files_img_per_s        `Predictor.predict_files` on --files synthetic 1024 x 1024 8-bit PNGs (NIH's format):
                           decoding, resizing and cropping overlapped with the device; files_ratio = files /
                           forward (goal >= 0.85)
    gradcam_s_per_image    Grad-CAM of one output at the default layer; gradcam_vs_forward = its cost per image
                           over the forward's (goal <= 3)

`--dtype bfloat16 --batch 256` is the GPU configuration (the card's name is printed). The last line is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image

from metachex_jax.bench.train import cpu_threads, import_torch, time_interleaved
from metachex_jax.configs import pretrain
from metachex_jax.contract.outputs import outputs_of
from metachex_jax.contract.pixels import PixelContract, to_model_input
from metachex_jax.models import build_model
from metachex_jax.serving.flax_model import FlaxModel
from metachex_jax.serving.predictor import Predictor


def random_predictor(arch: str, image_size: int, batch: int, dtype: str) -> Predictor:
    config = pretrain.get_config(f"arch={arch},res={image_size}")
    config.model.dtype = dtype
    model = build_model(config.model, nnx.Rngs(0))
    model.eval()
    contract = PixelContract.from_config(config)
    outputs = outputs_of(model)
    return Predictor(FlaxModel(model, outputs, contract), outputs, contract, {"kind": "random"}, batch)


def write_pngs(folder: str, count: int, size: int = 1024) -> list[str]:
    """Chest-X-ray-sized 8-bit gray PNGs with smooth content and noise (so they compress like photographs)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        base = 128 + 80 * np.sin(6 * xx + i) * np.cos(4 * yy) + rng.normal(0, 12, (size, size))
        path = os.path.join(folder, f"{i:05d}.png")
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def torch_forward(batch_np: np.ndarray, threads: int):
    torch, torchvision = import_torch()
    torch.set_num_threads(threads)
    model = torchvision.models.densenet121(num_classes=14).eval()
    images = torch.from_numpy(np.asarray(to_model_input(jax.numpy.asarray(batch_np)))).permute(0, 3, 1, 2)
    images = images.contiguous()

    def step():
        with torch.no_grad():
            model(images).sum().item()

    return step, torch.__version__


def run(arch="densenet121", batch=32, image_size=224, dtype="float32", steps=5, warmup=1, files=96,
        torch=False, out=sys.stdout) -> dict:
    if torch:
        import_torch()  # fail before the long part
    predictor = random_predictor(arch, image_size, batch, dtype)
    device = jax.devices()[0]
    result = {"arch": arch, "batch": predictor.batch_size, "image_size": image_size, "dtype": dtype,
              "backend": jax.default_backend(), "device": device.device_kind, "cpu_threads": cpu_threads(),
              "load_average": os.getloadavg()[0]}
    images = np.random.default_rng(0).integers(0, 256, (predictor.batch_size, image_size, image_size), np.uint8)
    on_device = jax.device_put(images, predictor._sharding)
    backend = predictor._backend
    start = time.perf_counter()
    jax.block_until_ready(backend.forward(on_device))
    result["forward_compile_s"] = time.perf_counter() - start

    def jax_step():
        jax.block_until_ready(backend.forward(on_device))

    to_time = {"jax": jax_step}
    if torch:
        to_time["torch"], result["torch_version"] = torch_forward(images, cpu_threads())
    times = time_interleaved(to_time, steps, warmup)
    forward_s = statistics.median(times["jax"]) / predictor.batch_size
    result["forward_img_per_s"] = 1.0 / forward_s
    if torch:
        result["torch_img_per_s"] = predictor.batch_size / statistics.median(times["torch"])
        result["ratio_vs_torch"] = result["forward_img_per_s"] / result["torch_img_per_s"]

    name = predictor.output_names[1]  # Cardiomegaly
    predictor.gradcam(images[:predictor.batch_size], [name])  # compile
    start = time.perf_counter()
    for _ in range(steps):
        predictor.gradcam(images, [name])
    result["gradcam_s_per_image"] = (time.perf_counter() - start) / (steps * predictor.batch_size)
    result["gradcam_vs_forward"] = result["gradcam_s_per_image"] / forward_s

    if files:
        with tempfile.TemporaryDirectory() as folder:
            paths = write_pngs(folder, files)
            predictor.predict_files(paths[:predictor.batch_size])  # warm the decoding path
            start = time.perf_counter()
            predicted = predictor.predict_files(paths)
            seconds = time.perf_counter() - start
        assert not predicted.failed
        result["files"] = files
        result["files_img_per_s"] = files / seconds
        result["files_ratio"] = result["files_img_per_s"] / result["forward_img_per_s"]

    print(f"jax {jax.__version__} on {result['backend']} ({result['device']}, {result['cpu_threads']} CPU threads, "
          f"load {result['load_average']:.1f}): {arch} MetaChexNet, batch {result['batch']}, {image_size}px, {dtype}",
          file=out)
    print(f"  forward:  {result['forward_img_per_s']:.1f} img/s (compile {result['forward_compile_s']:.1f} s)",
          file=out)
    if torch:
        print(f"  torch:    {result['torch_img_per_s']:.1f} img/s eager; jax/torch = {result['ratio_vs_torch']:.2f}",
              file=out)
    print(f"  Grad-CAM: {1e3 * result['gradcam_s_per_image']:.1f} ms/image = {result['gradcam_vs_forward']:.2f}x "
          "a forward", file=out)
    if files:
        print(f"  files:    {result['files_img_per_s']:.1f} img/s from {files} 1024px PNGs = "
              f"{result['files_ratio']:.2f}x the bare forward", file=out)
    print(json.dumps(result), file=out, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m metachex_jax.bench predict", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224, help="the model input size S")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--files", type=int, default=96, help="PNG files for the files-to-CSV figure (0: skip)")
    parser.add_argument("--torch", action="store_true", help="also time torchvision's eager inference")
    args = parser.parse_args(argv)
    return run(args.arch, args.batch, args.resolution, args.dtype, args.steps, files=args.files, torch=args.torch)
