"""The TB transfer comparison end to end on tiny data: a tiny MetaChexNet pretraining run on the demo generator's
tree (densenet_tiny, 32 px), then probe + fine-tune on the same tree's Shenzhen/Montgomery; report files, metrics
vs scikit-learn, the feature cache (reuse and invalidation), fold hygiene, and each bad input."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from metachex_jax import config_lib, reports, train
from metachex_jax.data import datasets as nih_datasets
from metachex_jax.data import pipeline
from metachex_jax.preprocessing import to_model_input
from metachex_jax.transfer import features as features_lib
from metachex_jax.transfer import protocols, run, tb_data, weights

DEMO = dict(seed=0, num_nih=96, num_shenzhen=36, num_montgomery=24, num_hospital=0, size=64)
ARCH, RES = "densenet_tiny", 32


def pretrain_config(demo_dir):
    c = config_lib.pretrain_config(f"demo,arch={ARCH},res={RES}", multitask=True)
    c.demo_dir = str(demo_dir)
    c.demo_data.update(DEMO)
    c.batch_size_per_device, c.eval_batch_size_per_device = 16, 32
    c.num_epochs, c.max_steps, c.eval_every_steps, c.log_every_steps, c.n_boot = 1, 3, 3, 1, 10
    c.optim.warmup_steps = 1
    return c


def transfer_config(demo_dir, init_from, cache_dir, **overrides):
    c = config_lib.transfer_config(f"demo,arch={ARCH},res={RES}")
    c.demo_dir = str(demo_dir)
    c.demo_data.update(DEMO)
    c.init_from = str(init_from)
    c.feature_cache_dir = str(cache_dir)
    c.data.num_folds = 3
    c.probe.inner_folds = 3
    c.finetune.update(max_folds=1, num_epochs=2, patience=1, batch_size=8, eval_batch_size=32)
    c.n_boot = 20
    c.feature_batch_size = 16  # random_bn's statistics need full batches of the 57 tiny NIH training images
    c.update_from_flattened_dict(overrides)
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    demo_dir = tmp_path_factory.mktemp("demo")
    pre = tmp_path_factory.mktemp("pre")
    train.train_and_evaluate(pretrain_config(demo_dir), str(pre))
    return demo_dir, pre


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    demo_dir, pre = setup
    workdir, cache = tmp_path_factory.mktemp("tb"), tmp_path_factory.mktemp("cache")
    config = transfer_config(demo_dir, pre, cache)
    return config, workdir, run.run(config, str(workdir))


def test_report_has_every_cell_and_metrics_match_sklearn(finished):
    config, workdir, result = finished
    out = workdir / "report"
    names = {"comparison.json", "comparison.md"} | {f"roc_{p}.png" for p in result["protocols"]}
    assert names <= set(os.listdir(out))
    saved = json.loads((out / "comparison.json").read_text())
    assert set(saved["cells"]) == {"metachexnet/probe", "metachexnet/finetune", "random/probe", "random/finetune",
                                   "random_bn/probe"}  # the demo compares both random baselines
    assert any("random_bn is not fine-tuned" in note for note in saved["notes"])
    assert saved["starts"]["random_bn"]["bn_statistics_images"] > 0
    for key, per_protocol in saved["cells"].items():
        assert set(per_protocol) == set(protocols.PROTOCOLS)
        start, method = key.split("/")
        for protocol, cell in per_protocol.items():
            cols = reports.read_predictions_csv(out / "predictions" / f"{start}_{method}_{protocol}.csv")
            y, prob, margin = cols["tb"], cols["prob"], cols["margin"]
            assert cell["auroc"]["value"] == pytest.approx(roc_auc_score(y, prob), abs=1e-12)
            assert cell["accuracy"]["value"] == pytest.approx(np.mean((margin >= 0) == (y == 1)), abs=1e-12)
            assert cell["sensitivity"]["value"] == pytest.approx(np.mean(margin[y == 1] >= 0), abs=1e-12)
            assert cell["auroc"]["ci_low"] <= cell["auroc"]["value"] <= cell["auroc"]["ci_high"]
            # Every test image exactly once; the probe covers whole sets, fine-tuning its first fold.
            ids = list(cols["image_id"])
            assert len(ids) == len(set(ids)) == cell["n_images"]
            test_set = protocol.split("_to_")[-1].replace("cv_", "")
            full = saved["datasets"][test_set]["n_images"]
            assert cell["n_images"] == full if (method == "probe" or "_to_" in protocol) else cell["n_images"] < full
    md = (out / "comparison.md").read_text()
    assert "metachexnet/probe" in md and "age MAE" in md
    # The MetaChexNet heads are evaluated on the TB sets, against the readings, masked where unknown.
    age_sex = saved["age_sex"]["metachexnet"]["shenzhen"]
    assert age_sex["n_age_known"] > 0 and age_sex["age_mae_years"]["value"] > 0
    assert "random" not in saved["age_sex"]


def test_random_bn_gets_precise_batchnorm_statistics_from_nih_training_images(setup):
    demo_dir, _ = setup
    config = transfer_config(demo_dir, "", "")
    source = nih_datasets.chestxray14_splits(config)["train"]
    start = weights.load_start("random_bn", config.model, 0)
    model = start.model
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert features_lib.calibrate_batchnorm(model, source, image_size=RES, batch_size=8, max_images=24) == 24
    # Independently: the stem's BatchNorm now holds the average over the first 3 batches of conv0's batch
    # mean and (biased) variance per channel.
    means, variances = [], []
    with pipeline.eval_batches(source, kind="nih", global_batch_size=8, image_size=RES) as batches:
        for batch, _ in zip(batches, range(3)):
            y = np.asarray(model.backbone.conv0(to_model_input(jnp.asarray(batch["image"]))), np.float64)
            means.append(y.mean((0, 1, 2)))
            variances.append(y.var((0, 1, 2)))
    norm0 = model.backbone.norm0
    np.testing.assert_allclose(norm0.mean[...], np.mean(means, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm0.var[...], np.mean(variances, 0), rtol=1e-3, atol=1e-6)
    assert not np.allclose(norm0.var[...], 1.0)  # no longer the initial statistics
    # Weights untouched; momentum and eval mode restored.
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)))
    assert norm0.momentum == 0.9 and norm0.use_running_average
    with pytest.raises(ValueError, match=rf"no full batch of 64 images in {len(source)} records"):
        features_lib.calibrate_batchnorm(model, source, image_size=RES, batch_size=64, max_images=64)


def test_probe_fold_hygiene_and_determinism(finished, setup, tmp_path):
    config, workdir, result = finished
    sets = tb_data.tb_sources(config)
    for protocol in protocols.PROTOCOLS:
        splits = protocols.check_protocol(protocol, sets, need_validation=True)
        for split in splits:
            if split.train_set == split.test_set:
                assert not set(split.train) & set(split.test)
            assert set(split.validation) <= set(split.train) and not set(split.validation) & set(split.fit)
        if protocol.startswith("cv_"):
            tested = np.concatenate([s.test for s in splits])
            assert sorted(tested) == list(range(len(sets[splits[0].train_set])))
    # Same config, same result (features from the cache): the probe's numbers are identical.
    again = run.run(transfer_config(setup[0], setup[1], config.feature_cache_dir, methods="probe"), str(tmp_path))
    for protocol in protocols.PROTOCOLS:
        assert again["cells"]["metachexnet/probe"][protocol] == result["cells"]["metachexnet/probe"][protocol]
    assert all("(hit)" in k for k in again["timings"] if k.startswith("features") and k.endswith(" s"))


def test_feature_cache_is_keyed_on_content(finished, setup, tmp_path):
    config, _, _ = finished
    demo_dir, pre = setup
    sets = tb_data.tb_sources(config)
    start = weights.load_start(str(pre), config.model, 0)
    kwargs = dict(image_size=RES, batch_size=32, cache_dir=config.feature_cache_dir)
    hit = features_lib.features_for(start, sets["montgomery"], **kwargs)
    assert hit["cache"] == "hit"
    # A copy of the checkpoint elsewhere: same content, same cache entry.
    moved = tmp_path / "moved"
    shutil.copytree(pre, moved)
    assert features_lib.features_for(weights.load_start(str(moved), config.model, 0), sets["montgomery"],
                                     **kwargs)["cache"] == "hit"
    # Changed weights: a new entry, whose features differ.
    other = weights.load_start("random", config.model, 1)  # seed 0 was extracted by the run
    miss = features_lib.features_for(other, sets["montgomery"], **kwargs)
    assert miss["cache"] == "miss" and not np.allclose(miss["features"], hit["features"])
    assert features_lib.features_for(other, sets["montgomery"], **kwargs)["cache"] == "hit"
    # A changed dataset build (another fold seed -> other records): a new entry.
    reseeded = transfer_config(demo_dir, pre, config.feature_cache_dir, **{"data.fold_seed": 1})
    changed = tb_data.tb_sources(reseeded, ("montgomery",))["montgomery"]
    assert changed.fingerprint != sets["montgomery"].fingerprint
    assert features_lib.features_for(start, changed, **kwargs)["cache"] == "miss"


def test_bad_inputs_give_clear_errors(finished, setup, tmp_path):
    config, _, _ = finished
    demo_dir, pre = setup
    # A checkpoint of another architecture than the comparison's.
    wrong_arch = transfer_config(demo_dir, pre, tmp_path, **{"model.arch": "densenet121"})
    with pytest.raises(weights.StartingWeightsError, match=r"is a densenet_tiny but this comparison uses densenet121"):
        run.run(wrong_arch, str(tmp_path / "a"))
    # An incomplete checkpoint directory, and a corrupt one.
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(weights.StartingWeightsError, match=f"{empty}.*no checkpoint"):
        weights.load_start(str(empty), config.model, 0)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pre, corrupt)
    for root, _, names in os.walk(corrupt / "checkpoints"):
        for name in names:
            if "state" in root:
                (open(os.path.join(root, name), "wb")).write(b"garbage")
    with pytest.raises(weights.StartingWeightsError, match=f"{corrupt}.*could not be read"):
        weights.load_start(str(corrupt), config.model, 0)
    with pytest.raises(weights.StartingWeightsError, match="does not exist"):
        weights.load_start(str(tmp_path / "nowhere"), config.model, 0)
    # A dataset not yet prepared (real-data config, empty data_dir).
    unprepared = transfer_config(demo_dir, pre, tmp_path, demo=False, **{"data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(FileNotFoundError, match=r"(?s)montgomery/r36_k3_seed0 was not found.*"
                       r"shenzhen/r36_k3_seed0 was not found.*python -m metachex_jax.prepare --dataset=shenzhen"):
        run.run(unprepared, str(tmp_path / "b"))
    # random_bn without the ChestX-ray14 build it takes its BatchNorm statistics from (TB sets prepared).
    _, tb_data_dir = nih_datasets.resolve_demo(config)
    no_nih = transfer_config(demo_dir, pre, tmp_path, demo=False, methods="probe",
                             **{"data.data_dir": tb_data_dir, "data.val_fraction": 0.3})
    with pytest.raises(FileNotFoundError, match=r"(?s)'random_bn' take their BatchNorm statistics from the "
                       r"ChestX-ray14 training images.*chestxray14/r36_val0p3_seed0 was not found"):
        run.run(no_nih, str(tmp_path / "d"))
    # A fold with a single class: Montgomery's 24 images in 12 folds leave single-class test folds.
    many_folds = transfer_config(demo_dir, pre, tmp_path, **{"data.num_folds": 12})
    with pytest.raises(ValueError, match=r"montgomery fold \d+: the test part has a single class"):
        run.run(many_folds, str(tmp_path / "c"))


def test_gs_workdir_and_feature_cache(finished, setup, fake_gcs):
    """A probe-only comparison writing its report and feature cache to gs:// (the fake_gcs stand-in): every file
    lands there and the numbers equal the local run's (same weights, same features)."""
    local_config, _, local_result = finished
    demo_dir, pre = setup
    config = transfer_config(demo_dir, pre, fake_gcs.url + "/cache", methods="probe")
    result = run.run(config, fake_gcs.url + "/tb")
    assert all("(miss)" in k for k in result["timings"] if k.startswith("features") and k.endswith(" s"))
    out = fake_gcs.local(fake_gcs.url + "/tb/report")
    assert {"comparison.json", "comparison.md"} | {f"roc_{p}.png" for p in result["protocols"]} <= set(os.listdir(out))
    saved = json.loads((out / "comparison.json").read_text())
    for key in ("metachexnet/probe", "random/probe"):
        assert saved["cells"][key] == json.loads(reports.to_json_text(local_result["cells"][key]))
        for protocol in result["protocols"]:
            csv_url = f"{fake_gcs.url}/tb/report/predictions/{key.replace('/', '_')}_{protocol}.csv"
            assert len(reports.read_predictions_csv(csv_url)["tb"]) == saved["cells"][key][protocol]["n_images"]
    cached = sorted(os.listdir(fake_gcs.local(fake_gcs.url + "/cache")))
    assert len(cached) == 6 and all(name.endswith(".npz") for name in cached)  # 3 starts x 2 sets
    again = run.run(config, fake_gcs.url + "/tb2")  # read back from the gs:// cache
    assert all("(hit)" in k for k in again["timings"] if k.startswith("features") and k.endswith(" s"))
    assert again["cells"] == result["cells"]
