"""The grain input pipeline on tiny in-memory and ArrayRecord sources of data-contract records."""

from __future__ import annotations

import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_fixtures import PickledArrayRecordSource, write_pickled_array_records
from metachex_jax.core.labels import PATHOLOGIES
from metachex_jax.data.input import pipeline
from metachex_jax.data.input.augment import Augmentation, affine_crop, augment
from metachex_jax.imaging.geometry import center_crop

STORED = 40   # stored resolution R of the test records
SIZE = 32     # model resolution S

NIH_FIELDS = {"image": (np.uint8, (SIZE, SIZE)), "pathology": (np.float32, (14,)),
              "pathology_mask": (np.float32, (14,)), "metadata": (np.float32, (2,)),
              "metadata_mask": (np.float32, (2,)), "age": (np.float32, ()), "age_mask": (np.float32, ()),
              "patient_id": (np.int64, ()), "index": (np.int64, ()), "example_mask": (np.float32, ())}
TB_FIELDS = {"image": (np.uint8, (SIZE, SIZE)), "tb": (np.float32, ()), "sex_male": (np.float32, ()),
             "sex_mask": (np.float32, ()), "age": (np.float32, ()), "age_mask": (np.float32, ()),
             "fold": (np.int64, ()), "index": (np.int64, ()), "example_mask": (np.float32, ())}


def nih_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{
        "image": rng.integers(0, 256, (STORED, STORED, 1), dtype=np.uint8),
        "image_name": f"{i:08d}_000.png",
        "patient_id": np.int64(1000 + i),
        "follow_up": np.int64(0),
        "labels": (rng.random(14) < 0.3).astype(np.uint8),
        "age": np.float32(20 + i if i % 4 else 250.0),   # every 4th age implausible
        "age_valid": bool(i % 4),
        "sex_male": np.int64(i % 2),
        "view_ap": np.int64((i // 2) % 2),
    } for i in range(n)]


def tb_records(n: int, fold: int = 0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{
        "image": rng.integers(0, 256, (STORED, STORED, 1), dtype=np.uint8),
        "image_id": f"CHNCXR_{i:04d}_{i % 2}",
        "tb": np.int64(i % 2),
        "sex_male": np.int64(i % 3 - 1),             # -1 (unknown), 0, 1
        "age": np.float32(30 + i if i % 5 else 0.0),
        "age_valid": bool(i % 5),
        "fold": np.int64(fold),
        "reading": "",
    } for i in range(n)]


def train(source, n_batches, **kwargs):
    args = dict(kind="nih", global_batch_size=4, image_size=SIZE, seed=0, process_index=0, process_count=1)
    args.update(kwargs)
    with pipeline.train_batches(source, **args) as batches:
        return [next(batches) for _ in range(n_batches)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def is_window_of(image: np.ndarray, stored: np.ndarray) -> bool:
    """Whether `image` equals some S x S window of `stored`, as is or mirrored."""
    for top in range(stored.shape[0] - SIZE + 1):
        for left in range(stored.shape[1] - SIZE + 1):
            window = stored[top:top + SIZE, left:left + SIZE]
            if np.array_equal(image, window) or np.array_equal(image, window[:, ::-1]):
                return True
    return False


# --- record -> example ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, make_records, fields", [("nih", nih_records, NIH_FIELDS),
                                                        ("tb", tb_records, TB_FIELDS)])
def test_train_batches_have_contract_shapes_dtypes_and_uint8_crops(kind, make_records, fields):
    records = make_records(10)
    (batch,) = train(records, 1, kind=kind, augmentation=Augmentation(flip_probability=0.5))
    assert set(batch) == set(fields)
    for key, (dtype, shape) in fields.items():
        assert batch[key].dtype == dtype, key
        assert batch[key].shape == (4, *shape), key
    # uint8 pixels straight from the records: every image is a (possibly mirrored) crop of its record.
    for image, index in zip(batch["image"], batch["index"]):
        assert is_window_of(image, records[index]["image"][..., 0])
    assert not np.array_equal(batch["image"][0], batch["image"][1])


def test_nih_examples_follow_the_contract():
    records = nih_records(12)
    records[5]["sex_male"] = np.int64(-1)   # an unknown metadata value must be masked, not fed as -1
    (batch,) = pipeline.eval_batches(records, kind="nih", global_batch_size=12, image_size=SIZE,
                                     process_index=0, process_count=1)
    for row, index in enumerate(batch["index"]):
        record = records[index]
        np.testing.assert_array_equal(batch["pathology"][row], record["labels"].astype(np.float32))
        np.testing.assert_array_equal(batch["pathology_mask"][row], np.ones(len(PATHOLOGIES)))
        sex_known = record["sex_male"] >= 0
        np.testing.assert_array_equal(batch["metadata"][row],
                                      [record["view_ap"], record["sex_male"] if sex_known else 0])
        np.testing.assert_array_equal(batch["metadata_mask"][row], [1.0, float(sex_known)])
        assert batch["age"][row] == (record["age"] if record["age_valid"] else 0.0)
        assert batch["age_mask"][row] == float(record["age_valid"])
        assert batch["patient_id"][row] == record["patient_id"]
        assert batch["example_mask"][row] == 1.0
    assert batch["age_mask"].sum() == 9    # ages 0, 4, 8 are implausible in nih_records
    assert batch["metadata_mask"][:, 1].sum() == 11


def test_tb_examples_mask_unknown_sex_and_age():
    records = tb_records(15, fold=3)
    (batch,) = pipeline.eval_batches(records, kind="tb", global_batch_size=15, image_size=SIZE,
                                     process_index=0, process_count=1)
    np.testing.assert_array_equal(batch["index"], np.arange(15))
    raw_sex = np.array([r["sex_male"] for r in records])
    np.testing.assert_array_equal(batch["sex_mask"], (raw_sex >= 0).astype(np.float32))
    np.testing.assert_array_equal(batch["sex_male"], (raw_sex == 1).astype(np.float32))
    valid = np.array([r["age_valid"] for r in records])
    np.testing.assert_array_equal(batch["age_mask"], valid.astype(np.float32))
    np.testing.assert_array_equal(batch["age"], np.where(valid, [r["age"] for r in records], 0))
    np.testing.assert_array_equal(batch["tb"], [r["tb"] for r in records])
    np.testing.assert_array_equal(batch["fold"], np.full(15, 3))


def test_bad_source_names_every_problem():
    records = nih_records(3)
    del records[0]["labels"], records[0]["view_ap"]
    with pytest.raises(ValueError, match=r"'labels'.*'view_ap'"):
        train(records, 1)
    with pytest.raises(ValueError, match="smaller than the model resolution 48"):
        train(nih_records(3), 1, image_size=48)
    with pytest.raises(ValueError, match="unknown kind 'cxr'"):
        train(nih_records(3), 1, kind="cxr")
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        train(nih_records(3), 1, global_batch_size=4, process_index=0, process_count=3)


# --- training order: seeds, epochs, hosts -------------------------------------------------------------------

def test_training_is_deterministic_for_a_seed_and_differs_across_seeds():
    records = nih_records(10)
    augmentation = Augmentation(rotation_degrees=10, scale_range=(0.9, 1.1), translate_fraction=0.05)
    first = train(records, 6, seed=7, augmentation=augmentation)   # 24 examples: crosses 2 epoch boundaries
    assert_same_batches(first, train(records, 6, seed=7, augmentation=augmentation))
    other = train(records, 6, seed=8, augmentation=augmentation)
    assert not np.array_equal(np.concatenate([b["index"] for b in first]),
                              np.concatenate([b["index"] for b in other]))
    # Same record under the two seeds: different augmentation.
    index = first[0]["index"][0]
    row = [np.flatnonzero(b["index"] == index) for b in other]
    other_image = next(b["image"][r[0]] for b, r in zip(other, row) if len(r))
    assert not np.array_equal(first[0]["image"][0], other_image)


def test_every_epoch_is_a_new_permutation_of_the_host_shard():
    records = nih_records(12)
    batches = train(records, 9, num_epochs=3)   # 3 epochs x 12 examples / 4 per batch
    order = np.concatenate([b["index"] for b in batches]).reshape(3, 12)
    for epoch in order:
        assert sorted(epoch) == list(range(12))
    assert len({tuple(epoch) for epoch in order}) == 3
    with pipeline.train_batches(records, kind="nih", global_batch_size=4, image_size=SIZE, seed=0,
                                num_epochs=3, process_index=0, process_count=1) as finite:
        assert finite.num_batches == 9
        assert len(list(finite)) == 9


def test_the_same_record_is_augmented_differently_in_each_epoch():
    records = nih_records(4)
    batches = train(records, 2, global_batch_size=4, num_epochs=2)
    first = dict(zip(batches[0]["index"], batches[0]["image"]))
    second = dict(zip(batches[1]["index"], batches[1]["image"]))
    assert sum(not np.array_equal(first[i], second[i]) for i in range(4)) >= 3


@pytest.mark.parametrize("num_records", [24, 25])
def test_two_hosts_together_visit_every_record_once_per_epoch(num_records):
    records = nih_records(num_records)
    seen = []
    for host in range(2):
        shard_size = len(range(host, num_records, 2))
        batches = train(records, 2 * shard_size // 2, global_batch_size=4, process_index=host, process_count=2)
        indices = np.concatenate([b["index"] for b in batches])   # two epochs of this host
        assert sorted(indices[:shard_size]) == sorted(indices[shard_size:])
        seen.extend(indices[:shard_size])
    assert sorted(seen) == list(range(num_records))


def test_finite_training_takes_the_same_number_of_batches_on_every_host():
    records = nih_records(25)   # host shards of 13 and 12 records
    lengths = set()
    for host in range(2):
        with pipeline.train_batches(records, kind="nih", global_batch_size=4, image_size=SIZE, seed=0,
                                    num_epochs=2, process_index=host, process_count=2) as batches:
            lengths.update({batches.num_batches, len(list(batches))})
    assert lengths == {2 * 12 // 2}


# --- evaluation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_records, process_count, global_batch", [(23, 2, 8), (10, 3, 6), (5, 2, 8),
                                                                     (16, 2, 8), (1, 1, 4)])
def test_eval_counts_every_record_once_with_equal_batches_per_host(num_records, process_count, global_batch):
    records = nih_records(num_records)
    counts = collections.Counter()
    batch_counts = set()
    for host in range(process_count):
        with pipeline.eval_batches(records, kind="nih", global_batch_size=global_batch, image_size=SIZE,
                                   process_index=host, process_count=process_count) as batches:
            host_batches = list(batches)
            assert batches.num_batches == len(host_batches)
        batch_counts.add(len(host_batches))
        for batch in host_batches:
            assert batch["image"].shape == (global_batch // process_count, SIZE, SIZE)
            real = batch["example_mask"] == 1
            counts.update(batch["index"][real].tolist())
            # Padding rows: every mask 0, image 0, index -1.
            for key in ("example_mask", "pathology_mask", "metadata_mask", "age_mask"):
                assert not batch[key][~real].any(), key
            assert not batch["image"][~real].any()
            assert (batch["index"][~real] == -1).all()
    assert len(batch_counts) == 1
    assert counts == collections.Counter(range(num_records))


def test_eval_is_deterministic_centre_crops():
    records = nih_records(6)
    runs = [list(pipeline.eval_batches(records, kind="nih", global_batch_size=4, image_size=SIZE,
                                       process_index=0, process_count=1)) for _ in range(2)]
    assert_same_batches(*runs)
    offset = (STORED - SIZE) // 2
    for image, index in zip(runs[0][0]["image"], runs[0][0]["index"]):
        np.testing.assert_array_equal(image, records[index]["image"][offset:offset + SIZE, offset:offset + SIZE, 0])


# --- augmentation ------------------------------------------------------------------------------------------

def test_flip_really_flips_and_crop_is_centred_without_randomness():
    image = np.random.default_rng(0).integers(0, 256, (STORED, STORED), dtype=np.uint8)
    rng = np.random.default_rng(1)
    centre = center_crop(image, SIZE)
    np.testing.assert_array_equal(augment(image, SIZE, Augmentation.none(), rng), centre)
    flipped = augment(image, SIZE, Augmentation(random_crop=False, flip_probability=1.0), rng)
    np.testing.assert_array_equal(flipped, centre[:, ::-1])


def test_affine_crop_matches_exact_array_operations():
    image = np.random.default_rng(0).integers(0, 256, (STORED, STORED), dtype=np.uint8)
    np.testing.assert_array_equal(affine_crop(image, SIZE, top=3, left=5), image[3:3 + SIZE, 5:5 + SIZE])
    # A whole-pixel translation moves the window content.
    shifted = affine_crop(image, SIZE, top=4, left=4, dx=2, dy=-1)
    np.testing.assert_array_equal(shifted, image[5:5 + SIZE, 2:2 + SIZE])
    # 90 degrees lands on pixel centres (up to cos(90) ~ 1e-17, i.e. +-1 rounding): clockwise as displayed.
    rotated = affine_crop(image, STORED, top=0, left=0, degrees=90).astype(int)
    np.testing.assert_allclose(rotated, np.rot90(image, k=-1).astype(int), atol=1)
    # Zooming out by 2 leaves a black border (fill 0) and keeps the centre pixel neighbourhood.
    zoomed_out = affine_crop(image, SIZE, top=4, left=4, scale=0.5)
    assert not zoomed_out[:4].any() and not zoomed_out[:, -4:].any()


def test_random_affine_augmentation_keeps_shape_dtype_and_varies():
    image = np.random.default_rng(0).integers(0, 256, (STORED, STORED), dtype=np.uint8)
    augmentation = Augmentation(rotation_degrees=15, scale_range=(0.8, 1.2), translate_fraction=0.1)
    outputs = [augment(image, SIZE, augmentation, np.random.default_rng(seed)) for seed in range(4)]
    assert all(o.shape == (SIZE, SIZE) and o.dtype == np.uint8 for o in outputs)
    assert len({o.tobytes() for o in outputs}) == 4
    np.testing.assert_array_equal(outputs[0], augment(image, SIZE, augmentation, np.random.default_rng(0)))


def test_invalid_augmentation_names_every_bad_setting():
    with pytest.raises(ValueError, match=r"flip_probability=2.*scale_range=\(1.2, 0.8\)"):
        Augmentation(flip_probability=2, scale_range=(1.2, 0.8))


# --- mixing -------------------------------------------------------------------------------------------------

def test_mixing_respects_weights_deterministically():
    shenzhen, montgomery = tb_records(20, fold=0, seed=1), tb_records(7, fold=1, seed=2)
    runs = [train([shenzhen, montgomery], 50, kind="tb", weights=[3, 1]) for _ in range(2)]
    assert_same_batches(*runs)
    from_montgomery = np.concatenate([b["fold"] for b in runs[0]])
    assert abs(from_montgomery.mean() - 0.25) < 0.02
    with pytest.raises(ValueError, match="2 weights for 3 sources"):
        train([shenzhen, montgomery, shenzhen], 1, kind="tb", weights=[1, 1])


# --- checkpointing and worker processes --------------------------------------------------------------------

def test_iterator_state_resumes_at_the_same_batch_through_orbax(tmp_path):
    records = nih_records(9)

    def make():
        return pipeline.train_batches(records, kind="nih", global_batch_size=4, image_size=SIZE, seed=3,
                                      augmentation=Augmentation(rotation_degrees=5),
                                      process_index=0, process_count=1)

    with make() as batches:
        for _ in range(3):
            next(batches)
        with ocp.CheckpointManager(tmp_path) as manager:
            manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(batches)))
            manager.wait_until_finished()
        expected = [next(batches) for _ in range(4)]
    with make() as restored:
        with ocp.CheckpointManager(tmp_path) as manager:
            manager.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored)))
        assert_same_batches(expected, [next(restored) for _ in range(4)])


def test_worker_processes_read_array_records_identically_and_resume(tmp_path):
    records = nih_records(14)
    path = tmp_path / "records.array_record"
    write_pickled_array_records(path, records)
    source = PickledArrayRecordSource(str(path))
    augmentation = Augmentation(rotation_degrees=5, scale_range=(0.9, 1.1))
    args = dict(kind="nih", global_batch_size=4, image_size=SIZE, seed=5, augmentation=augmentation,
                process_index=0, process_count=1)
    with pipeline.train_batches(records, **args) as in_process:
        expected = [next(in_process) for _ in range(6)]
    with pipeline.train_batches(source, num_workers=2, **args) as workers:
        got = [next(workers) for _ in range(3)]
        state = workers.get_state()
        got += [next(workers) for _ in range(3)]
    assert_same_batches(expected, got)
    with pipeline.train_batches(source, num_workers=2, **args) as resumed:
        resumed.set_state(state)
        assert_same_batches(expected[3:], [next(resumed) for _ in range(3)])


def test_auto_worker_count_is_in_process_on_cpu_and_spare_cores_on_accelerators():
    assert pipeline.resolve_workers(-1, "cpu", cpu_count=64) == 0  # XLA's CPU thread pool needs the cores
    assert pipeline.resolve_workers(-1, "gpu", cpu_count=16) == 14
    assert pipeline.resolve_workers(-1, "tpu", cpu_count=240) == pipeline.MAX_AUTO_WORKERS
    assert pipeline.resolve_workers(-1, "gpu", cpu_count=2) == 1
    assert pipeline.resolve_workers(3, "cpu", cpu_count=2) == 3  # an explicit count is kept
    with pytest.raises(ValueError, match="workers=-2"):
        pipeline.resolve_workers(-2, "gpu")


def test_a_resumed_run_keeps_the_checkpoints_worker_count():
    assert pipeline.workers_for_resume(-1, 14, saved=None) == 14  # fresh run: auto
    assert pipeline.workers_for_resume(-1, 14, saved=0) == 0  # resume: the saved input position's count
    assert pipeline.workers_for_resume(3, 3, saved=3) == 3
    with pytest.raises(ValueError, match=r"workers=3, but .* with 0 worker\(s\); resume with --config.data.workers=0"):
        pipeline.workers_for_resume(3, 3, saved=0)
