"""A missing dataset's message holds the exact `prepare` commands for the build the config needs (resolution,
validation fraction, seed, folds): running the printed commands, with RAW_DIR filled in, makes the data the run
then finds."""

from __future__ import annotations

import shlex
import sys

import pytest

import subprocesses
from data_fixtures import make_nih_tree, make_tb_tree
from metachex_jax import main
from metachex_jax.configs import pretrain, transfer
from metachex_jax.core import errors
from metachex_jax.data.input import datasets
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.transfer import sets as sets_lib


def problems(config) -> list[str]:
    """What `python -m metachex_jax.main` reports before any work: the config's rules, then the data preflight."""
    try:
        main.check(config)
    except errors.ConfigError as e:
        return e.problems
    return []


def printed_commands(message: str) -> list[str]:
    return [line.strip() for line in message.splitlines() if line.strip().startswith("python -m metachex_jax.prepare")]


def run_printed(command: str, raw_dir) -> None:
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "metachex_jax.prepare"]
    words = [sys.executable, *words[1:]]
    words = [w.replace("RAW_DIR", str(raw_dir)) for w in words]
    done = subprocesses.run(words + ["--workers=1"])
    assert done.returncode == 0, done.stderr[-3000:]


def test_pretraining_message_prepares_exactly_the_build_the_run_reads(tmp_path):
    tree = make_nih_tree(tmp_path / "raw" / "ChestX-ray14", n_patients=12)
    config = pretrain.get_config("arch=densenet_tiny,res=24")  # stored resolution 27
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.val_fraction, config.data.val_seed = 0.25, 3
    [message] = problems(config)
    with pytest.raises(errors.MissingDataError) as raised:  # the run's own lookup says the same
        datasets.chestxray14_splits(DataSpec.from_config(config))
    assert printed_commands(str(raised.value)) == printed_commands(message)
    assert "chestxray14/r27_val0p25_seed3 not found" in message and "RAW_DIR = the folder holding Data_Entry" in message
    [command] = printed_commands(message)
    assert command == (f"python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=RAW_DIR "
                       f"--data_dir={tmp_path / 'tfds'} --resolution=27 --val_fraction=0.25 --seed=3")
    run_printed(command, tree.root)
    assert problems(config) == []
    splits = datasets.chestxray14_splits(DataSpec.from_config(config))
    assert sum(len(s) for s in splits.values()) == len(tree.rows)
    assert splits["train"][0]["image"].shape == (27, 27, 1)


def test_transfer_message_prepares_both_tb_sets_and_random_bns_chestxray14(tmp_path):
    raw = tmp_path / "raw"
    make_tb_tree(raw, "shenzhen")
    make_tb_tree(raw, "montgomery")
    make_nih_tree(raw / "ChestX-ray14", n_patients=12)
    config = transfer.get_config("arch=densenet_tiny,res=24,methods=probe")
    config.update_from_flattened_dict({"data.data_dir": str(tmp_path / "tfds"), "data.num_folds": 3,
                                       "data.fold_seed": 1, "data.val_fraction": 0.2, "baselines_only": True,
                                       "compare_with": "random,random_bn"})
    tb_message, nih_message = problems(config)
    assert "montgomery/r27_k3_seed1, shenzhen/r27_k3_seed1 not found" in tb_message
    assert "--config.data.manual_dir=RAW_DIR" in tb_message  # TB sets can be prepared at the start of the run
    assert nih_message.startswith("compare_with names random_bn") and "--config.data.manual_dir" not in nih_message
    commands = printed_commands(tb_message) + printed_commands(nih_message)
    assert [c.split()[3] for c in commands] == ["--dataset=montgomery", "--dataset=shenzhen", "--dataset=chestxray14"]
    assert all("--resolution=27 --num_folds=3 --seed=1" in c for c in commands[:2])
    assert commands[2].endswith("--resolution=27 --val_fraction=0.2 --seed=0")
    with pytest.raises(errors.MissingDataError) as raised:  # the run's own lookup says the same
        sets_lib.tb_transfer_sets(DataSpec.from_config(config))
    assert printed_commands(str(raised.value)) == commands[:2]
    for command in commands:
        run_printed(command, raw)
    assert problems(config) == []
    sets = sets_lib.tb_transfer_sets(DataSpec.from_config(config))
    assert {len(s) for s in sets.values()} == {22} and set(sets["shenzhen"].fold) == {0, 1, 2}
    nih_train = datasets.chestxray14_splits(DataSpec.from_config(config))["train"]  # what random_bn reads
    assert len(nih_train) > 0


def test_a_bucket_data_dir_gets_a_prepare_command_that_builds_into_the_bucket(fake_gcs):
    """Builds are published into gs:// directly (data/build/publish.py), so the command prepares there, and a run
    given the raw copy may prepare it at its start; no local build and copy."""
    config = pretrain.get_config("")
    config.data.data_dir = fake_gcs.url + "/tfds"
    [message] = problems(config)
    assert (f"  python -m metachex_jax.prepare --dataset=chestxray14 --manual_dir=RAW_DIR "
            f"--data_dir={fake_gcs.url}/tfds --resolution=256 --val_fraction=0.1 --seed=0\n") in message
    assert "--config.data.manual_dir=RAW_DIR" in message and "gcloud storage cp" not in message
