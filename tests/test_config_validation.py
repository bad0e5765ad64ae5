"""Config validation (config_lib.validate, then the data preflight): every rule, the combinations that cannot work,
every problem in one message, and `python -m metachex_jax.main` exiting 2 without a traceback on user errors
(before any work)."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest
from absl.testing import flagsaver

import subprocesses
from metachex_jax import main
from metachex_jax.configs import chexnet, config_lib
from metachex_jax.configs import pretrain as pretrain_recipe
from metachex_jax.configs import transfer as transfer_recipe
from metachex_jax.core import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pretrain(arg="demo", **overrides):
    config = pretrain_recipe.get_config(arg)
    config.update_from_flattened_dict(overrides)
    return config


def transfer(arg="demo", **overrides):
    """A transfer config comparing the demo's baselines (no init_from, so no deployable model)."""
    config = transfer_recipe.get_config(arg)
    config.baselines_only = True
    config.update_from_flattened_dict(overrides)
    return config


def test_every_config_file_is_valid_as_shipped(tmp_path):
    init = f"init={tmp_path}"  # the transfer configs need the weights under study: any existing path passes here
    for config in (pretrain(), pretrain("runlocal,arch=densenet_tiny,res=32,demo"),
                   chexnet.get_config("demo"), transfer_recipe.get_config(f"demo,{init}"),
                   transfer_recipe.get_config(f"demo,methods=probe,{init}"),
                   transfer_recipe.get_config(f"demo,methods=finetune,{init}"), transfer()):
        main.check(config)  # neither a rule nor the data preflight finds a problem
    # Real-data configs are valid but for the data, which is not prepared here: the data preflight says so.
    for config in (pretrain("", **{"data.data_dir": str(tmp_path)}),
                   transfer("", **{"data.data_dir": str(tmp_path)})):
        assert config_lib.problems(config) == []
        with pytest.raises(errors.ConfigError) as found:
            main.check(config)
        [problem] = found.value.problems
        assert "not found in" in problem and "python -m metachex_jax.prepare" in problem


# (config, override, what the one problem must say); each rule of each section once.
PRETRAIN_CASES = [
    ({"trainer": "finetune"}, "--config.trainer='finetune': must be one of pretrain, transfer"),
    ({"model.arch": "densenet999"}, "--config.model.arch='densenet999': unknown architecture; choose one of"),
    ({"model.dtype": "float16"}, "--config.model.dtype='float16': must be one of float32, bfloat16"),
    ({"model.metadata_tasks": ["view_ap", "age"]}, "unknown ['age']; choose from view_ap, sex_male"),
    ({"model.age_hidden": -1}, "--config.model.age_hidden=-1: must be >= 0"),
    ({"model.age_std": 0.0}, "--config.model.age_std=0.0: must be > 0"),
    ({"model.num_pathologies": 15}, "--config.model.num_pathologies=15: must be one of 14"),
    ({"loss.weights.age": -1.0}, "--config.loss.weights.age=-1.0: must be >= 0"),
    ({"loss.class_weighting": "inverse"}, "--config.loss.class_weighting='inverse': must be one of none, chexnet"),
    ({"loss.age_loss": "l2"}, "--config.loss.age_loss='l2': must be one of l1, huber"),
    ({"loss.huber_delta": 0.0}, "--config.loss.huber_delta=0.0: must be > 0"),
    ({"data.datasets": "chestxray14,vindr"}, "--config.data.datasets='chestxray14,vindr': unknown vindr; "
                                             "pretraining takes chestxray14, chexpert, padchest, csv, mimic"),
    ({"data.mimic.views": "PA++AP"}, "--config.data.mimic.views='PA++AP': mimic: views='PA++AP': write frontal"),
    ({"data.mimic.labeler": "chexbert"}, "--config.data.mimic.labeler='chexbert': must be one of chexpert, negbio"),
    ({"data.tbx11k.extra_folders": "yes"}, "--config.data.tbx11k.extra_folders='yes': must be one of exclude, "
                                           "include"),
    ({"data.vindr.label_rule": "all"}, "--config.data.vindr.label_rule='all': must be one of majority, any"),
    ({"data.datasets": "chestxray14:0"}, "--config.data.datasets='chestxray14:0': must be name[:weight] entries"),
    ({"data.chexpert.uncertainty": "maybe"}, "--config.data.chexpert.uncertainty='maybe': uncertainty='maybe': "
                                             "unknown policy 'maybe'"),
    ({"data.padchest.views": "lateral"}, "--config.data.padchest.views='lateral': must be one of frontal, all"),
    ({"data.csv.num_folds": 1}, "--config.data.csv.num_folds=1: must be >= 2"),
    ({"data.csv.csv": "/no/such.csv"}, "--config.data.csv.csv='/no/such.csv': /no/such.csv does not exist"),
    ({"data.datasets": "chestxray14,csv", "demo": False},  # (the demo's csv dataset is its hospital)
     "--config.data.datasets='chestxray14,csv', --config.data.csv.csv='': a csv dataset needs its CSV file"),
    ({"num_steps": -1}, "--config.num_steps=-1: must be >= 0"),
    ({"optim.plateau_on": "accuracy"}, "--config.optim.plateau_on='accuracy': must be one of loss, mean_auroc"),
    ({"demo_data.num_hospital": -1}, "--config.demo_data.num_hospital=-1: must be >= 0"),
    ({"data.data_dir": " "}, "--config.data.data_dir=' ': must be a non-empty string"),
    ({"data.manual_dir": "/no/such/raw"}, "--config.data.manual_dir='/no/such/raw': /no/such/raw does not exist"),
    ({"data.resolution": 4}, "--config.data.resolution=4: must be >= 8"),
    ({"data.val_fraction": 1.0}, "--config.data.val_fraction=1.0: must be < 1"),
    ({"data.val_seed": -1}, "--config.data.val_seed=-1: must be >= 0"),
    ({"data.workers": -2}, "--config.data.workers=-2: must be >= -1"),
    ({"data.image_size": 80}, "--config.data.image_size=80, --config.data.resolution=73: the model input is "
                              "cropped from the stored images"),
    ({"data.augment.flip_probability": 1.5}, "--config.data.augment.flip_probability=1.5: must be <= 1"),
    ({"data.augment.rotation_degrees": 200.0}, "rotation_degrees=200.0: must be <= 180"),
    ({"data.augment.scale_range": (1.1, 0.9)}, "scale_range=(1.1, 0.9): must be two numbers, LOW <= HIGH"),
    ({"data.augment.scale_range": (0.0, 1.0)}, "scale_range=(0.0, 1.0): [0.0]: each must be a number > 0"),
    ({"data.augment.translate_fraction": 1.0}, "translate_fraction=1.0: must be < 1"),
    ({"optim.name": "sgd"}, "--config.optim.name='sgd': must be one of adam, adamw"),
    ({"optim.lr": 0.0}, "--config.optim.lr=0.0: must be > 0"),
    ({"optim.b2": 1.0}, "--config.optim.b2=1.0: must be < 1"),
    ({"optim.grad_clip_norm": -1.0}, "--config.optim.grad_clip_norm=-1.0: must be >= 0"),
    ({"optim.schedule": "step"}, "--config.optim.schedule='step': must be one of plateau, cosine"),
    ({"optim.plateau_factor": 1.0}, "--config.optim.plateau_factor=1.0: must be < 1"),
    ({"optim.warmup_steps": -5}, "--config.optim.warmup_steps=-5: must be >= 0"),
    ({"optim.lr_scaling": "cube"}, "--config.optim.lr_scaling='cube': must be one of linear, sqrt, none"),
    ({"optim.reference_batch": 0}, "--config.optim.reference_batch=0: must be >= 1"),
    ({"optim.weight_decay": 0.01}, "--config.optim.weight_decay=0.01, --config.optim.name='adam': weight decay "
                                   "needs name='adamw'"),
    ({"batch_size_per_device": 0}, "--config.batch_size_per_device=0: must be >= 1"),
    ({"eval_batch_size_per_device": 0}, "--config.eval_batch_size_per_device=0: must be >= 1"),
    ({"num_epochs": 0}, "--config.num_epochs=0: must be >= 1"),
    ({"max_steps": -1}, "--config.max_steps=-1: must be >= 0"),
    ({"eval_every_steps": -1}, "--config.eval_every_steps=-1: must be >= 0"),
    ({"log_every_steps": 0}, "--config.log_every_steps=0: must be >= 1"),
    ({"keep_checkpoints": 0}, "--config.keep_checkpoints=0: must be >= 1"),
    ({"n_boot": -1}, "--config.n_boot=-1: must be >= 0"),
    ({"resume": "/no/such/run"}, "--config.resume='/no/such/run': /no/such/run does not exist"),
    ({"model_init": "/no/such/weights"}, "--config.model_init='/no/such/weights': /no/such/weights does not exist"),
    ({"distributed": "maybe"}, "--config.distributed='maybe': must be one of auto, yes, no"),
    ({"demo_dir": "gs://bucket/demo"}, "--config.demo_dir='gs://bucket/demo': must be a local folder, not a URL"),
    ({"demo_data.num_nih": 5}, "--config.demo_data.num_nih=5: must be >= 20"),
    ({"demo_data.size": 16}, "--config.demo_data.size=16: must be >= 32"),
    ({"model.age_hidden": 0}, "--config.loss.weights.age=1.0, --config.model.age_hidden=0: an age loss needs the "
                              "age head"),
    ({"model.metadata_tasks": []}, "--config.loss.weights.metadata=1.0, --config.model.metadata_tasks=[]: a "
                                   "metadata loss needs metadata heads"),
    ({"loss.weights.pathology": 0.0, "loss.weights.metadata": 0.0, "loss.weights.age": 0.0},
     "--config.loss.weights=")
]


@pytest.mark.parametrize("overrides,expected", PRETRAIN_CASES, ids=[",".join(o) for o, _ in PRETRAIN_CASES])
def test_pretrain_rule(overrides, expected):
    [problem] = config_lib.problems(pretrain(**overrides))
    assert expected in problem


TRANSFER_CASES = [
    ({"methods": "probe+svm"}, "--config.methods='probe+svm': unknown svm; choose from probe, finetune"),
    ({"methods": ""}, "--config.methods='': must name one or more of probe, finetune"),
    ({"protocols": "cv_shenzhen,cv_nih"}, "--config.protocols='cv_shenzhen,cv_nih': unknown dataset(s) nih; choose "
                                          "from shenzhen, montgomery, csv"),
    ({"protocols": "shenzhen_montgomery"}, "protocol 'shenzhen_montgomery': write cv_<dataset>, split_<dataset> "
                                           "or <dataset>[+<dataset>...]_to_<dataset>"),
    ({"protocols": "shenzhen+montgomery_to_shenzhen"}, "the test dataset must not be among the training ones"),
    ({"targets": " "}, "--config.targets=' ': must be a non-empty string"),
    ({"checkpoint_step": "last"}, "--config.checkpoint_step='last': must be best, latest or a step number"),
    ({"init_from": "/no/such/run"}, "--config.init_from='/no/such/run': /no/such/run does not exist (each must be "
                                    "random, random_bn, an existing path or a glob pattern that matches)"),
    ({"init_from": "/no/such/seed_*"}, "--config.init_from='/no/such/seed_*': /no/such/seed_* matches nothing"),
    ({"train_sizes": "10,x,0"}, "--config.train_sizes='10,x,0': x, 0: each size must be a number of images >= 1 "
                                "or all"),
    ({"train_sizes": "10,all,10"}, "--config.train_sizes='10,all,10': names a size twice"),
    ({"train_draws": 0}, "--config.train_draws=0: must be >= 1"),
    ({"curve_target_auroc": 1.5}, "--config.curve_target_auroc=1.5: must be <= 1"),
    ({"compare_with": "random,/no/such"}, "/no/such does not exist"),
    ({"compare_with": ""}, "--config.baselines_only=True, --config.compare_with='': baselines_only needs baselines"),
    ({"baselines_only": False}, "--config.init_from='': empty: set it to the weights under study"),
    ({"init_from": "random"}, "--config.baselines_only=True, --config.init_from='random': both are set"),
    ({"methods": "finetune"}, "--config.compare_with='random,random_bn', --config.methods='finetune': random_bn is "
                              "a linear-probe baseline"),
    ({"bn_statistics_images": 0}, "--config.bn_statistics_images=0: must be >= 1"),
    ({"feature_batch_size": 0}, "--config.feature_batch_size=0: must be >= 1"),
    ({"feature_cache_dir": ""}, "--config.feature_cache_dir='': must be a non-empty string"),
    ({"data.num_folds": 1}, "--config.data.num_folds=1: must be >= 2"),
    ({"data.fold_seed": -1}, "--config.data.fold_seed=-1: must be >= 0"),
    ({"probe.inner_folds": 1}, "--config.probe.inner_folds=1: must be >= 2"),
    ({"probe.l2_grid": ()}, "--config.probe.l2_grid=(): must be a non-empty list of numbers"),
    ({"probe.selection": "accuracy"}, "--config.probe.selection='accuracy': must be one of log_loss, auroc"),
    ({"probe.max_iter": 0}, "--config.probe.max_iter=0: must be >= 1"),
    ({"probe.tol": 0.0}, "--config.probe.tol=0.0: must be > 0"),
    ({"finetune.max_folds": -1}, "--config.finetune.max_folds=-1: must be >= 0"),
    ({"finetune.num_epochs": 0}, "--config.finetune.num_epochs=0: must be >= 1"),
    ({"finetune.patience": 0}, "--config.finetune.patience=0: must be >= 1"),
    ({"finetune.batch_size": 0}, "--config.finetune.batch_size=0: must be >= 1"),
    ({"finetune.eval_batch_size": 0}, "--config.finetune.eval_batch_size=0: must be >= 1"),
    ({"finetune.head_lr": 0.0}, "--config.finetune.head_lr=0.0: must be > 0"),
    ({"finetune.backbone_lr": -1e-4}, "--config.finetune.backbone_lr=-0.0001: must be >= 0"),
    # a sub-section's rules apply wherever it appears
    ({"finetune.optim.name": "sgd"}, "--config.finetune.optim.name='sgd': must be one of adam, adamw"),
    ({"finetune.optim.weight_decay": 0.1}, "--config.finetune.optim.weight_decay=0.1, "
                                           "--config.finetune.optim.name='adam': weight decay needs"),
    ({"finetune.augment.flip_probability": -0.1}, "--config.finetune.augment.flip_probability=-0.1: must be >= 0"),
    ({"finetune.bn_stats": "test"}, "--config.finetune.bn_stats='test': must be one of fit, target"),
    ({"screening.sensitivity": 1.5}, "--config.screening.sensitivity=1.5: must be <= 1"),
    ({"screening.specificity": 0.0}, "--config.screening.specificity=0.0: must be > 0"),
    ({"calibration_bins": 0}, "--config.calibration_bins=0: must be >= 1"),
    ({"deploy.method": "svm"}, "--config.deploy.method='svm': must be one of , probe, finetune"),
    ({"deploy.protocol": "cv_nih"}, "--config.deploy.protocol='cv_nih': must be empty or a protocol column of the "
                                    "run (unknown dataset(s) nih"),
    ({"deploy.start": "random", "deploy.protocol": "shenzhen+montgomery_to_csv",
      "protocols": "cv_csv,shenzhen+montgomery_to_csv"}, "would train on several datasets"),
    ({"deploy.start": "random", "deploy.protocol": "cv_csv", "protocols": "cv_csv",
      "targets": "Tuberculosis,Cardiomegaly"}, "the deployed protocol must be one the run uses (with several "
                                               "targets: <protocol>.<target>, e.g. cv_csv.tuberculosis)"),
    ({"deploy.threshold_rule": "f1"}, "--config.deploy.threshold_rule='f1': must be one of sensitivity, youden"),
    # the deployable model is judged against the run when there is one (init_from set or deploy.start named)
    ({"deploy.start": "random", "deploy.method": "finetune", "methods": "probe", "compare_with": "random"},
     "--config.deploy.method='finetune', --config.methods='probe': the deployed method must be one the run uses"),
    ({"deploy.start": "random_bn", "deploy.method": "finetune"}, "--config.deploy.start='random_bn', "
                                                                 "--config.deploy.method='finetune': random_bn is "
                                                                 "a probe-only baseline"),
    ({"deploy.start": "random", "deploy.protocol": "shenzhen_to_montgomery", "protocols": "shenzhen_to_montgomery"},
     "the model deployed from shenzhen_to_montgomery takes its threshold and epoch count from cv_shenzhen, which "
     "must be among protocols"),
    ({"deploy.start": "random", "deploy.protocol": "cv_montgomery", "protocols": "cv_shenzhen"},
     "--config.deploy.protocol='cv_montgomery', --config.protocols='cv_shenzhen': the deployed protocol must be "
     "one the run uses"),
]


@pytest.mark.parametrize("overrides,expected", TRANSFER_CASES, ids=[",".join(o) for o, _ in TRANSFER_CASES])
def test_transfer_rule(overrides, expected):
    [problem] = config_lib.problems(transfer(**overrides))
    assert expected in problem


def test_existing_paths_pass(tmp_path):
    (tmp_path / "run").mkdir()
    assert config_lib.problems(pretrain(resume=str(tmp_path / "run"), model_init=str(tmp_path / "run"))) == []
    assert config_lib.problems(transfer(init_from=str(tmp_path / "run"), compare_with=f"random,{tmp_path}",
                                        baselines_only=False)) == []
    (tmp_path / "run_2").mkdir()  # several runs as one start: a comma list and glob patterns
    assert config_lib.problems(transfer(init_from=f"{tmp_path}/run,{tmp_path}/run_[0-9]", baselines_only=False,
                                        compare_with=f"random,{tmp_path}/ru*")) == []


def test_every_problem_in_one_error():
    config = pretrain(**{"batch_size_per_device": 0, "model.arch": "densenet999", "optim.lr": -1.0})
    with pytest.raises(errors.ConfigError) as e:
        config_lib.validate(config)
    assert len(e.value.problems) == 3
    message = str(e.value)
    assert message.startswith("3 problem(s) with the config:")
    for fragment in ("batch_size_per_device=0", "densenet999", "optim.lr=-1.0"):
        assert fragment in message


def test_a_rule_is_one_line_per_field_keyed_by_section():
    """How sections get their rules: field=RULE under the section's name (the defaults are the recipes'); the
    rules apply wherever the section appears."""
    config_lib.rules("toy", checks=(lambda s: [(("low", "high"), "low > high")] if s.low > s.high else [],),
                     low=config_lib.integer(min=0), high=config_lib.integer(min=0),
                     group=dict(mode=config_lib.one_of("a", "b")))
    c = ml_collections.ConfigDict(dict(low=1, high=2, group=dict(mode="a")))
    assert config_lib.boolean(1) == "must be True or False"  # (ConfigDict's type checks stop 1 for a bool)
    assert config_lib._section_problems(c, "toy", "", set()) == []
    c.low, c.group.mode = 3, "c"
    assert config_lib._section_problems(c, "toy", "", set()) == ["--config.group.mode='c': must be one of a, b",
                                                                 "--config.low=3, --config.high=2: low > high"]
    c.high = -1  # the combination is not judged while one of its values is invalid on its own
    assert config_lib._section_problems(c, "toy", "", set()) == ["--config.high=-1: must be >= 0",
                                                                 "--config.group.mode='c': must be one of a, b"]


def test_bad_config_file_argument_names_every_problem():
    with pytest.raises(errors.ConfigArgumentError, match=r"res='ab': must be int; unknown config argument\(s\) "
                                                         r"\['bogus'\]"):
        config_lib.parse_arg("bogus,res=ab", res=0, demo=False)


# --- python -m metachex_jax.main ------------------------------------------------------------------------------

def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocesses.run([sys.executable, "-m", "metachex_jax.main", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})


def test_main_exits_2_with_every_problem_before_any_work_and_no_traceback(tmp_path):
    demo_dir = tmp_path / "demo"
    done = run_main("--config=configs/pretrain.py:demo", f"--workdir={tmp_path / 'wd'}",
                    f"--config.demo_dir={demo_dir}", "--config.batch_size_per_device=0",
                    "--config.model.arch=densenet999", "--config.data.augment.flip_probability=2.0")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "3 problem(s) with the config" in done.stderr
    for fragment in ("batch_size_per_device=0", "densenet999", "flip_probability=2.0"):
        assert fragment in done.stderr
    assert not demo_dir.exists() and not (tmp_path / "wd").exists()  # nothing was generated or written


def test_main_usage_errors_exit_2_without_a_traceback(tmp_path):
    cases = [
        (["--config=configs/pretrain.py:bogus,res=ab", f"--workdir={tmp_path}"],
         "config argument res='ab': must be int; unknown config argument(s) ['bogus']"),
        (["--config=configs/pretrain.py", f"--workdir={tmp_path}", "--config.model.nosuch=1"],
         "unknown config field 'nosuch'"),
        (["--config=configs/pretrain.py", f"--workdir={tmp_path}", "--config.batch_size_per_device=abc"],
         "--config.batch_size_per_device=abc"),
        (["--config=configs/pretrain.py"], "--workdir must have a value"),
        (["--config=configs/pretrain.py", f"--workdir={tmp_path}", "extra"], "unexpected arguments: ['extra']"),
        (["--config=configs/pretrain.py", f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path / 'none'}"],
         "python -m metachex_jax.prepare --dataset=chestxray14"),
    ]
    for args, expected in cases:
        done = run_main(*args)
        assert (done.returncode, "Traceback" in done.stderr) == (2, False), (args, done.stderr[-3000:])
        assert expected in done.stderr, (args, done.stderr[-3000:])


def test_user_errors_found_during_the_run_exit_2_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    def fails_with(error):
        def run(config, workdir):
            raise error
        return run

    argv = ["prog", f"--config={REPO}/configs/pretrain.py:demo", f"--workdir={tmp_path}"]
    with flagsaver.flagsaver():
        main.FLAGS(argv)
        monkeypatch.setattr(main, "run", fails_with(errors.MissingDataError("no such build; prepare it")))
        with pytest.raises(SystemExit) as exit_info:
            main.main(["prog"])
        assert exit_info.value.code == 2 and "no such build; prepare it" in capsys.readouterr().err
        monkeypatch.setattr(main, "run", fails_with(ZeroDivisionError("a bug")))
        with pytest.raises(ZeroDivisionError):  # absl prints it with its traceback and exits 1
            main.main(["prog"])
