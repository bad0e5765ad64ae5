"""The optimiser a config describes (`config.optim`).

    lr(step) = base_lr x schedule(step) x plateau_scale

- base_lr: `optim.lr`, scaled with the global batch when `optim.lr_scaling` is "linear" or "sqrt"
  (relative to `optim.reference_batch`, CheXNet's 16).
- schedule: "plateau" keeps lr constant (after an optional linear warmup) and lets the trainer divide it by
  10 when the validation loss stops improving (CheXNet's recipe); "cosine" is warmup + cosine decay to 0.
- plateau_scale: an optimiser hyper-parameter (so it is checkpointed with the optimiser state) that the
  trainer sets after each evaluation through `set_plateau_scale`.
Adam (or AdamW with `weight_decay`), optional global-norm gradient clipping.
"""

from __future__ import annotations

import math

import optax


def scaled_lr(optim_config, global_batch: int) -> float:
    factor = global_batch / optim_config.reference_batch
    scaling = {"none": 1.0, "linear": factor, "sqrt": math.sqrt(factor)}
    if optim_config.lr_scaling not in scaling:
        raise ValueError(f"optim.lr_scaling must be one of {sorted(scaling)}, got {optim_config.lr_scaling!r}")
    return optim_config.lr * scaling[optim_config.lr_scaling]


def lr_schedule(optim_config, global_batch: int, total_steps: int) -> optax.Schedule:
    lr = scaled_lr(optim_config, global_batch)
    warmup = optim_config.warmup_steps
    if optim_config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1))
    if optim_config.schedule == "plateau":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"optim.schedule must be 'plateau' or 'cosine', got {optim_config.schedule!r}")


def make_optimizer(optim_config, global_batch: int, total_steps: int) -> optax.GradientTransformation:
    schedule = lr_schedule(optim_config, global_batch, total_steps)
    parts = []
    if optim_config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
    if optim_config.name == "adam":
        parts.append(optax.adam(schedule, b1=optim_config.b1, b2=optim_config.b2))
    elif optim_config.name == "adamw":
        parts.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                                 weight_decay=optim_config.weight_decay))
    else:
        raise ValueError(f"optim.name must be 'adam' or 'adamw', got {optim_config.name!r}")
    if optim_config.weight_decay and optim_config.name == "adam":
        raise ValueError("optim.weight_decay needs optim.name='adamw' (decoupled weight decay)")
    parts.append(optax.inject_hyperparams(optax.scale)(step_size=1.0))  # the plateau scale, last
    return optax.chain(*parts)


def plateau_scale(opt_state) -> float:
    return float(opt_state[-1].hyperparams["step_size"])


def set_plateau_scale(opt_state, value: float) -> None:
    """Set the plateau factor in place (on an nnx.Optimizer's opt_state)."""
    hp = opt_state[-1].hyperparams
    hp["step_size"] = hp["step_size"] * 0 + value  # keep dtype and sharding


def learning_rate(optim_config, global_batch: int, total_steps: int, step: int, opt_state) -> float:
    return float(lr_schedule(optim_config, global_batch, total_steps)(step)) * plateau_scale(opt_state)


class Plateau:
    """CheXNet's reduce-on-plateau on the validation loss, as plain state the trainer checkpoints."""

    def __init__(self, factor: float, patience: int, best: float = math.inf, bad_evals: int = 0):
        self.factor, self.patience, self.best, self.bad_evals = factor, patience, best, bad_evals

    def update(self, val_loss: float, scale: float) -> float:
        """Return the new plateau scale after an evaluation with `val_loss`."""
        if val_loss < self.best:
            self.best, self.bad_evals = val_loss, 0
            return scale
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.bad_evals = 0
            return scale * self.factor
        return scale

    def state(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals}
