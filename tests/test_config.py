"""Config files: argument parsing, the demo/baseline variants, loading through ml_collections' flag syntax."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from metachex_jax.configs import config_lib
from metachex_jax.core import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_arg_types_and_errors():
    a = config_lib.parse_arg("demo,res=64,arch=densenet_tiny", demo=False, res=0, arch="densenet121", lr=1e-3)
    assert a.demo is True and a.res == 64 and a.arch == "densenet_tiny" and a.lr == 1e-3
    with pytest.raises(ValueError, match=r"unknown config argument\(s\) \['bogus', 'other'\]"):
        config_lib.parse_arg("bogus,other=1", demo=False)
    with pytest.raises(ValueError, match="needs a value"):
        config_lib.parse_arg("res", res=0)


def _load(spec, *overrides):
    fv = flags.FlagValues()
    argv = ["prog", f"--config={spec}", *overrides]
    # sys_argv: the override flags (--config.x.y) are found in argv, as in main where it is sys.argv.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_pretrain_and_chexnet_configs_load_with_arguments_and_overrides():
    c = _load(os.path.join(REPO, "configs/pretrain.py"))
    assert c.model.arch == "densenet121" and c.data.image_size == 224 and c.data.resolution == 256
    assert c.model.metadata_tasks == ["view_ap", "sex_male"] and c.model.age_hidden > 0
    assert c.optim.name == "adam" and c.optim.lr == 1e-3 and c.optim.schedule == "plateau"
    demo = _load(os.path.join(REPO, "configs/pretrain.py:demo"), "--config.optim.lr=3e-4")
    assert demo.demo and demo.data.image_size == 64 and demo.optim.lr == 3e-4
    base = _load(os.path.join(REPO, "configs/chexnet.py:runlocal,arch=densenet_tiny,res=32"))
    assert base.model.metadata_tasks == [] and base.model.age_hidden == 0
    assert base.loss.weights.metadata == 0 and base.loss.weights.age == 0
    assert base.data.image_size == 32 and base.max_steps == 4 and base.model.arch == "densenet_tiny"


def test_config_docstrings_carry_their_command():
    for name in ("pretrain", "chexnet"):
        text = open(os.path.join(REPO, "configs", f"{name}.py")).read()
        assert f"python -m metachex_jax.main --config=configs/{name}.py" in text


# What SLURM puts in the environment (sbatch/salloc/srun manual pages, "OUTPUT ENVIRONMENT VARIABLES"): a batch
# script of a 2-node, 8-task job; an salloc shell of the same allocation; one task of `srun` inside it.
SBATCH_SCRIPT = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8",
                 "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "4(x2)",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": "/home/u"}
SALLOC_SHELL = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8",
                "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "4(x2)",
                "SLURM_SUBMIT_DIR": "/home/u"}


def srun_task(tasks: int, procid: int = 1) -> dict:
    return {**SBATCH_SCRIPT, "SLURM_NTASKS": str(tasks), "SLURM_NPROCS": str(tasks), "SLURM_STEP_ID": "0",
            "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % 4)}


def test_slurm_is_a_multiprocess_launch_only_for_several_srun_tasks():
    assert distributed.multiprocess_launch_detected(SBATCH_SCRIPT) is None  # python run by the batch script itself
    assert distributed.multiprocess_launch_detected(SALLOC_SHELL) is None  # python typed in an salloc shell
    assert distributed.multiprocess_launch_detected(srun_task(8, procid=5)) == "SLURM"
    assert distributed.multiprocess_launch_detected(srun_task(1, procid=0)) is None  # srun -n1: one process
    assert not distributed.maybe_initialize("auto", env=SBATCH_SCRIPT)  # nothing to connect to: not called
    assert not distributed.maybe_initialize("auto", env=SALLOC_SHELL)


def test_distributed_initialised_only_when_asked_or_detected():
    assert distributed.multiprocess_launch_detected({}) is None
    assert distributed.multiprocess_launch_detected({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU VM slice"
    assert distributed.multiprocess_launch_detected({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert not distributed.maybe_initialize("auto", env={})  # a single-host run never initialises
    assert not distributed.maybe_initialize("no", env={"JAX_COORDINATOR_ADDRESS": "x:1"})
    with pytest.raises(ValueError, match="config.distributed"):
        distributed.maybe_initialize("maybe", env={})


def test_compilation_cache_flag_sets_jax_and_respects_the_environment(tmp_path):
    import jax

    from metachex_jax import main

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        main.use_compilation_cache(str(tmp_path / "a"), explicit=False)  # the default, nothing set: used
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
        main.use_compilation_cache(str(tmp_path / "b"), explicit=False)  # already set (as by the env var): kept
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
        main.use_compilation_cache(str(tmp_path / "c"), explicit=True)  # the flag given: wins
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        main.use_compilation_cache("", explicit=True)  # '' turns it off
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_demo_transfer_configs_compare_random_bn_only_where_a_probe_runs():
    from metachex_jax.transfer import run

    for name, expected in [("transfer", "random,random_bn"), ("linear_probe", "random,random_bn"),
                           ("finetune", "random")]:
        config = _load(os.path.join(REPO, f"configs/{name}.py:demo"))
        assert config.compare_with == expected
        assert ("probe" in run.parse_methods(config.methods)) == ("random_bn" in config.compare_with)
