"""Fine-tuning for a binary target (TB by default): the starting backbone + a new one-logit head, trained end to
end on one split.

    tuner = Finetuner(settings, seed=seed)                   # builds the jitted steps once per model and contract
    result = tuner.run(start, split, sets)                   # -> FinetuneResult(test_prob, val_prob, ...)

- Model: `TbClassifier(backbone=copy of the start's DenseNet, tb_head=Linear(F, 1))` (the head keeps its TB name
  whatever the target), binary cross-entropy.
- Optimiser: `optax.multi_transform` of two `optim.make_optimizer` (the pretraining optimiser, config
  `finetune.optim`), one with `finetune.backbone_lr` for the backbone and one with `finetune.head_lr` for the head.
  The rates are used as written unless `finetune.optim.lr_scaling` says otherwise (default "none"); the effective
  rates are logged and reported either way (`Finetuner.effective_lr`). The schedule is constant after the warmup
  (`plateau` without reductions), so every split of a run shares one compiled step whatever its length.
- Data: the split's training records minus its validation part (protocols.Split.fit), through the same grain
  pipeline and augmentation as pretraining (`pipeline.train_batches(kind="binary")`), global batches on the mesh,
  made by the start's pixel contract (`Start.contract`: its size, geometry and normalisation).
- BatchNorm: training normalises with batch statistics; the running averages it leaves behind (momentum 0.9)
  would, after the few dozen steps a TB split allows, still hold much of the START's statistics (mean 0 /
  variance 1 for a random start), and evaluation would depend on them. So before EVERY prediction the
  statistics are recomputed for the current weights ("precise BN", `features.calibrate_batchnorm`, batches of
  `finetune.batch_size`, centre crops): on the fit images for early stopping, and for the test images as
  `finetune.bn_stats` says: "fit" (default) the fit images; "target" the unlabelled test images themselves
  (test-time BatchNorm adaptation, "AdaBN") in the cross-dataset protocols. Within a dataset the fit images
  are always used (they come from the same distribution). Every start is treated alike, so a start that
  differs only in its BatchNorm statistics (`random_bn` vs `random`) fine-tunes to identical predictions.
- Early stopping: validation AUROC after every epoch (fit-image statistics); the best epoch's weights are kept
  (in host memory) and training stops after `patience` epochs without improvement or after `num_epochs`. The
  validation predictions of the kept weights are returned (the caller chooses decision thresholds on them),
  made by the TEST predictions' rule so that a threshold is chosen as it is applied: with "target" the
  validation images are normalised by their own statistics, as the test images are by theirs. Then the test
  records are predicted.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import errors, sharding
from metachex_jax.data.input import pipeline
from metachex_jax.data.input.augment import Augmentation
from metachex_jax.evaluation import metrics
from metachex_jax.models.tb_classifier import TbClassifier
from metachex_jax.training import optim
from metachex_jax.training import steps as train_steps
from metachex_jax.transfer.features import calibrate_batchnorm
from metachex_jax.transfer.sets import RecordSubset

BN_STATS = ("fit", "target")


@dataclasses.dataclass
class FinetuneResult:
    test_prob: np.ndarray  # P(TB) of the split's test records
    val_prob: np.ndarray  # P(TB) of its validation records, best epoch, BatchNorm as for the test records
    # (thresholds are chosen on these)
    val_y: np.ndarray
    best_epoch: int
    epochs_run: int
    val_auroc: list[float]  # per epoch
    bn_images: dict  # images the statistics of val_prob / test_prob were recomputed on: {"validation": n, "test": n}
    test_bn_stats: str  # where the test predictions' statistics came from: "fit" or "target"
    seconds: float
    state: train_steps.TrainState  # host copy of the kept weights, statistics recomputed on the fit images


def _part_configs(settings) -> dict:
    """The optimiser config of each parameter group: the shared `finetune.optim` with that group's lr."""
    parts = {}
    for part, lr in (("backbone", settings.backbone_lr), ("tb_head", settings.head_lr)):
        cfg = ml_collections.ConfigDict(settings.optim.to_dict())
        cfg.lr = float(lr)
        cfg.schedule = "plateau"  # constant after warmup; early stopping decides the length
        parts[part] = cfg
    return parts


def effective_learning_rates(settings, global_batch: int) -> dict[str, float]:
    """The rates the optimiser really uses (after `finetune.optim.lr_scaling`, before any warmup)."""
    return {part: optim.scaled_lr(cfg, global_batch) for part, cfg in _part_configs(settings).items()}


def make_optimizer(settings, global_batch: int) -> optax.GradientTransformation:
    """Backbone and head optimisers (the pretraining one, each with its own lr), selected by parameter path."""
    parts = {part: optim.make_optimizer(cfg, global_batch, total_steps=1)
             for part, cfg in _part_configs(settings).items()}

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key), params)

    return optax.multi_transform(parts, labels)


class Finetuner:
    def __init__(self, settings, *, seed: int):
        self.settings, self.seed = settings, seed
        self.mesh = sharding.make_mesh()
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        self.global_batch = settings.batch_size
        if self.global_batch % jax.device_count():
            raise ValueError(f"finetune.batch_size={self.global_batch} must be a multiple of the "
                             f"{jax.device_count()} devices")
        self.eval_batch = -(-settings.eval_batch_size // jax.device_count()) * jax.device_count()
        if settings.bn_stats not in BN_STATS:
            raise ValueError(f"finetune.bn_stats must be one of {BN_STATS}, got {settings.bn_stats!r}")
        self.tx = make_optimizer(settings, self.global_batch)
        self.effective_lr = effective_learning_rates(settings, self.global_batch)
        logging.info("fine-tuning learning rates (finetune.optim.lr_scaling=%r, global batch %d): %s",
                     settings.optim.lr_scaling, self.global_batch, self.effective_lr)
        self._steps = []  # [((graphdef, contract), (train_step, predict_step))]: compiled once per model and contract

    def _compiled(self, graphdef, contract: PixelContract):
        for known, steps in self._steps:  # (a GraphDef compares by value but is not hashable)
            if known == (graphdef, contract):
                return steps
        tx = self.tx

        def train_step(state, batch):
            def loss_fn(params):
                model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
                model.train()
                logits = model(contract.model_input(batch["image"]))
                per_example = optax.sigmoid_binary_cross_entropy(logits, batch["target"])
                mask = batch["example_mask"]
                loss = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
                _, _, new_stats = nnx.split(model, nnx.Param, ...)
                return loss, new_stats

            (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return train_steps.TrainState(state.step + 1, params, new_stats, opt_state), loss

        def predict_step(state, images):
            model = nnx.merge(graphdef, state.params, state.batch_stats)
            model.eval()
            return jax.nn.sigmoid(model(contract.model_input(images)))

        steps = (jax.jit(train_step, donate_argnums=0, out_shardings=(self.replicated, self.replicated)),
                 jax.jit(predict_step))
        self._steps.append(((graphdef, contract), steps))
        return steps

    def predict(self, predict_step, state, source, contract: PixelContract) -> np.ndarray:
        """P(TB) for every record of `source`, in record order."""
        probs, index = [], []
        with pipeline.eval_batches(source, kind="binary", global_batch_size=self.eval_batch,
                                   image_size=contract.image_size, geometry=contract.geometry) as batches:
            for local in batches:
                batch = sharding.to_global({k: local[k] for k in ("image", "index", "example_mask")},
                                        self.data_sharding)
                prob = predict_step(state, batch["image"])
                got = multihost_utils.process_allgather(
                    {"prob": prob, "index": batch["index"], "mask": batch["example_mask"]}, tiled=True)
                real = np.asarray(got["mask"]) > 0
                probs.append(np.asarray(got["prob"])[real])
                index.append(np.asarray(got["index"])[real])
        probs, index = np.concatenate(probs), np.concatenate(index)
        return probs[np.argsort(index, kind="stable")].astype(np.float64)

    def with_precise_batchnorm(self, graphdef, state, source, contract: PixelContract
                               ) -> tuple[train_steps.TrainState, int]:
        """`state` with its BatchNorm statistics recomputed on the images of `source` for its current weights
        (and the number of images used); `state` itself is unchanged. Full batches of `finetune.batch_size`, or
        one batch of all of them (to a multiple of the devices) when `source` holds fewer (a small validation
        part under bn_stats=target)."""
        model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
        devices = jax.device_count()
        batch = min(self.global_batch, max(len(source) // devices, 1) * devices)
        used = calibrate_batchnorm(model.backbone, source, kind="binary", contract=contract, batch_size=batch,
                                   max_images=len(source))
        _, _, stats = nnx.split(model, nnx.Param, ...)
        return state.replace(batch_stats=jax.device_put(stats, self.replicated)), used

    def new_model(self, start):
        """(graphdef, replicated state) of a TbClassifier on a copy of the start's backbone with a new head."""
        model = TbClassifier(nnx.clone(start.model.backbone), nnx.Rngs(self.seed))
        graphdef, state = train_steps.create(model, self.tx)
        # A copy: the train step donates its state, and the start's own arrays serve the next split too.
        return graphdef, jax.device_put(jax.tree.map(jnp.copy, state), self.replicated)

    def epochs(self, graphdef, state, fit, contract: PixelContract, seed: int, what: str):
        """Train on `fit` (images made by `contract`) epoch by epoch: yields (epoch, state) after each. The next
        epoch donates that state, so copy what you keep before asking for it."""
        s = self.settings
        steps_per_epoch = len(fit) // self.global_batch
        if steps_per_epoch == 0:
            raise ValueError(f"{what}: {len(fit)} training images, fewer than one batch ({self.global_batch}); "
                             "lower finetune.batch_size")
        train_step, _ = self._compiled(graphdef, contract)
        with pipeline.train_batches(fit, kind="binary", global_batch_size=self.global_batch,
                                    image_size=contract.image_size, seed=seed, geometry=contract.geometry,
                                    augmentation=Augmentation(**s.augment)) as batches:
            for epoch in range(1, s.num_epochs + 1):
                for _ in range(steps_per_epoch):
                    state, loss = train_step(state, sharding.to_global(next(batches), self.data_sharding))
                loss = float(loss)
                if not np.isfinite(loss):
                    raise errors.NonFiniteLossError(f"fine-tuning {what}: loss is {loss} in epoch {epoch}")
                logging.info("finetune %s epoch %d: train loss %.4f", what, epoch, loss)
                yield epoch, state

    def run(self, start, split, sets) -> FinetuneResult:
        s = self.settings
        began = time.perf_counter()
        train_set, test_set = sets[split.train_set], sets[split.test_set]
        fit = RecordSubset(train_set.source, split.fit)
        validation = RecordSubset(train_set.source, split.validation)
        test = RecordSubset(test_set.source, split.test)
        graphdef, state = self.new_model(start)
        contract = start.contract
        _, predict_step = self._compiled(graphdef, contract)
        val_y = train_set.y[split.validation]

        best = (-np.inf, 0, None)  # (validation AUROC, epoch, host copy of the state)
        history = []
        what = f"{start.name} {split.protocol} fold {split.fold}"
        for epoch, state in self.epochs(graphdef, state, fit, contract, self.seed * 1000 + max(split.fold, 0), what):
            # Evaluate a copy with precise statistics; training continues from `state` unchanged.
            evaluated, fit_images = self.with_precise_batchnorm(graphdef, state, fit, contract)
            auroc = float(metrics.roc_auc(val_y, self.predict(predict_step, evaluated, validation, contract)))
            history.append(auroc)
            logging.info("finetune %s epoch %d: validation AUROC %.4f", what, epoch, auroc)
            if auroc > best[0]:
                best = (auroc, epoch, jax.device_get(evaluated))
            elif epoch - best[1] >= s.patience:
                break
            del evaluated  # shares the weights `state` donates to the next step
        kept = jax.device_put(best[2], self.replicated)
        # The validation predictions the thresholds are chosen on are made by the test predictions' rule: with
        # "target", each part normalised by its own images' statistics (the validation images', the test images').
        test_bn_stats = "target" if s.bn_stats == "target" and split.train_set != split.test_set else "fit"
        if test_bn_stats == "target":
            validated, val_images = self.with_precise_batchnorm(graphdef, kept, validation, contract)
            tested, test_images = self.with_precise_batchnorm(graphdef, kept, test, contract)
        else:
            (validated, val_images), (tested, test_images) = (kept, fit_images), (kept, fit_images)
        val_prob = self.predict(predict_step, validated, validation, contract)
        test_prob = self.predict(predict_step, tested, test, contract)
        return FinetuneResult(test_prob=test_prob, val_prob=val_prob, val_y=val_y, best_epoch=best[1],
                              epochs_run=len(history), val_auroc=history,
                              bn_images={"validation": val_images, "test": test_images},
                              test_bn_stats=test_bn_stats, seconds=time.perf_counter() - began, state=best[2])

    def fit_all(self, start, source, num_epochs: int, what: str, seed_offset: int = 999):
        """Fine-tune on every record of `source` for exactly `num_epochs` epochs (no validation part: the
        deployable model), then recompute the BatchNorm statistics on those records. Returns the TbClassifier.
        `seed_offset` 0 retraces `run`'s training of a split without folds (a fixed split's deployed model is
        the comparison's own: the same records, seed and epochs)."""
        graphdef, state = self.new_model(start)
        if not 1 <= num_epochs <= self.settings.num_epochs:
            raise ValueError(f"{what}: {num_epochs} epochs; expected 1..finetune.num_epochs")
        for epoch, state in self.epochs(graphdef, state, source, start.contract, self.seed * 1000 + seed_offset,
                                        what):
            if epoch == num_epochs:
                kept = jax.tree.map(jnp.copy, state)
                break
        kept, _ = self.with_precise_batchnorm(graphdef, kept, source, start.contract)
        return train_steps.model_of(graphdef, jax.device_get(kept))
