"""The deployable TB model a transfer run ends with: one start and method, fitted on every training image.

    spec = deploy_spec(config, starts, protocol_names, methods)     # checked before any work (None: no model)
    card = fit_and_save(spec, ...)                                   # after the comparison -> WORKDIR/model/

What is deployed is chosen by the config, never by test results: `deploy.start` (a start's name; "" = the
weights under study, `init_from`; a baselines-only run then deploys nothing; "none" = no model),
`deploy.method` ("probe" or "finetune"; "" = fine-tuning when the run fine-tunes, else the probe) and
`deploy.protocol` ("" = the first of config.protocols), whose TRAINING set is fitted on every image
(cv_shenzhen and shenzhen_to_montgomery both train on all of Shenzhen).

- Threshold: chosen on the out-of-fold predictions of the training data, i.e. the pooled held-out predictions of
  the same start and method in the cross-validation protocol within the training set (`cv_<training set>`, which
  must be among config.protocols), by `deploy.threshold_rule`: "sensitivity" (default: the largest threshold
  with sensitivity >= screening.sensitivity, 0.9, WHO's triage target) or "youden".
- Probe: the probe refitted on all training features (inner CV chooses the L2 strength, as in every split),
  its weights on standardised features folded into a linear TB head on the start's frozen backbone.
- Fine-tuning: no validation part is left, so training runs for the median best epoch of the cross-validation
  folds that were fine-tuned; then the BatchNorm statistics are recomputed on all the training images (precise
  BN, as every fine-tuned prediction of the comparison; `finetune.bn_stats="target"` adaptation needs the
  target images, which a deployed model does not have, so deployment always uses the training images).
- Saved as a model directory (`metachex_jax.saved_model`, kind "tb_classifier"): `predict --model=WORKDIR` uses
  it, `export` exports it. Its card records the start, method, training data, threshold and how it was chosen,
  the out-of-fold operating point, and the comparison's AUROC (with 95% CI) of the same cell in every protocol.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging
from flax import nnx

from metachex_jax import files, metrics, saved_model
from metachex_jax.models.tb_classifier import TbClassifier, fold_standardisation
from metachex_jax.transfer import protocols as protocols_lib

THRESHOLD_RULES = ("sensitivity", "youden")


@dataclasses.dataclass(frozen=True)
class DeploySpec:
    start: str
    method: str
    protocol: str
    train_set: str
    cv_protocol: str  # where the out-of-fold predictions (threshold) and best epochs come from
    threshold_rule: str


def deploy_spec(config, starts, protocol_names: list[str], methods: list[str]) -> DeploySpec | None:
    """The deployment config checked against the run (every problem at once); None when deploy.start="none"."""
    d = config.deploy
    if d.start == "none" or (not d.start and not config.init_from.strip()):
        return None
    names = [s.name for s in starts]
    start = d.start or names[0]  # init_from's start comes first
    method = d.method or ("finetune" if "finetune" in methods else "probe")
    protocol = d.protocol or protocol_names[0]
    problems = []
    if start not in names:
        problems.append(f"deploy.start={start!r} is not among this run's starts {names}")
    elif method == "finetune" and next(s for s in starts if s.name == start).kind == "random_bn":
        problems.append(f"deploy.start={start!r} is a probe-only baseline; deploy it with deploy.method=probe")
    if method not in methods:
        problems.append(f"deploy.method={method!r} is not among this run's methods {methods}")
    if d.threshold_rule not in THRESHOLD_RULES:
        problems.append(f"deploy.threshold_rule={d.threshold_rule!r}; expected one of {THRESHOLD_RULES}")
    train_set = cv_protocol = ""
    if protocol not in protocol_names:
        problems.append(f"deploy.protocol={protocol!r} is not among this run's protocols {protocol_names}")
    else:
        train_set = protocols_lib.PROTOCOLS[protocol][0]
        cv_protocol = f"cv_{train_set}"
        if cv_protocol not in protocol_names:
            problems.append(f"deploy.protocol={protocol!r} trains on {train_set}; its threshold and (fine-tuning) "
                            f"epoch count come from {cv_protocol}, which must be among config.protocols")
    if problems:
        raise ValueError("the deployable model cannot be made as configured (config.deploy):\n  "
                         + "\n  ".join(problems))
    return DeploySpec(start, method, protocol, train_set, cv_protocol, d.threshold_rule)


def choose_threshold(spec: DeploySpec, y: np.ndarray, prob: np.ndarray, screening: dict) -> dict:
    """The decision threshold on out-of-fold predictions, and the operating point it gives there."""
    if spec.threshold_rule == "sensitivity":
        threshold = metrics.threshold_at_sensitivity(y, prob, screening["sensitivity"])
        rule = f"largest threshold with out-of-fold sensitivity >= {screening['sensitivity']:g} (WHO triage target)"
    else:
        threshold = metrics.youden_threshold(y, prob)
        rule = "Youden's J on the out-of-fold predictions"
    return {"threshold": float(threshold), "rule": spec.threshold_rule, "description": rule,
            "chosen_on": f"{spec.cv_protocol} out-of-fold predictions of {spec.start}/{spec.method} "
                         f"({len(y)} images, {int(np.sum(y))} TB)",
            "oof_sensitivity": float(metrics.sensitivity(y, prob, threshold)),
            "oof_specificity": float(metrics.specificity(y, prob, threshold))}


def fit_and_save(spec: DeploySpec, config, workdir: str, *, starts, tb_sets, tables, columns, cells, details,
                 settings, tuner) -> dict:
    """Fit the deployable model (every process: fine-tuning steps are collective), save it under WORKDIR/model/
    (the lead process) and return a summary of its card."""
    start = next(s for s in starts if s.name == spec.start)
    key = f"{spec.start}/{spec.method}"
    oof = columns[spec.cv_protocol][key]
    threshold = choose_threshold(spec, oof["tb"], oof["prob"], config.screening.to_dict())
    tb_set = tb_sets[spec.train_set]
    training = {"start": spec.start, "start_info": start.info, "method": spec.method, "protocol": spec.protocol,
                "dataset": spec.train_set, "build": str(tb_set.build_dir), "n_images": len(tb_set),
                "n_tb": int(tb_set.tb.sum())}
    if spec.method == "probe":
        from metachex_jax.transfer.probe import fit_probe

        table = tables[spec.start, spec.train_set]
        fit = fit_probe(table["features"], tb_set.tb, table["features"][:0], settings)
        model = TbClassifier(nnx.clone(start.model.backbone), nnx.Rngs(0))
        kernel, bias = fold_standardisation(fit.weights, fit.bias, fit.mean, fit.scale)
        model.tb_head.kernel[...], model.tb_head.bias[...] = kernel, bias
        training |= {"l2": fit.l2, "converged": fit.converged, "backbone": "frozen (the start's weights)"}
    else:
        best_epochs = details[key][spec.cv_protocol]["best_epoch"]
        epochs = int(np.ceil(np.median(best_epochs)))
        model = tuner.fit_all(start, tb_set.source, epochs, f"{spec.start} deployable model on all of "
                                                            f"{spec.train_set}")
        training |= {"epochs": epochs, "cv_best_epochs": best_epochs,
                     "batchnorm": f"statistics recomputed on all {len(tb_set)} training images",
                     "effective_lr": tuner.effective_lr}
    model.eval()
    card = {
        "kind": "tb_classifier",
        # The start's pixel contract (its normalisation also fixes the stem's input channels).
        "model_config": {"arch": config.model.arch, "normalization": start.contract.normalization},
        "input": start.contract.to_json(),
        "outputs": [{"name": "tb", "kind": "probability", "threshold": threshold["threshold"]}],
        "threshold_rule": threshold,
        "training": training,
        "metrics": {protocol: {"auroc": cell["auroc"]} for protocol, cell in cells.get(key, {}).items()},
        "source": {"transfer_workdir": workdir, "demo_data": bool(config.demo)},
        "intended_use": "research; TB screening operating point chosen on training data only",
    }
    model_dir = files.join(workdir, "model")
    if jax.process_index() == 0:
        saved_model.save(model_dir, model, card)
    logging.info("deployable TB model (%s, trained on all of %s, threshold %.4f) saved to %s", key, spec.train_set,
                 threshold["threshold"], model_dir)
    return {"path": model_dir, **{k: card[k] for k in ("threshold_rule", "training", "metrics")}}
