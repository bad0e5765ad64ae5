"""The DenseNet's forms (unrolled / scanned dense blocks, remat) and its hand-written CPU gradients compute the same
function as the straightforward model, and weights and training states move between the forms exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metachex_jax.configs import chexnet, pretrain
from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import sharding
from metachex_jax.data.input import pipeline
from metachex_jax.interop import convert
from metachex_jax.models import (SPECS, DenseNet, batch_norms, build_model, convert_layout, count_params, ops, runs,
                                 set_block_options)
from metachex_jax.models.densenet import StackedBatchNorm
from metachex_jax.training import steps as train_steps

TINY = SPECS["densenet_tiny"]
FORMS = {"unrolled": {}, "scanned": {"scan_layers": True}, "remat": {"remat": True},
         "scanned+remat": {"scan_layers": True, "remat": True}}


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_trees_close(actual, expected, rtol, scale=None):
    """Every leaf equal up to `rtol` times `scale` (default: the leaf's largest magnitude, so that a gradient that
    nearly cancels is compared at the scale of its own leaf, not element by element)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)):
        e, a = np.asarray(e), np.asarray(a)
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * (scale or max(np.abs(e).max(), 1e-30)),
                                   err_msg=jax.tree_util.keystr(path))


def _float64_tiny(**form):
    model = DenseNet("densenet_tiny", num_classes=5, dtype=jnp.float64, rngs=nnx.Rngs(0), **form)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    return model


def _training_pass(model, x):
    """One training-mode forward and backward pass: outputs, gradients and updated BatchNorm statistics (the
    last two in torchvision's layout, whatever the form), and the raw gradients."""
    graphdef, params, stats = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, stats, copy=True)
        m.train()
        out = m(x)
        return jnp.sum(jnp.sin(out)), (out, nnx.split(m, nnx.Param, ...)[2])

    (_, (out, new_stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    canonical = lambda state: convert_layout(nnx.to_pure_dict(state), model.spec, scan_layers=False)
    return {"out": out, "grads": canonical(grads), "stats": canonical(new_stats)}, grads


def test_every_form_computes_the_reference_function():
    """Outputs, gradients and BatchNorm statistics of each form and of the hand-written gradients equal JAX's own
    differentiation of the unrolled model. In float64, so that agreement means the same function (float32 runs
    the same code)."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3), jnp.float64)
        with ops.reference_gradients():
            reference, _ = _training_pass(_float64_tiny(), x)
        for name, form in FORMS.items():
            model = _float64_tiny(**form)
            result, raw_grads = _training_pass(model, x)
            _assert_trees_close(result, reference, rtol=1e-9)
            if name == "scanned":  # evaluation mode (running statistics; remat changes nothing there)
                unrolled = _float64_tiny()
                model.eval(), unrolled.eval()
                np.testing.assert_allclose(model(x), unrolled(x), rtol=1e-12)
            if model.blocks[0].scan_layers:  # the zero padding of stacked variables gets exactly zero gradient
                block = nnx.to_pure_dict(raw_grads)["blocks"][1]["stacked"]
                cin = TINY.num_init_features // 2 + TINY.block_config[0] * TINY.growth_rate // 2
                assert not np.any(block["norm1"]["scale"][0, cin:])
                assert not np.any(block["conv1"]["kernel"][0, ..., cin:, :])
                assert np.any(block["norm1"]["scale"][1, cin:cin + TINY.growth_rate])


def test_hand_written_op_gradients_equal_jax_gradients():
    """Each op with a hand-written backward pass against jax.vjp of its plain formula, at odd spatial sizes."""
    keys = jax.random.split(jax.random.key(2), 4)
    with jax.enable_x64(True):
        image = jax.random.normal(keys[0], (2, 19, 17, 3), jnp.float64)
        cases = [(ops.stem_conv, (image, jax.random.normal(keys[1], (7, 7, 3, 5), jnp.float64))),
                 (ops.max_pool_3x3_stride2, (image,)),
                 (ops._conv3x3_hand_written, (image, jax.random.normal(keys[2], (3, 3, 3, 4), jnp.float64)))]
        for fn, args in cases:
            out = fn(*args)
            g = jax.random.normal(keys[3], out.shape, jnp.float64)
            got = jax.vjp(fn, *args)[1](g)
            with ops.reference_gradients():
                want = jax.vjp(fn if fn is not ops._conv3x3_hand_written else ops.conv3x3, *args)[1](g)
            _assert_trees_close(got, want, rtol=1e-10)
        reference_pool = nnx.max_pool(image, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        np.testing.assert_array_equal(ops.max_pool_3x3_stride2(image), reference_pool)


def test_layout_conversion_is_exact_both_ways():
    unrolled = DenseNet("densenet_tiny", num_classes=5, rngs=nnx.Rngs(0))
    scanned = DenseNet("densenet_tiny", num_classes=5, scan_layers=True, rngs=nnx.Rngs(0))
    # The same seed gives the same weights in both forms; the stacked layout pads norm1 / conv1 to the block's width.
    _assert_trees_equal(convert_layout(_pure(unrolled), TINY, scan_layers=True), _pure(scanned))
    _assert_trees_equal(convert_layout(_pure(scanned), TINY, scan_layers=False), _pure(unrolled))
    stacked = scanned.blocks[0].stacked
    assert stacked["conv1"].kernel.shape == (2, 1, 1, 32, 16) and stacked["conv2"].kernel.shape == (2, 3, 3, 16, 8)
    np.testing.assert_array_equal(stacked["conv1"].kernel[1, 0, 0, :24],
                                  unrolled.blocks[0].layers[1].conv1.kernel[0, 0])
    assert not np.any(stacked["conv1"].kernel[0, 0, 0, 16:]) and not np.any(stacked["norm1"].scale[0, 16:])
    np.testing.assert_array_equal(stacked["norm1"].var[0, 16:], 1.0)
    assert count_params(scanned) == count_params(unrolled)
    assert len(batch_norms(scanned)) == 2 * 4 + 3 + 2  # two stacked per block, transitions, norm0, norm5
    assert sum(isinstance(n, StackedBatchNorm) for n in batch_norms(scanned)) == 8
    # In place, there and back: bit for bit.
    original = _pure(unrolled)
    set_block_options(unrolled, scan_layers=True, remat=True)
    assert unrolled.blocks[2].scan_layers and unrolled.blocks[2].remat
    _assert_trees_equal(_pure(unrolled), _pure(scanned))
    set_block_options(unrolled, scan_layers=False)
    _assert_trees_equal(_pure(unrolled), original)
    # DenseNet-121 in the scanned layout: torchvision's parameter count, no compilation needed.
    big = nnx.eval_shape(lambda: DenseNet("densenet121", num_classes=1000, scan_layers=True, rngs=nnx.Rngs(0)))
    assert count_params(big) == 7_978_856


def test_torchvision_export_and_backbone_checkpoints_ignore_the_form(tmp_path):
    unrolled = DenseNet("densenet_tiny", num_classes=5, rngs=nnx.Rngs(3))
    scanned = DenseNet("densenet_tiny", num_classes=5, scan_layers=True, rngs=nnx.Rngs(3))
    _assert_trees_equal(convert.to_torchvision_state_dict(scanned), convert.to_torchvision_state_dict(unrolled))
    convert.save_backbone(scanned, tmp_path / "from_scanned", source="test")
    convert.save_backbone(unrolled, tmp_path / "from_unrolled", source="test")
    into_unrolled = DenseNet("densenet_tiny", num_classes=5, rngs=nnx.Rngs(9))
    into_scanned = DenseNet("densenet_tiny", num_classes=5, scan_layers=True, rngs=nnx.Rngs(9))
    convert.load_backbone(tmp_path / "from_scanned", into_unrolled)
    convert.load_backbone(tmp_path / "from_unrolled", into_scanned)
    strip = lambda tree: {k: v for k, v in tree.items() if k != "classifier"}
    _assert_trees_equal(strip(_pure(into_unrolled)), strip(_pure(unrolled)))
    _assert_trees_equal(strip(_pure(into_scanned)), strip(_pure(scanned)))


def test_train_state_converts_between_forms_mid_training():
    """Two real trainer steps (float32) in the scanned form, the whole state (weights, statistics, momentum)
    converted to the unrolled form, one more step in each: the same result. (SGD with momentum: Adam would
    magnify float32 rounding of near-zero gradients into whole steps; its moments convert in the next test.)"""
    config = pretrain.model("densenet_tiny")
    loss_config = pretrain.get_config().loss
    tx = optax.sgd(0.1, momentum=0.9)
    states, graphdefs = {}, {}
    for scan in (True, False):
        config.scan_layers = "yes" if scan else "no"
        graphdefs[scan], states[scan] = train_steps.create(build_model(config, nnx.Rngs(0)), tx)
    contract = PixelContract(32, 36, "imagenet", "resize_crop")
    steps = {scan: jax.jit(train_steps.make_train_step(graphdefs[scan], tx, loss_config, jnp.float32,
                                                       contract=contract))
             for scan in (True, False)}
    batches = [{k: jnp.asarray(v) for k, v in pipeline.random_nih_batch(4, 32, seed=s).items()} for s in range(3)]
    state = states[True]
    for batch in batches[:2]:
        state, _ = steps[True](state, batch)
    converted = train_steps.convert_layout(state, states[False], TINY, scan_layers=False)
    back = train_steps.convert_layout(converted, states[True], TINY, scan_layers=True)
    _assert_trees_equal(back, state)
    after_scanned, metrics_scanned = steps[True](state, batches[2])
    after_unrolled, metrics_unrolled = steps[False](converted, batches[2])
    np.testing.assert_allclose(metrics_unrolled["loss"], metrics_scanned["loss"], rtol=1e-5)
    after_scanned = train_steps.convert_layout(after_scanned, states[False], TINY, False)
    _assert_trees_close(after_unrolled.params, after_scanned.params, rtol=1e-4)
    _assert_trees_close(after_unrolled.batch_stats, after_scanned.batch_stats, rtol=1e-5)


def test_trainer_resumes_a_checkpoint_of_the_other_form(tmp_path):
    """A checkpoint written by a scanned run restores into an unrolled run (and back), converted exactly: what
    `trainer.restore_latest` does when config.model.scan_layers changed between runs of one workdir."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from metachex_jax.training import checkpointing, trainer

    config = chexnet.get_config("arch=densenet_tiny,res=32")
    tx = optax.adam(1e-2)
    replicated = NamedSharding(sharding.make_mesh(), P())
    states = {}
    for choice in ("yes", "no"):
        config.model.scan_layers = choice
        states[choice] = jax.device_put(train_steps.create(build_model(config.model, nnx.Rngs(1)), tx)[1], replicated)
    graphdef = train_steps.create(build_model(config.model, nnx.Rngs(1)), tx)[0]  # unrolled ("no")
    batch = {k: jnp.asarray(v) for k, v in pipeline.random_nih_batch(4, 32).items()}
    config.model.scan_layers = "yes"
    scanned_graphdef = train_steps.create(build_model(config.model, nnx.Rngs(1)), tx)[0]
    trained, _ = jax.jit(train_steps.make_train_step(scanned_graphdef, tx, config.loss, jnp.float32,
                                                     contract=PixelContract.from_config(config)))(states["yes"], batch)
    manager = runs.make_manager(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    checkpointing.save(manager, 1, trained, None, {"config": config.to_dict()})
    manager.wait_until_finished()
    assert runs.scanned_layout(manager) is True
    config.model.scan_layers = "no"
    step, restored, _ = trainer.restore_latest(manager, config, tx, states["no"], replicated)
    assert step == 1 and jax.tree.structure(restored) == jax.tree.structure(states["no"])
    _assert_trees_equal(restored, train_steps.convert_layout(trained, states["no"], TINY, scan_layers=False))
    model = train_steps.model_of(graphdef, restored)
    assert model.backbone.blocks[0].layers is not None
    manager.close()
    # Evaluation and transfer read the same checkpoint: the run's saved config says "yes", a transfer config "no".
    run_model, info = runs.load_run_model(str(tmp_path), "latest")
    assert run_model.backbone.blocks[0].scan_layers and info["step"] == 1
    from metachex_jax.transfer import weights

    transfer_model = chexnet.get_config("arch=densenet_tiny").model
    transfer_model.scan_layers = "no"
    start = weights.load_start(str(tmp_path), transfer_model, seed=0, step="latest",
                               contract=PixelContract.from_config(config))
    assert not start.model.backbone.blocks[0].scan_layers
    _assert_trees_equal(_pure(start.model), _pure(model))
    assert start.fingerprint == weights.weights_fingerprint(run_model)  # the feature cache ignores the form


def test_transfer_starts_and_batchnorm_calibration_follow_the_configs_form():
    from metachex_jax.transfer import weights

    config = pretrain.model("densenet_tiny")
    contract = PixelContract(32, 36, "imagenet", "resize_crop")
    config.scan_layers, config.remat = "yes", True
    scanned = weights.load_start("random", config, seed=0, contract=contract)
    assert scanned.model.backbone.blocks[0].scan_layers and scanned.model.backbone.blocks[0].remat
    config.scan_layers, config.remat = "no", False
    unrolled = weights.load_start("random", config, seed=0, contract=contract)
    assert not unrolled.model.backbone.blocks[0].scan_layers
    assert scanned.fingerprint == unrolled.fingerprint
    # A train-mode pass with momentum 0 (what features.calibrate_batchnorm does) sets the same statistics.
    x = jax.random.normal(jax.random.key(4), (4, 32, 32, 3))
    for start in (scanned, unrolled):
        for norm in batch_norms(start.model):
            norm.momentum = 0.0
        start.model.train()
        start.model(x)
    _assert_trees_close(convert_layout(_pure(scanned.model), TINY, scan_layers=False), _pure(unrolled.model),
                        rtol=1e-5)
