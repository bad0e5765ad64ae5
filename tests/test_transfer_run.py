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
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from data_fixtures import make_tb_tree
from dataset_trees import make_tbx11k_tree
from metachex_jax import predict
from metachex_jax.configs import pretrain, transfer
from metachex_jax.contract.calibration import PlattScaling, fit_platt
from metachex_jax.contract.pixels import PixelContract, to_model_input
from metachex_jax.core.errors import ConfigError
from metachex_jax.data.input import datasets as nih_datasets
from metachex_jax.data.input import pipeline
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.evaluation import metrics, reports
from metachex_jax.models import saved as saved_models
from metachex_jax.models.tb_classifier import TbClassifier
from metachex_jax.serving import export
from metachex_jax.serving.predictor import Predictor
from metachex_jax.training import steps as train_steps
from metachex_jax.training import trainer
from metachex_jax.transfer import curves as curves_lib
from metachex_jax.transfer import features as features_lib
from metachex_jax.transfer import groups
from metachex_jax.transfer import protocols
from metachex_jax.transfer import report as report_lib
from metachex_jax.transfer import run
from metachex_jax.transfer import sets as sets_lib
from metachex_jax.transfer import weights
from metachex_jax.transfer.finetune import Finetuner
from metachex_jax.transfer.probe import ProbeSettings, fit_probe
from metachex_jax.transfer.sets import RecordSubset

DEMO = dict(seed=0, num_nih=96, num_shenzhen=36, num_montgomery=24, num_hospital=60, size=64)
ARCH, RES = "densenet_tiny", 32



def contract_of(config) -> PixelContract:
    """The pixel contract a transfer run gives its starts (the test config's sizes)."""
    return PixelContract.from_config(config)


def load(spec, config, seed=0):
    """`weights.load_start` as the run calls it: at the run's sizes."""
    return weights.load_start(spec, config.model, seed, contract=contract_of(config))


def pretrain_config(demo_dir):
    c = pretrain.get_config(f"demo,arch={ARCH},res={RES}")
    c.demo_dir = str(demo_dir)
    c.demo_data.update(DEMO)
    c.batch_size_per_device, c.eval_batch_size_per_device = 16, 32
    c.num_epochs, c.max_steps, c.eval_every_steps, c.log_every_steps, c.n_boot = 1, 3, 3, 1, 10
    c.optim.warmup_steps = 1
    return c


def transfer_config(demo_dir, init_from, cache_dir, **overrides):
    c = transfer.get_config(f"demo,arch={ARCH},res={RES}")
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
    trainer.train_and_evaluate(pretrain_config(demo_dir), str(pre))
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
    names = {"comparison.json", "comparison.md"} | {f"{kind}_{p}.png" for p in result["protocols"]
                                                     for kind in ("roc", "reliability")}
    assert names <= set(os.listdir(out))
    saved = json.loads((out / "comparison.json").read_text())
    assert set(saved["cells"]) == {"metachexnet/probe", "metachexnet/finetune", "random/probe", "random/finetune",
                                   "random_bn/probe"}  # the demo compares both random baselines
    assert any("random_bn is not fine-tuned" in note for note in saved["notes"])
    assert saved["starts"]["random_bn"]["bn_statistics_images"] > 0
    for key, per_protocol in saved["cells"].items():
        assert set(per_protocol) == set(protocols.TB_PROTOCOLS)
        start, method = key.split("/")
        for protocol, cell in per_protocol.items():
            cols = reports.read_predictions_csv(out / "predictions" / f"{start}_{method}_{protocol}.csv")
            y, prob, margin = cols["label"], cols["prob"], cols["margin"]
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
    for heading in ("## Who wins (paired)", "## Screening operating points", "## Calibration", "Test-set oracle"):
        assert heading in md
    # Paired comparisons: every pair of cells per protocol, on the images both predicted, Holm within the protocol.
    for protocol in protocols.TB_PROTOCOLS:
        comparisons = saved["paired"][protocol]
        assert len(comparisons) == 10  # 5 cells
        for c in comparisons:
            n_a, n_b = (saved["cells"][c[k]][protocol]["n_images"] for k in ("a", "b"))
            assert c["n_images"] == min(n_a, n_b)
            assert c["wins"] in (None, c["a"], c["b"])
            # The wins rule: Holm-adjusted p below 0.05 and the paired CI on the same side of 0.
            ci, test = c["difference"], c["test"]
            assert test["method"] == "delong" and c["n_patients"] == c["n_images"]  # TB sets: one image a patient
            assert (c["wins"] == c["a"]) == (c["p_holm"] < 0.05 and ci["ci_low"] > 0 and test["difference"] > 0)
            assert (c["wins"] == c["b"]) == (c["p_holm"] < 0.05 and ci["ci_high"] < 0 and test["difference"] < 0)
            assert c["p_holm"] >= test["p_value"]
    # Fine-tuning: precise BatchNorm statistics from the fit images, the learning rates as written.
    assert saved["finetune"] == {"bn_stats": "fit", "effective_lr": {"backbone": 1e-4, "tb_head": 1e-3},
                                 "lr_scaling": "none", "global_batch": 8}
    for protocol, extra in saved["details"]["metachexnet/finetune"].items():
        assert extra["test_bn_stats"] == ["fit"] and all(b["validation"] > 0 for b in extra["bn_images"])
    assert all(all(extra["converged"]) for extra in saved["details"]["metachexnet/probe"].values())
    # The MetaChexNet heads are evaluated on the TB sets, against the readings, masked where unknown.
    age_sex = saved["age_sex"]["metachexnet"]["shenzhen"]
    assert age_sex["n_age_known"] > 0 and age_sex["age_mae_years"]["value"] > 0
    assert "random" not in saved["age_sex"]


def training_images(saved_predictions: dict, protocol: str, fold: str) -> dict:
    """image id -> label of a split's training images, from the full run's per-image probe predictions (the CV
    CSV of the training set: every image with its fold)."""
    train = protocol.split("_to_")[0].replace("cv_", "")
    cols = saved_predictions[f"cv_{train}"]
    keep = cols["fold"] != int(fold) if protocol.startswith("cv_") else np.ones(len(cols["fold"]), bool)
    return dict(zip(cols["image_id"][keep].tolist(), cols["label"][keep].tolist()))


def test_label_efficiency_curves_are_reproducible_from_their_predictions(finished):
    """The demo config's curves (sizes 10, 20, 50, all; 3 draws): every plotted point is the mean over draws of the
    scikit-learn AUROC of its saved per-image predictions; 'all' is the full run's cell; each draw is a seeded,
    stratified subset of its split's training images; the paired comparisons per size follow the win rule."""
    config, workdir, result = finished
    report_dir = workdir / "report"
    saved = json.loads((report_dir / "comparison.json").read_text())
    curves = saved["curves"]
    draws = json.loads((report_dir / "curves" / "draws.json").read_text())
    full = {p: reports.read_predictions_csv(report_dir / "predictions" / f"metachexnet_probe_{p}.csv")
            for p in protocols.TB_PROTOCOLS}
    assert any("size 50 is at least every split's training set" in n for n in curves["notes"])  # tiny sets
    for protocol, entry in curves["protocols"].items():
        assert (report_dir / "curves" / f"curve_{protocol}.png").stat().st_size > 1000
        assert entry["sizes"][0] == 10 and entry["sizes"][-1] == "all"
        assert set(entry["points"]) == {"metachexnet/probe", "random/probe", "random_bn/probe"}
        for key, points in entry["points"].items():
            start, method = key.split("/")
            cols = reports.read_predictions_csv(report_dir / "curves" / f"{start}_{method}_{protocol}.csv")
            for point in points:
                here = cols["size"] == str(point["size"])
                per_draw = [roc_auc_score(cols["label"][here & (cols["draw"] == d)],
                                          cols["prob"][here & (cols["draw"] == d)]) for d in range(point["draws"])]
                assert point["mean"] == pytest.approx(np.mean(per_draw), abs=1e-12)
                assert point["auroc_draws"] == pytest.approx(per_draw, abs=1e-12)
                assert point["min"] <= point["mean"] <= point["max"]
                assert point["draws"] == (1 if point["size"] == "all" else config.train_draws)
                # the same held-out images as the full run, in its order
                assert list(cols["image_id"][here & (cols["draw"] == 0)]) == list(full[protocol]["image_id"])
            assert points[-1]["mean"] == pytest.approx(saved["cells"][key][protocol]["auroc"]["value"], abs=1e-12)
        for size, per_draw in draws[protocol].items():
            assert len(per_draw) == config.train_draws and per_draw[0] != per_draw[1]
            for drawn in per_draw:
                for fold, ids in drawn.items():
                    labels = training_images(full, protocol, fold)
                    assert set(ids) <= set(labels) and len(ids) == len(set(ids)) == int(size)
                    assert min(sum(labels[i] == c for i in ids) for c in (0, 1)) >= 5
        for c in entry["paired"]:
            mean_of = {}
            for side in ("a", "b"):
                start, method = c[side].split("/")
                cols = reports.read_predictions_csv(report_dir / "curves" / f"{start}_{method}_{protocol}.csv")
                here = cols["size"] == str(c["size"])
                mean_of[side] = np.mean([roc_auc_score(cols["label"][here & (cols["draw"] == d)],
                                                       cols["prob"][here & (cols["draw"] == d)])
                                         for d in range(int(cols["draw"][here].max()) + 1)])
            assert c["difference"]["value"] == pytest.approx(mean_of["a"] - mean_of["b"], abs=1e-12)
            won = c["p_holm"] < 0.05 and (c["difference"]["ci_low"] > 0 if c["test"]["difference"] > 0
                                          else c["difference"]["ci_high"] < 0)
            assert c["wins"] == ((c["a"] if c["test"]["difference"] > 0 else c["b"]) if won else None)
        assert len(entry["paired"]) == 3 * len(entry["sizes"])  # 3 pairs of probe starts at every size
        assert set(entry["reaches_target"]) == set(entry["points"]) and len(entry["no_win_from"]) == 1
    md = (report_dir / "comparison.md").read_text()
    assert "## Label efficiency" in md and "Smallest size from which no larger size has a win" in md


def test_finetuning_curves_take_their_validation_part_out_of_the_draw(finished, setup, tmp_path):
    """train_sizes_finetune: each draw is fine-tuned (its validation fifth taken out of the draw) and predicts the
    full run's fine-tuned held-out images; a size whose fit part is below one batch is skipped with a note."""
    config, _, _ = finished
    demo_dir, pre = setup
    c = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="finetune", compare_with="random",
                        protocols="cv_shenzhen", train_sizes="10,20,all", train_draws=2, train_sizes_finetune=True,
                        **{"finetune.batch_size": 12})  # the full fold fits 12 images, a draw of 10 fewer
    result = run.run(c, str(tmp_path))
    entry = result["curves"]["protocols"]["cv_shenzhen"]
    assert set(entry["points"]) == {"metachexnet/finetune", "random/finetune"}
    assert any("size 10 skipped" in n and "finetune.batch_size=12" in n for n in result["curves"]["notes"])
    full = reports.read_predictions_csv(tmp_path / "report" / "predictions" / "metachexnet_finetune_cv_shenzhen.csv")
    for key, points in entry["points"].items():
        assert [p["size"] for p in points] == [20, "all"]
        start, method = key.split("/")
        cols = reports.read_predictions_csv(tmp_path / "report" / "curves" / f"{start}_{method}_cv_shenzhen.csv")
        for point in points:
            here = cols["size"] == str(point["size"])
            per_draw = [roc_auc_score(cols["label"][here & (cols["draw"] == d)],
                                      cols["prob"][here & (cols["draw"] == d)]) for d in range(point["draws"])]
            assert point["auroc_draws"] == pytest.approx(per_draw, abs=1e-12)
            assert list(cols["image_id"][here & (cols["draw"] == 0)]) == list(full["image_id"])  # the first fold's
        assert points[-1]["mean"] == pytest.approx(result["cells"][key]["cv_shenzhen"]["auroc"]["value"], abs=1e-12)
    y = np.r_[np.zeros(14, np.int64), np.ones(6, np.int64)]
    validation = curves_lib.validation_part(y, np.arange(20), seed=0)
    assert 0 < len(validation) < 20 and set(y[validation].tolist()) == {0, 1}  # a stratified part of the draw


def test_several_pretraining_runs_as_one_start(finished, setup, tmp_path):
    """init_from as a glob of runs: a start of two runs, a cell per run, the comparison once per replicate (each
    its own Holm family), the mean and standard deviation across runs, the decision across runs, and the deployed
    run chosen by its pretraining's validation result (here the second copy's, raised in its saved bookkeeping)."""
    config, _, single = finished
    demo_dir, pre = setup
    runs = tmp_path / "runs"
    for name in ("seed_a", "seed_b"):
        shutil.copytree(pre, runs / name)
    metas = sorted((runs / "seed_b" / "checkpoints").glob("*/meta/metadata"), key=lambda p: int(p.parts[-3]))
    meta = json.loads(metas[-1].read_text())
    meta["best"]["val_mean_auroc"] += 0.1
    metas[-1].write_text(json.dumps(meta))
    grouped = transfer_config(demo_dir, f"{runs}/seed_*", config.feature_cache_dir, methods="probe",
                              protocols="cv_shenzhen,cv_montgomery", train_sizes="10,all")
    result = run.run(grouped, str(tmp_path / "tb"))
    names = {"metachexnet@0", "metachexnet@1", "random", "random_bn"}
    assert set(result["starts"]) == names
    assert [result["starts"][f"metachexnet@{k}"]["source"] for k in (0, 1)] == [str(runs / "seed_a"),
                                                                                  str(runs / "seed_b")]
    assert {result["starts"][n]["group"] for n in names} == {"metachexnet", "random", "random_bn"}
    for protocol in ("cv_shenzhen", "cv_montgomery"):
        for k in (0, 1):  # the same weights as the single run: the same cell
            assert result["cells"][f"metachexnet@{k}/probe"][protocol]["auroc"] == pytest.approx(
                single["cells"]["metachexnet/probe"][protocol]["auroc"])
        comparisons = result["paired"][protocol]
        for r in (0, 1):
            family = [c for c in comparisons if c["replicate"] == r]
            assert {c["a"] for c in family} | {c["b"] for c in family} == {
                f"metachexnet@{r}/probe", "random/probe", "random_bn/probe"}
            np.testing.assert_allclose([c["p_holm"] for c in family],
                                       metrics.holm_adjust([c["test"]["p_value"] for c in family]))
        across = result["groups"]["cells"]["metachexnet/probe"][protocol]
        assert across["runs"] == ["metachexnet@0", "metachexnet@1"] and across["std"] == pytest.approx(0.0)
        assert across["mean"] == pytest.approx(single["cells"]["metachexnet/probe"][protocol]["auroc"]["value"])
        for decision in result["groups"]["paired"][protocol]:
            calls = {(r["wins"] or "").split("@")[0].replace("/probe", "") for r in decision["runs"]}
            differences = [r["difference"]["value"] for r in decision["runs"]]
            assert len(differences) == 2 and differences[0] == differences[1]  # identical runs agree
            assert decision["same_sign"] == (differences[0] != 0)  # a zero difference has no sign
            assert (decision["wins"] or "").replace("/probe", "") == calls.pop()
        assert len(result["curves"]["protocols"][protocol]["no_win_from"]) == 2  # per replicate
    card = json.loads((tmp_path / "tb" / "model" / "model.json").read_text())
    assert card["training"]["start"] == "metachexnet@1" and "best validation" in card["training"]["start_choice"]
    assert card["training"]["start_info"]["source"] == str(runs / "seed_b")
    md = (tmp_path / "tb" / "report" / "comparison.md").read_text()
    assert "## Several runs per start" in md and "metachexnet@1/probe" in md
    shutil.copytree(pre, runs / "seed_c")  # 3 runs against 2: no replicate pairing
    bad = transfer_config(demo_dir, f"{runs}/seed_[ab]", config.feature_cache_dir, methods="probe",
                          compare_with=f"random,{runs}/seed_*")
    with pytest.raises(weights.StartingWeightsError, match="must have the same number of runs"):
        run.run(bad, str(tmp_path / "bad"))


def test_random_bn_gets_precise_batchnorm_statistics_from_nih_training_images(setup):
    demo_dir, _ = setup
    config = transfer_config(demo_dir, "", "")
    source = nih_datasets.chestxray14_splits(DataSpec.from_config(config))["train"]
    start = load("random_bn", config)
    model = start.model
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert features_lib.calibrate_batchnorm(model, source, kind="nih", contract=contract_of(config), batch_size=8,
                                            max_images=24) == 24
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
        features_lib.calibrate_batchnorm(model, source, kind="nih", contract=contract_of(config), batch_size=64,
                                         max_images=64)


def test_probe_fold_hygiene_and_determinism(finished, setup, tmp_path):
    config, workdir, result = finished
    sets = sets_lib.tb_transfer_sets(DataSpec.from_config(config))
    for protocol in protocols.TB_PROTOCOLS:
        splits = protocols.check_protocol(protocols.parse_protocol(protocol), sets, need_validation=True)
        for split in splits:
            if split.train_set == split.test_set:
                assert not set(split.train) & set(split.test)
            assert set(split.validation) <= set(split.train) and not set(split.validation) & set(split.fit)
        if protocol.startswith("cv_"):
            tested = np.concatenate([s.test for s in splits])
            assert sorted(tested) == list(range(len(sets[splits[0].train_set])))
    # Same config, same result (features from the cache): the probe's numbers are identical.
    again = run.run(transfer_config(setup[0], setup[1], config.feature_cache_dir, methods="probe"), str(tmp_path))
    for protocol in protocols.TB_PROTOCOLS:
        assert again["cells"]["metachexnet/probe"][protocol] == result["cells"]["metachexnet/probe"][protocol]
    assert all("(hit)" in k for k in again["timings"] if k.startswith("features") and k.endswith(" s"))


def test_feature_cache_is_keyed_on_content(finished, setup, tmp_path):
    config, _, _ = finished
    demo_dir, pre = setup
    sets = sets_lib.load_datasets(DataSpec.from_config(config), sets_lib.TB_DATASETS)
    start = load(str(pre), config)
    kwargs = dict(batch_size=32, cache_dir=config.feature_cache_dir)
    hit = features_lib.features_for(start, sets["montgomery"], **kwargs)
    assert hit["cache"] == "hit"
    # A copy of the checkpoint elsewhere: same content, same cache entry.
    moved = tmp_path / "moved"
    shutil.copytree(pre, moved)
    assert features_lib.features_for(load(str(moved), config), sets["montgomery"],
                                     **kwargs)["cache"] == "hit"
    # Changed weights: a new entry, whose features differ.
    other = load("random", config, 1)  # seed 0 was extracted by the run
    miss = features_lib.features_for(other, sets["montgomery"], **kwargs)
    assert miss["cache"] == "miss" and not np.allclose(miss["features"], hit["features"])
    assert features_lib.features_for(other, sets["montgomery"], **kwargs)["cache"] == "hit"
    # A changed dataset build (another fold seed -> other records): a new entry.
    reseeded = transfer_config(demo_dir, pre, config.feature_cache_dir, **{"data.fold_seed": 1})
    changed = sets_lib.load_datasets(DataSpec.from_config(reseeded), ("montgomery",))["montgomery"]
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
        load(str(empty), config)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pre, corrupt)
    for root, _, names in os.walk(corrupt / "checkpoints"):
        for name in names:
            if "state" in root:
                (open(os.path.join(root, name), "wb")).write(b"garbage")
    with pytest.raises(weights.StartingWeightsError, match=f"{corrupt}.*could not be read"):
        load(str(corrupt), config)
    with pytest.raises(weights.StartingWeightsError, match="does not exist"):
        load(str(tmp_path / "nowhere"), config)
    # A dataset not yet prepared (real-data config, empty data_dir).
    unprepared = transfer_config(demo_dir, pre, tmp_path, demo=False, **{"data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(FileNotFoundError, match=r"(?s)montgomery/r36_k3_seed0, shenzhen/r36_k3_seed0 not found.*"
                       r"python -m metachex_jax.prepare --dataset=montgomery .* --num_folds=3 --seed=0.*"
                       r"python -m metachex_jax.prepare --dataset=shenzhen "):
        run.run(unprepared, str(tmp_path / "b"))
    # random_bn without the ChestX-ray14 build it takes its BatchNorm statistics from (TB sets prepared).
    _, tb_data_dir = nih_datasets.resolve_demo(DataSpec.from_config(config))
    no_nih = transfer_config(demo_dir, pre, tmp_path, demo=False, methods="probe",
                             **{"data.data_dir": tb_data_dir, "data.val_fraction": 0.3})
    with pytest.raises(FileNotFoundError, match=r"(?s)'random_bn' take their BatchNorm statistics from the "
                       r"ChestX-ray14 training images.*chestxray14/r36_val0p3_seed0 not found"):
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
            assert len(reports.read_predictions_csv(csv_url)["label"]) == saved["cells"][key][protocol]["n_images"]
    cached = sorted(os.listdir(fake_gcs.local(fake_gcs.url + "/cache")))
    assert len(cached) == 6 and all(name.endswith(".npz") for name in cached)  # 3 starts x 2 sets
    again = run.run(config, fake_gcs.url + "/tb2")  # read back from the gs:// cache
    assert all("(hit)" in k for k in again["timings"] if k.startswith("features") and k.endswith(" s"))
    assert again["cells"] == result["cells"]


def test_init_from_is_required_unless_baselines_only(finished, setup, tmp_path):
    config, _, result = finished
    demo_dir, _ = setup
    with pytest.raises(ValueError, match=r"config.init_from is empty.*baselines_only=True"):
        groups.group_specs(transfer_config(demo_dir, "", config.feature_cache_dir))
    with pytest.raises(ValueError, match="baselines_only=True but config.init_from"):
        groups.group_specs(transfer_config(demo_dir, "/some/run", "", baselines_only=True))
    baselines = transfer_config(demo_dir, "", config.feature_cache_dir, baselines_only=True, methods="probe",
                                compare_with="random")
    assert groups.group_specs(baselines) == [groups.GroupSpec("", ("random",))]
    out = run.run(baselines, str(tmp_path))
    assert set(out["cells"]) == {"random/probe"}
    assert out["cells"]["random/probe"] == result["cells"]["random/probe"]


def test_probe_at_its_iteration_limit_is_flagged_in_log_and_report(finished, setup, tmp_path, caplog):
    config, _, _ = finished
    demo_dir, pre = setup
    capped = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="probe", compare_with="",
                             protocols="cv_montgomery", **{"probe.max_iter": 1})
    with caplog.at_level("WARNING"):
        out = run.run(capped, str(tmp_path))
    assert out["details"]["metachexnet/probe"]["cv_montgomery"]["converged"] == [False] * 3
    assert len(out["notes"]) == 3 and all("stopped at probe.max_iter=1" in n for n in out["notes"])
    assert sum("stopped at probe.max_iter=1" in r.getMessage() for r in caplog.records) == 3
    assert "stopped at probe.max_iter=1" in (tmp_path / "report" / "comparison.md").read_text()


def finetune_pieces(setup, **overrides):
    demo_dir, pre = setup
    config = transfer_config(demo_dir, pre, "", **overrides)
    sets = sets_lib.tb_transfer_sets(DataSpec.from_config(config))
    return config, sets, Finetuner(config.finetune, seed=0)


@pytest.fixture(scope="module")
def tuning(setup):
    """The test config's TB sets and Finetuner (its steps compiled once for the tests that share it)."""
    return finetune_pieces(setup)


def test_finetuned_model_predicts_with_batchnorm_statistics_of_the_fit_images(tuning):
    """Fails on the old behaviour (evaluation with the running averages training leaves behind)."""
    config, sets, tuner = tuning
    start = load("random", config)
    split = protocols.check_protocol("cv_montgomery", sets, need_validation=True)[0]
    out = tuner.run(start, split, sets)
    fit = RecordSubset(sets["montgomery"].source, split.fit)
    graphdef, _ = train_steps.create(TbClassifier(nnx.clone(start.model.backbone), nnx.Rngs(0)), tuner.tx)
    model = nnx.merge(graphdef, out.state.params, out.state.batch_stats)
    # Independently: the stem's BatchNorm holds the average over the fit images' full batches (of the training
    # batch size) of conv0's batch mean and variance, for the fine-tuned conv0.
    means, variances = [], []
    with pipeline.eval_batches(fit, kind="binary", global_batch_size=8, image_size=RES) as batches:
        for batch, _ in zip(batches, range(len(fit) // 8)):
            y = np.asarray(model.backbone.conv0(to_model_input(jnp.asarray(batch["image"]))), np.float64)
            means.append(y.mean((0, 1, 2)))
            variances.append(y.var((0, 1, 2)))
    assert out.bn_images == {"validation": 8 * (len(fit) // 8), "test": 8 * (len(fit) // 8)}
    np.testing.assert_allclose(model.backbone.norm0.mean[...], np.mean(means, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.backbone.norm0.var[...], np.mean(variances, 0), rtol=1e-3, atol=1e-6)
    # And the test predictions are this model's, in eval mode.
    model.eval()
    test = RecordSubset(sets["montgomery"].source, split.test)
    with pipeline.eval_batches(test, kind="binary", global_batch_size=len(test), image_size=RES) as batches:
        expected = np.asarray(jax.nn.sigmoid(model(to_model_input(jnp.asarray(next(iter(batches))["image"])))))
    np.testing.assert_allclose(out.test_prob, expected[:len(test)], rtol=1e-5, atol=1e-6)


def test_random_bn_fine_tunes_to_exactly_random(tuning):
    """random_bn differs from random in its BatchNorm statistics only; with the statistics recomputed before
    every prediction, fine-tuning both gives identical predictions (before: the stale running statistics made
    them differ), which is why random_bn stays a probe-only baseline."""
    config, sets, tuner = tuning
    random = load("random", config)
    random_bn = load("random_bn", config)
    features_lib.calibrate_batchnorm(random_bn.model, sets["shenzhen"].source, kind="binary", contract=contract_of(config),
                                     batch_size=8, max_images=32)
    assert not np.allclose(random_bn.model.backbone.norm0.var[...], random.model.backbone.norm0.var[...])
    for protocol in ("cv_montgomery", "montgomery_to_shenzhen"):
        split = protocols.check_protocol(protocol, sets, need_validation=True)[0]
        a, b = tuner.run(random, split, sets), tuner.run(random_bn, split, sets)
        np.testing.assert_array_equal(a.test_prob, b.test_prob)
        np.testing.assert_array_equal(a.val_prob, b.val_prob)
        assert a.val_auroc == b.val_auroc


def adapted_predictions(graphdef, state, subset, config, batch_size=8):
    """The model of `state` with its BatchNorm statistics recomputed on `subset`'s own images, predicting them."""
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    features_lib.calibrate_batchnorm(model.backbone, subset, kind="binary", contract=contract_of(config),
                                     batch_size=batch_size, max_images=len(subset))
    model.eval()
    with pipeline.eval_batches(subset, kind="binary", global_batch_size=len(subset), image_size=RES) as batches:
        images = jnp.asarray(next(iter(batches))["image"])
    return np.asarray(jax.nn.sigmoid(model(to_model_input(images))))[:len(subset)]


def test_bn_stats_target_adapts_to_the_test_set_across_datasets_only(setup, tuning):
    config, sets, fit_tuner = tuning
    _, _, target_tuner = finetune_pieces(setup, **{"finetune.bn_stats": "target"})
    start = load("random", config)
    cross = protocols.check_protocol("montgomery_to_shenzhen", sets, need_validation=True)[0]
    on_fit, on_target = fit_tuner.run(start, cross, sets), target_tuner.run(start, cross, sets)
    assert (on_fit.test_bn_stats, on_target.test_bn_stats) == ("fit", "target")
    assert on_fit.val_auroc == on_target.val_auroc  # early stopping: the fit images' statistics either way
    assert not np.allclose(on_fit.test_prob, on_target.test_prob)
    n_val = len(cross.validation)
    assert on_target.bn_images == {"validation": 8 * (n_val // 8) if n_val >= 8 else n_val,
                                   "test": 8 * (len(sets["shenzhen"]) // 8)}
    # The adapted predictions are the kept weights' with statistics recomputed on the unlabelled test images.
    graphdef, _ = train_steps.create(TbClassifier(nnx.clone(start.model.backbone), nnx.Rngs(0)), fit_tuner.tx)
    test = RecordSubset(sets["shenzhen"].source, cross.test)
    np.testing.assert_allclose(on_target.test_prob, adapted_predictions(graphdef, on_target.state, test, config),
                               rtol=1e-5, atol=1e-6)
    # The thresholds' validation predictions are made as the test predictions are (before: with the fit images'
    # statistics, so thresholds were chosen on one normalisation and applied to another).
    validation = RecordSubset(sets["montgomery"].source, cross.validation)
    np.testing.assert_allclose(on_target.val_prob, adapted_predictions(graphdef, on_target.state, validation, config),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(on_target.val_prob, on_fit.val_prob)
    # A part smaller than one batch (finetune.batch_size 8) gives its statistics from one batch of all its images.
    few = RecordSubset(sets["montgomery"].source, cross.validation[:5])
    kept = jax.device_put(on_target.state, target_tuner.replicated)
    adapted, used = target_tuner.with_precise_batchnorm(graphdef, kept, few, contract_of(config))
    assert used == 5
    adapted_model, kept_model = (nnx.merge(graphdef, x.params, x.batch_stats) for x in (adapted, on_target.state))
    with pipeline.eval_batches(few, kind="binary", global_batch_size=5, image_size=RES) as batches:
        stem = np.asarray(kept_model.backbone.conv0(to_model_input(jnp.asarray(next(iter(batches))["image"]))))
    np.testing.assert_allclose(adapted_model.backbone.norm0.mean[...], stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Within a dataset the option changes nothing.
    within = protocols.check_protocol(protocols.parse_protocol("cv_montgomery"), sets, need_validation=True)[0]
    a, b = fit_tuner.run(start, within, sets), target_tuner.run(start, within, sets)
    np.testing.assert_array_equal(a.test_prob, b.test_prob)
    np.testing.assert_array_equal(a.val_prob, b.val_prob)
    with pytest.raises(ValueError, match="finetune.bn_stats must be one of"):
        finetune_pieces(setup, **{"finetune.bn_stats": "test"})


def test_finetuning_learning_rates_as_written_or_reported(setup, tuning):
    config, _, tuner = tuning
    assert tuner.effective_lr == {"backbone": config.finetune.backbone_lr, "tb_head": config.finetune.head_lr}
    _, _, scaled = finetune_pieces(setup, **{"finetune.optim.lr_scaling": "sqrt", "finetune.batch_size": 32})
    assert scaled.effective_lr == pytest.approx({"backbone": 1e-4 * 2 ** 0.5, "tb_head": 1e-3 * 2 ** 0.5})


def test_flagged_readings_reach_the_transfer_report(tmp_path):
    """A normal image whose reading names TB is built, flagged in the skip report, and listed by the report."""
    tree = make_tb_tree(tmp_path / "raw", "montgomery", n_normal=9, n_tb=6)
    normal_id = sorted(i for i in tree.values if i.endswith("_0"))[0]
    text = "calcified granuloma; old healed TB"
    tree.write_reading(normal_id, f"Patient's Sex: F \nPatient's Age: 027Y\n{text}\n")
    config = transfer.get_config(f"arch={ARCH},res={RES}")
    config.data.update(manual_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "tfds"), num_folds=3)
    montgomery = sets_lib.load_datasets(DataSpec.from_config(config), ("montgomery",))["montgomery"]
    assert montgomery.flagged_readings == {normal_id: text}
    result = {"protocols": [], "protocol_targets": {}, "cells": {}, "screening": dict(config.screening), "calibration_bins": 10,
              "timings": {}, "datasets": {"montgomery": {"flagged_readings": montgomery.flagged_readings}}}
    md = report_lib.markdown(result)
    assert "## Flagged readings" in md and f"| montgomery | {normal_id} | {text} |" in md


def test_any_dataset_and_several_targets_on_the_demo_hospital(finished, setup, tmp_path):
    """The demo's hospital CSV: CV within it and train on both TB sets / test on it, for TB and Cardiomegaly (which
    the TB sets lack: that protocol is skipped for it, with a note); metrics vs scikit-learn, folds by patient."""
    config, _, _ = finished
    demo_dir, pre = setup
    c = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="probe+finetune", compare_with="random",
                        protocols="cv_csv,shenzhen+montgomery_to_csv", targets="Tuberculosis,Cardiomegaly",
                        **{"data.csv.num_folds": 3, "deploy.protocol": "cv_csv.cardiomegaly"})
    result = run.run(c, str(tmp_path))
    assert result["protocols"] == ["cv_csv.tuberculosis", "shenzhen+montgomery_to_csv.tuberculosis",
                                   "cv_csv.cardiomegaly"]
    assert result["protocol_targets"]["cv_csv.cardiomegaly"] == "Cardiomegaly"
    assert any("shenzhen+montgomery_to_csv is not run for Cardiomegaly: shenzhen, montgomery has no Cardiomegaly"
               in note for note in result["notes"])
    records = sets_lib.load_datasets(DataSpec.from_config(c), ("shenzhen", "montgomery", "csv"))
    hospital = records["csv"]
    for protocol, cells in ((p, {k: v[p] for k, v in result["cells"].items()}) for p in result["protocols"]):
        target = result["protocol_targets"][protocol]
        known = hospital.labels[:, hospital.column(target)] >= 0
        for key, cell in cells.items():
            cols = reports.read_predictions_csv(tmp_path / "report" / "predictions" /
                                                f"{key.replace('/', '_')}_{protocol}.csv")
            assert cell["auroc"]["value"] == pytest.approx(roc_auc_score(cols["label"], cols["prob"]), abs=1e-12)
            assert set(cols["dataset"]) == {"csv"} and cell["n_patients"] < cell["n_images"]  # patients resampled
            if key.endswith("probe"):  # every hospital image with a known label tested once
                assert sorted(cols["image_id"]) == sorted(np.array(hospital.image_id)[known])
    # Cross-validation folds are folds of patients: no patient on both sides of any split.
    for target in ("Tuberculosis", "Cardiomegaly"):
        view = sets_lib.transfer_set(records, ("csv",), target, num_folds=3, fold_seed=0)
        for split in protocols.check_protocol(protocols.parse_protocol("cv_csv"), {"csv": view}, True):
            assert not set(view.patient[split.train]) & set(view.patient[split.test])
    # Patients with several images: the paired test is the clustered one, on the pair's common images.
    for protocol in ("cv_csv.tuberculosis", "cv_csv.cardiomegaly"):
        for comparison in result["paired"][protocol]:
            assert comparison["test"]["method"] == "clustered"
            assert comparison["n_patients"] < comparison["n_images"]
        first = result["paired"][protocol][0]
        assert (first["a"], first["b"]) == ("metachexnet/probe", "random/probe")
        a, b = (reports.read_predictions_csv(tmp_path / "report" / "predictions" /
                                             f"{key.replace('/', '_')}_{protocol}.csv") for key in ("metachexnet_probe",
                                                                                                    "random_probe"))
        assert list(a["image_id"]) == list(b["image_id"])
        expected = metrics.clustered_auc_test(a["label"], a["prob"], b["prob"], a["patient"])
        assert first["test"]["p_value"] == pytest.approx(expected["p_value"], rel=1e-9, abs=1e-15)
    both = sets_lib.transfer_set(records, ("shenzhen", "montgomery"), "Tuberculosis", num_folds=3, fold_seed=0)
    assert len(both) == len(records["shenzhen"]) + len(records["montgomery"])
    assert "# Transfer comparison: Tuberculosis, Cardiomegaly" in (tmp_path / "report" / "comparison.md").read_text()
    deployed_cardiomegaly_model_has_one_output_name(tmp_path, demo_dir)


def deployed_cardiomegaly_model_has_one_output_name(workdir, demo_dir):
    """The deployed model of a target other than TB: "Cardiomegaly" on its card, as the classifier's output, in
    predict's CSV and heatmap files (Grad-CAM died with KeyError on main), in its export, and for a card written
    before the name was recorded in model_config."""

    card = json.loads((workdir / "model" / "model.json").read_text())
    assert [o["name"] for o in card["outputs"]] == ["Cardiomegaly"] and card["training"]["target"] == "Cardiomegaly"
    model, _ = saved_models.load(str(workdir / "model"))
    assert model.output_kinds() == {"Cardiomegaly": "probability"}
    (raw,) = list(demo_dir.glob("*/raw"))
    images = sorted(str(p) for p in (raw / "Hospital").rglob("*.png"))[:3]
    assert predict.main([f"--model={workdir}", *images, "--heatmaps=all", f"--out={workdir}/p"]) == 0
    rows = csv_rows(workdir / "p" / "predictions.csv")
    assert [k for k in rows[0] if k.startswith(("Cardiomegaly", "tb"))] == ["Cardiomegaly", "Cardiomegaly_decision"]
    maps = sorted((workdir / "p" / "heatmaps").rglob("*.npy"))
    assert [m.name for m in maps] == ["Cardiomegaly.npy"] * 3
    # At the final layer a linear head makes Grad-CAM closed-form: ReLU(A . w) / (h w), upsampled.
    first = next(m for m in maps if m.parent.name == os.path.basename(images[0]))
    predictor = Predictor.load(str(workdir))
    crop, _ = predictor.contract.from_file(images[0])
    activation = np.asarray(model.backbone.feature_map(predictor.contract.model_input(jnp.asarray(crop[None]))))
    w = np.asarray(model.tb_head.kernel[...])[:, 0]
    cam = np.maximum(activation @ w / (activation.shape[1] * activation.shape[2]), 0)
    expected = np.asarray(jax.image.resize(cam, (1, RES, RES), "linear"))[0]
    np.testing.assert_allclose(np.load(first), expected, rtol=1e-4, atol=1e-7)
    exported = export.export(str(workdir), str(workdir / "exported"), platforms=("cpu",))
    from_export = Predictor.load(exported).predict_files(images)
    assert [o.name for o in from_export.outputs] == ["Cardiomegaly"]
    np.testing.assert_allclose(from_export.column("Cardiomegaly"), [float(r["Cardiomegaly"]) for r in rows],
                               atol=1e-5)
    del card["model_config"]["output_name"]  # a card written before it was recorded: the card's output names it
    shutil.copytree(workdir / "model", workdir / "old_model")
    (workdir / "old_model" / "model.json").write_text(json.dumps(card))
    old = Predictor.load(str(workdir / "old_model"))
    assert old.output_names == ["Cardiomegaly"]
    np.testing.assert_allclose(old.gradcam(crop[None], ["Cardiomegaly"])["Cardiomegaly"][0], expected, rtol=1e-4,
                               atol=1e-7)


# --- the deployable TB model (transfer/deploy.py) -----------------------------------------------------------

def test_deployable_model_threshold_training_and_predict_round_trip(finished, setup, tmp_path):
    """The run's WORKDIR/model/: fine-tuned on all of Shenzhen for the CV's median best epoch, threshold at 90%
    out-of-fold sensitivity; `predict --model=WORKDIR` on the raw files equals the model on the prepared records,
    and the exported model equals both."""

    config, workdir, result = finished
    demo_dir, _ = setup
    card = json.loads((workdir / "model" / "model.json").read_text())
    assert card["kind"] == "tb_classifier" and card["training"]["method"] == "finetune"
    assert card["training"]["dataset"] == "shenzhen" and card["training"]["n_images"] == DEMO["num_shenzhen"]
    best = result["details"]["metachexnet/finetune"]["cv_shenzhen"]["best_epoch"]
    assert card["training"]["epochs"] == int(np.ceil(np.median(best)))
    oof = reports.read_predictions_csv(workdir / "report" / "predictions" / "metachexnet_finetune_cv_shenzhen.csv")
    threshold = metrics.threshold_at_sensitivity(oof["label"], oof["prob"], 0.9)
    (output,) = card["outputs"]
    assert (output["name"], output["kind"], output["threshold"]) == ("tb", "probability", pytest.approx(threshold))
    assert np.mean(oof["prob"][oof["label"] == 1] >= threshold) >= 0.9
    assert card["metrics"]["cv_shenzhen"]["auroc"] == pytest.approx(
        result["cells"]["metachexnet/finetune"]["cv_shenzhen"]["auroc"])
    assert result["deployed_model"]["path"] == str(workdir / "model")

    (raw,) = list(demo_dir.glob("*/raw"))
    images = sorted((raw / "MontgomerySet" / "CXR_png").glob("*.png"))
    assert predict.main([f"--model={workdir}", *map(str, images), f"--out={tmp_path}/p"]) == 0
    rows = {os.path.basename(r["path"])[:-4]: r for r in csv_rows(tmp_path / "p" / "predictions.csv")}
    assert all(r["tb_decision"] == str(int(float(r["tb"]) >= threshold)) for r in rows.values())
    model, _ = saved_models.load(str(workdir / "model"))
    montgomery = sets_lib.tb_transfer_sets(DataSpec.from_config(config), ("montgomery",))["montgomery"]
    with pipeline.eval_batches(montgomery.source, kind="binary", global_batch_size=8, image_size=RES) as batches:
        for batch in batches:
            probs = np.asarray(jax.nn.sigmoid(model(to_model_input(jnp.asarray(batch["image"])))))
            for i, p in zip(batch["index"], probs):
                if i >= 0:
                    assert abs(float(rows[montgomery.image_id[i]]["tb"]) - p) < 1e-5
    exported = export.export(str(workdir), str(tmp_path / "exported"))
    from_export = Predictor.load(exported).predict_files([str(p) for p in images[:5]])
    np.testing.assert_allclose(from_export.column("tb"), [float(rows[p.stem]["tb"]) for p in images[:5]], atol=1e-5)
    assert from_export.outputs[0].threshold == pytest.approx(threshold)


def csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_deployed_probe_is_the_refitted_probe_folded_into_a_head(finished, setup, tmp_path):
    """methods=probe deploys the probe refitted on every training image: the folded head on the frozen backbone's
    features gives exactly the probe's own probabilities."""
    config, _, _ = finished
    demo_dir, pre = setup
    probe_config = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="probe", compare_with="",
                                   protocols="cv_montgomery", **{"deploy.threshold_rule": "youden"})
    out = run.run(probe_config, str(tmp_path))
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["training"]["method"] == "probe" and card["threshold_rule"]["rule"] == "youden"
    montgomery = sets_lib.load_datasets(DataSpec.from_config(probe_config), ("montgomery",))["montgomery"]
    start = load(str(pre), probe_config)
    table = features_lib.features_for(start, montgomery, batch_size=16, cache_dir=probe_config.feature_cache_dir)
    fit = fit_probe(table["features"], montgomery.labels[:, 0], table["features"],
                    ProbeSettings.from_config(probe_config.probe, probe_config.seed), groups=montgomery.patient)
    assert card["training"]["l2"] == fit.l2
    model, _ = saved_models.load(str(tmp_path / "model"))
    folded = np.asarray(jax.nn.sigmoid(model.output_scores(jnp.asarray(table["features"]))["tb"]))
    np.testing.assert_allclose(folded, fit.test_prob, rtol=1e-4, atol=1e-6)
    assert out["deployed_model"]["threshold_rule"]["rule"] == "youden"


def test_deploy_settings_are_checked_before_any_work(finished, setup, tmp_path):
    config, _, _ = finished
    demo_dir, pre = setup
    bad = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="probe",
                          protocols="shenzhen_to_montgomery",
                          **{"deploy.start": "imagenet", "deploy.method": "finetune", "deploy.threshold_rule": "x"})
    with pytest.raises(ValueError) as error:
        run.run(bad, str(tmp_path / "a"))
    message = str(error.value)
    for part in ("deploy.start='imagenet' is not among", "deploy.method='finetune' is not among",
                 "deploy.threshold_rule='x'", "its threshold and (fine-tuning) epoch count come from cv_shenzhen"
                                              " for Tuberculosis"):
        assert part in message, part
    assert not (tmp_path / "a").exists()
    none = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="probe", compare_with="",
                           protocols="cv_montgomery", **{"deploy.start": "none"})
    assert run.run(none, str(tmp_path / "b"))["deployed_model"] is None and not (tmp_path / "b" / "model").exists()


def test_a_converted_torchxrayvision_model_is_a_start_fed_its_own_pixels(setup, tmp_path):
    """compare_with=random,<a convert_torchxrayvision output>: recognised by what the directory holds (model.json),
    probed and fine-tuned like any start, through its own pixel contract (1 channel, [-1024, 1024], resize)."""
    from test_resize import exact_area_average
    from test_xrv import calibrated_densenet, xrv_input, xrv_state_dict

    import torch_files
    from metachex_jax.imaging.geometry import as_gray_2d
    from metachex_jax.interop import torchxrayvision

    demo_dir, pre = setup
    reference = calibrated_densenet(ARCH)
    torch_files.write_module(tmp_path / "nih.pt", xrv_state_dict(reference), "legacy")
    xrv_dir = tmp_path / "xrv-nih"
    torchxrayvision.convert_to_directory(str(tmp_path / "nih.pt"), str(xrv_dir), "densenet121-res224-nih",
                                                 arch=ARCH)
    # On the builds of this run's geometry (resize_crop: whole images resized) the crop_resize start would not see
    # the pixels predict gives it: refused before any work, with the run and the builds that feed it.
    mixed = transfer_config(demo_dir, pre, tmp_path / "cache", compare_with=f"random,{xrv_dir}",
                            methods="probe+finetune", protocols="cv_montgomery", **{"deploy.start": "xrv_nih"})
    with pytest.raises(ConfigError) as refused:
        run.run(mixed, str(tmp_path / "refused"))
    message = str(refused.value)
    assert "starting weights 'xrv_nih' take crop_resize pixels" in message and "metachexnet" not in message
    assert "--config.model.geometry=crop_resize" in message and "--dataset=montgomery" in message
    assert "--geometry=crop_resize" in message and not (tmp_path / "refused").exists()
    config = transfer_config(demo_dir, "", tmp_path / "cache", compare_with=f"random,{xrv_dir}",
                             methods="probe+finetune", protocols="cv_montgomery",
                             **{"baselines_only": True, "model.geometry": "crop_resize", "deploy.start": "xrv_nih"})
    result = run.run(config, str(tmp_path / "tb"))
    assert set(result["cells"]) == {f"{s}/{m}" for s in ("random", "xrv_nih") for m in ("probe", "finetune")}
    assert result["cells"]["xrv_nih/finetune"]["cv_montgomery"]["n_images"] > 0
    info = result["starts"]["xrv_nih"]
    assert info["kind"] == "torchxrayvision" and info["weights_name"] == "densenet121-res224-nih"
    assert "[-1024, 1024]" in info["input"] and "ImageNet" in result["starts"]["random"]["input"]

    # The start's features are the converted backbone's, on its own pixels: each TB record (R x R, the centre
    # square of its image: the run's builds are crop_resize ones) resized to S and scaled to [-1024, 1024].
    start = load(str(xrv_dir), config)
    assert start.contract == PixelContract(RES, config.data.resolution, "xrv", "crop_resize")
    assert start.model.backbone.in_channels == 1
    montgomery = sets_lib.load_datasets(DataSpec.from_config(config), ("montgomery",))["montgomery"]
    assert montgomery.build_dir.parent.parent.name.endswith("_square")
    table = features_lib.features_for(start, montgomery, batch_size=16, cache_dir=config.feature_cache_dir)
    assert table["cache"] == "hit"  # the run extracted the same features
    records = [as_gray_2d(montgomery.source[i]["image"]) for i in range(3)]
    crops = np.stack([exact_area_average(r, RES, RES) for r in records]).astype(np.uint8)  # the one resize, brute force
    expected = np.asarray(reference.features(jnp.asarray(xrv_input(crops))))
    np.testing.assert_allclose(table["features"][:3], expected, rtol=1e-4, atol=1e-5)

    # Deployed from that start, the TB model keeps its contract: predict feeds it 1-channel [-1024, 1024] pixels.

    card = json.loads((tmp_path / "tb" / "model" / "model.json").read_text())
    assert card["training"]["start"] == "xrv_nih" and card["input"]["normalization"] == "xrv"
    predictor = Predictor.load(str(tmp_path / "tb"))
    model, _ = saved_models.load(str(tmp_path / "tb" / "model"))
    assert predictor.contract == start.contract and model.backbone.in_channels == 1
    expected = np.asarray(jax.nn.sigmoid(model(jnp.asarray(xrv_input(crops)))))
    np.testing.assert_allclose(predictor(crops)["tb"], expected, rtol=1e-5, atol=1e-6)


# --- a dataset's own fixed split (split_<dataset>) --------------------------------------------------------------

def test_fixed_split_protocol_fits_on_train_chooses_on_validation_reports_on_test(finished, setup, tmp_path):
    """split_tbx11k for two targets on a tiny TBX11K (tests/dataset_trees.py): every cell reports on the build's
    test split (TBX11K's original val set) only; the probe's strength is the one chosen on the validation split
    (recomputed here, and compared with scikit-learn in test_transfer_probe.py); the deployed fine-tuned model is
    the comparison's own best-epoch model (its test predictions reproduced), its threshold chosen on validation."""
    config, _, _ = finished
    demo_dir, pre = setup
    tree = make_tbx11k_tree(tmp_path / "raw")
    c = transfer_config(demo_dir, pre, config.feature_cache_dir, methods="probe+finetune", compare_with="",
                        protocols="split_tbx11k", targets="Tuberculosis,Active TB",
                        **{"data.tbx11k.manual_dir": str(tree.root.parent)})
    workdir = tmp_path / "w"
    result = run.run(c, str(workdir))
    assert result["protocols"] == ["split_tbx11k.tuberculosis", "split_tbx11k.active_tb"]
    all_records = sets_lib.load_datasets(DataSpec.from_config(c), ("tbx11k",))
    records = all_records["tbx11k"]
    start = load(str(pre), c)
    features = features_lib.features_for(start, records, batch_size=16, cache_dir=c.feature_cache_dir)["features"]
    settings = ProbeSettings.from_config(c.probe, c.seed)
    for protocol, target in result["protocol_targets"].items():
        view = sets_lib.transfer_set(all_records, ("tbx11k",), target, num_folds=3, fold_seed=0)
        test = np.flatnonzero(view.split == "test")
        assert sorted(np.array(view.image_id)[test]) == sorted(n for n in tree.val if n not in tree.duplicates)
        train = np.flatnonzero(view.split != "test")
        validation = view.split[train] == "validation"
        fit = fit_probe(features[view.parts[0][1]][train], view.y[train], features[view.parts[0][1]][test],
                        settings, groups=view.patient[train], validation=validation)
        assert result["details"]["metachexnet/probe"][protocol]["l2"] == [fit.l2]
        for key in ("metachexnet/probe", "metachexnet/finetune"):
            cols = reports.read_predictions_csv(workdir / "report" / "predictions" /
                                                f"{key.replace('/', '_')}_{protocol}.csv")
            assert list(cols["image_id"]) == [view.image_id[i] for i in test]
            assert result["cells"][key][protocol]["auroc"]["value"] == pytest.approx(
                roc_auc_score(cols["label"], cols["prob"]), abs=1e-12)
            if key.endswith("probe"):
                np.testing.assert_allclose(cols["prob"], fit.test_prob, rtol=1e-6, atol=1e-9)
    card = json.loads((workdir / "model" / "model.json").read_text())
    assert card["training"]["protocol"] == "split_tbx11k.tuberculosis"
    view = sets_lib.transfer_set(all_records, ("tbx11k",), "Tuberculosis", num_folds=3, fold_seed=0)
    assert card["training"]["n_images"] == int(np.sum(view.split == "train"))
    assert card["training"]["epochs"] == result["details"]["metachexnet/finetune"][
        "split_tbx11k.tuberculosis"]["best_epoch"][0]
    assert "validation predictions" in card["threshold_rule"]["chosen_on"]
    model, _ = saved_models.load(str(workdir / "model"))
    cols = reports.read_predictions_csv(workdir / "report" / "predictions" /
                                        "metachexnet_finetune_split_tbx11k.tuberculosis.csv")
    test = RecordSubset(view.source, np.flatnonzero(view.split == "test"))
    with pipeline.eval_batches(test, kind="binary", global_batch_size=8, image_size=RES) as batches:
        probs = {int(i): float(p) for batch in batches for i, p in zip(
            batch["index"], np.asarray(jax.nn.sigmoid(model(to_model_input(jnp.asarray(batch["image"])))))) if i >= 0}
    np.testing.assert_allclose([probs[i] for i in range(len(test))], cols["prob"], atol=1e-5)


def test_platt_calibration_is_nested_and_the_deployed_model_carries_a_calibrator_and_ood_description(
        finished, setup, tmp_path):
    """Report: each split's Platt calibrator is fitted on that split's training-side scores (the probe's inner
    out-of-fold predictions) and applied to its held-out images only; the decisions are the same on both scales.
    Deployed model: its calibrator is Platt on the out-of-fold predictions, `predict --calibrated` applies it; its
    OOD description is its features of every Shenzhen image with the threshold from out-of-fold distances
    (checked against scikit-learn's Ledoit-Wolf on the raw files' features)."""


    config, workdir, result = finished
    demo_dir, pre = setup
    out = workdir / "report"
    assert (out / "reliability_platt_cv_shenzhen.png").is_file()
    assert "ECE after Platt" in (out / "comparison.md").read_text()
    cell = result["cells"]["metachexnet/probe"]["cv_shenzhen"]
    assert set(cell["calibration_platt"]) == {"brier", "ece", "reliability"}

    sets = sets_lib.tb_transfer_sets(DataSpec.from_config(config))
    shenzhen = sets["shenzhen"]
    splits = protocols.check_protocol(protocols.parse_protocol("cv_shenzhen"), sets, need_validation=True)
    start = load(str(pre), config)
    records = sets_lib.load_datasets(DataSpec.from_config(config), ("shenzhen",))
    features = sets_lib.features_of({"shenzhen": features_lib.features_for(
        start, records["shenzhen"], batch_size=16, cache_dir=config.feature_cache_dir)}, shenzhen)
    cols = reports.read_predictions_csv(out / "predictions" / "metachexnet_probe_cv_shenzhen.csv")
    stored = result["details"]["metachexnet/probe"]["cv_shenzhen"]["thresholds"]
    settings = ProbeSettings.from_config(config.probe, config.seed)
    for split, learned in zip(splits, stored):
        y_train = shenzhen.y[split.train]
        fit = fit_probe(features[split.train], y_train, features[split.test], settings,
                        groups=shenzhen.patient[split.train])
        platt = fit_platt(y_train, fit.train_oof_prob)
        assert (learned["platt"]["a"], learned["platt"]["b"]) == pytest.approx((platt.a, platt.b))
        assert learned["platt"]["n"] == len(split.train)  # the training part only
        rows = cols["fold"] == split.fold
        np.testing.assert_allclose(cols["prob_platt"][rows], platt(cols["prob"][rows]), rtol=1e-9)
        on_test = fit_platt(shenzhen.y[split.test], fit.test_prob)  # what fitting on the judged images gives
        assert abs(on_test.a - platt.a) > 1e-6
        for name in ("threshold", "threshold_sens", "threshold_spec"):
            np.testing.assert_array_equal(cols["prob"][rows] >= cols[name][rows],
                                          cols["prob_platt"][rows] >= platt(cols[name][rows]))

    card = json.loads((workdir / "model" / "model.json").read_text())
    oof = reports.read_predictions_csv(out / "predictions" / "metachexnet_finetune_cv_shenzhen.csv")
    deployed = PlattScaling.from_json(card["outputs"][0]["calibration"])
    expected = fit_platt(oof["label"], oof["prob"])
    assert (deployed.a, deployed.b, deployed.n) == (pytest.approx(expected.a), pytest.approx(expected.b), len(oof["prob"]))
    (raw,) = list(demo_dir.glob("*/raw"))
    images = [raw / "ChinaSet_AllFiles" / "CXR_png" / f"{i}.png" for i in shenzhen.image_id]
    assert predict.main([f"--model={workdir}", *map(str, images), f"--out={tmp_path}/p", "--calibrated"]) == 0
    rows = csv_rows(tmp_path / "p" / "predictions.csv")
    tb = np.array([float(r["tb"]) for r in rows])
    np.testing.assert_allclose([float(r["tb_calibrated"]) for r in rows], deployed(tb), rtol=1e-6)
    threshold = card["outputs"][0]["threshold"]
    assert [r["tb_decision"] for r in rows] == [str(int(p >= threshold)) for p in tb]

    assert card["ood"]["threshold_from"] == "out-of-fold distances (3 folds)"
    assert card["ood"]["reference_images"] == len(shenzhen) and (workdir / "model" / "ood.npz").is_file()
    with_features = Predictor.load(str(workdir)).predict_files(list(map(str, images)), features=True)
    brute = np.empty(len(images))
    for fold in np.unique(shenzhen.fold):
        held = shenzhen.fold == fold
        other = LedoitWolf().fit(with_features.features[~held].astype(np.float64))
        brute[held] = np.sqrt(other.mahalanobis(with_features.features[held].astype(np.float64)))
    k = min(int(np.ceil(config.deploy.ood_quantile * (len(images) + 1))), len(images))
    assert card["ood"]["threshold"] == pytest.approx(np.sort(brute)[k - 1], rel=1e-4)
    flags = np.array([int(r["ood_flag"]) for r in rows])
    np.testing.assert_array_equal(flags, with_features.ood_flags)
