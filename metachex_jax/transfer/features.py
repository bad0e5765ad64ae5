"""Frozen features of a dataset under one starting weight, extracted once and cached on disk.

    table = features_for(start, records, batch_size=..., cache_dir=...)   # records: a sets.DatasetRecords

`table` holds, per record of the dataset in record order: `features` (N, F) the backbone's pooled output, sex
and age with their masks (the pipeline's "binary" batch), and the MetaChexNet heads' outputs on those
features (`sex_male_prob`, `age_pred`; used by the external age/sex evaluation), plus `seconds` (all of
the extraction, compilation included) and `images_per_s` (after the first batch), both 0 when read from the cache.
A protocol's images are rows of these tables (sets.features_of): one extraction serves every target.

Cache: CACHE_DIR/<key>.npz, key = SHA-256 of (the weights' content fingerprint, the dataset build's content
fingerprint, the start's pixel contract (sizes, geometry, normalisation), FORMAT_VERSION). A changed checkpoint or a rebuilt dataset gets a new key (the old
file is simply no longer used); moving either keeps the key. CACHE_DIR may be local or gs://. Entries are written
with `files.write_atomic` (a temporary file renamed into place, or one upload), so a killed run never leaves a
truncated cache entry that would be read later.

`calibrate_batchnorm(model, source, kind=...)` recomputes a network's BatchNorm statistics on images of `source`
("precise BN"): the "random_bn" start's from ChestX-ray14 (`kind="nih"`, see `weights`), and every fine-tuned
model's from its training (or test) images before it predicts (`kind="binary"`, see `finetune`).

Images go through the same eval pipeline as the trainer's evaluation, made by the start's pixel contract
(`Start.contract`: the geometry on the host, uint8 to the device, `contract.model_input` inside the jitted step),
batches are sharded over all devices, padding rows dropped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import time

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files, sharding
from metachex_jax.core.labels import METADATA_TASKS
from metachex_jax.data.input import pipeline
from metachex_jax.models import batch_norms
from metachex_jax.transfer.sets import BinaryRecords

FORMAT_VERSION = 3  # 2: the key holds the whole pixel contract; 3: any dataset, the "binary" batch's columns


def cache_key(weights_fingerprint: str, dataset_fingerprint: str, contract: PixelContract) -> str:
    pixels = f"{contract.image_size}|{contract.resolution}|{contract.geometry}|{contract.normalization}"
    text = f"v{FORMAT_VERSION}|{weights_fingerprint}|{dataset_fingerprint}|{pixels}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.partial(nnx.jit, static_argnums=2)
def forward_batch(model, images, contract: PixelContract):
    """Features and head outputs of uint8 images (nnx.jit: compiled once per model structure, contract and
    shape)."""
    features = model.features(contract.model_input(images))
    out = {"features": features}
    heads = model.heads(features) if hasattr(model, "heads") else {}  # a TB model (deploy.py): features only
    if "metadata" in heads:
        out["sex_male_prob"] = jax.nn.sigmoid(heads["metadata"][:, METADATA_TASKS.index("sex_male")])
    if "age" in heads:
        out["age_pred"] = heads["age"]
    return out


def extract(model, source, *, contract: PixelContract, batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    """Run the frozen model over every record, fed by `contract`: (table of the module docstring, images/s after
    the first batch).

    The first batch pays the compilation; throughput is measured over the others (0 if there are none).
    """
    mesh = sharding.make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    global_batch = -(-batch_size // jax.device_count()) * jax.device_count()
    model.eval()
    columns: dict[str, list] = {}
    timed_images, timed_from = 0, None
    with pipeline.eval_batches(source, kind="binary", global_batch_size=global_batch,
                               image_size=contract.image_size, geometry=contract.geometry) as batches:
        for local in batches:
            batch = {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in local.items()}
            out = forward_batch(model, batch["image"], contract)
            keep = {k: v for k, v in batch.items() if k != "image"}
            gathered = multihost_utils.process_allgather({**keep, **out}, tiled=True)
            for k, v in gathered.items():
                columns.setdefault(k, []).append(np.asarray(v))
            if timed_from is None:
                timed_from = time.perf_counter()
            else:
                timed_images += int(np.sum(gathered["example_mask"] > 0))
    rate = timed_images / (time.perf_counter() - timed_from) if timed_images else 0.0
    table = {k: np.concatenate(v) for k, v in columns.items()}
    real = table.pop("example_mask") > 0
    table = {k: v[real] for k, v in table.items()}
    order = np.argsort(table["index"], kind="stable")  # record order (hosts interleave records)
    return {k: v[order] for k, v in table.items()}, rate


@functools.partial(nnx.jit, static_argnums=2)
def _batch_statistics(model, images, contract: PixelContract):
    """A train-mode forward pass: every BatchNorm records this batch's statistics (momentum 0, see below)."""
    model.features(contract.model_input(images))


def calibrate_batchnorm(model, source, *, kind: str, contract: PixelContract, batch_size: int,
                        max_images: int) -> int:
    """"Precise BatchNorm": every BatchNorm's running mean and variance := the average of its batch statistics
    over the first full batches of `source` (evaluation views made by the model's pixel `contract`; whole batches
    until `max_images` images are reached); weights unchanged. `model` is anything with a `features(x)` method
    (MetaChexNet, a DenseNet); `kind` is the record kind of `source` ("nih" or "binary", as
    `pipeline.eval_batches` reads it).

    A freshly built network in eval mode normalises with its initial statistics (mean 0, variance 1), i.e. not
    at all; a pretrained one with statistics of its training images; a fine-tuned one with running averages
    that, after a few hundred images, still hold much of its starting statistics. Recomputing them on the
    relevant images removes all of that. Batches are global (sharded over every device and host, like
    `extract`), so every host computes the same statistics. Returns the number of images used.
    """
    if max_images < 1:
        raise ValueError(f"bn_statistics_images={max_images}: BatchNorm statistics need at least one image")
    mesh = sharding.make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    global_batch = -(-batch_size // jax.device_count()) * jax.device_count()
    # Every host must take the same number of steps (each is a collective): the batches that are full on every
    # host (host shards are strided, padded at the end; the smallest has len // process_count records).
    per_host = global_batch // jax.process_count()
    num_batches = min((len(source) // jax.process_count()) // per_host, -(-max_images // global_batch))
    if num_batches == 0:
        raise ValueError(f"no full batch of {global_batch} images in {len(source)} records to estimate "
                         "BatchNorm statistics from")
    norms = batch_norms(model)
    momenta = [bn.momentum for bn in norms]
    sums = None
    model.train()
    try:
        for bn in norms:
            bn.momentum = 0.0  # the running statistics become the current batch's
        with pipeline.eval_batches(source, kind=kind, global_batch_size=global_batch, image_size=contract.image_size,
                                   geometry=contract.geometry) as iterator:
            for _, local in zip(range(num_batches), iterator):
                assert local["example_mask"].min() > 0  # padding rows would bias the statistics
                _batch_statistics(model, jax.make_array_from_process_local_data(data_sharding, local["image"]),
                                  contract)
                stats = [(bn.mean[...], bn.var[...]) for bn in norms]
                sums = stats if sums is None else [(a + m, b + v) for (a, b), (m, v) in zip(sums, stats)]
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()
    for bn, (mean, var) in zip(norms, sums):
        bn.mean[...], bn.var[...] = mean / num_batches, var / num_batches
    return num_batches * global_batch


def features_for(start, records, *, batch_size: int, cache_dir: str) -> dict:
    """The cached table for (start, records: a sets.DatasetRecords), extracting it on a miss through the start's
    pixel contract. Adds `cache` ("hit"/"miss") and timings."""
    key = cache_key(start.fingerprint, records.fingerprint, start.contract)
    path = files.join(files.absolute(cache_dir), f"{key}.npz")  # local or gs://
    hit = files.is_file(path)
    if jax.process_count() > 1:  # hosts with their own disks may disagree; extraction is collective, so all miss
        hit = bool(multihost_utils.process_allgather(np.int32(hit)).min())
    if hit:
        with np.load(io.BytesIO(files.read_bytes(path))) as f:
            table = {k: f[k] for k in f.files}
        if len(table["features"]) != len(records):  # cannot happen unless the file was tampered with
            raise ValueError(f"feature cache {path} holds {len(table['features'])} rows for {records.name} "
                             f"({len(records)} records); delete it")
        return {**table, "cache": "hit", "cache_path": path, "seconds": 0.0, "images_per_s": 0.0}
    start_time = time.perf_counter()
    table, rate = extract(start.model, BinaryRecords.every_record(records), contract=start.contract,
                          batch_size=batch_size)
    seconds = time.perf_counter() - start_time
    if jax.process_index() == 0:
        npz = io.BytesIO()
        np.savez(npz, **table)
        files.write_atomic(path, npz.getvalue())
    logging.info("features of %s under %s: %d images in %.1f s incl. compilation; %.1f img/s after it", records.name,
                 start.name, len(table["features"]), seconds, rate)
    return {**table, "cache": "miss", "cache_path": path, "seconds": seconds, "images_per_s": rate}
