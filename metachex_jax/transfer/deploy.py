"""The deployable model a transfer run ends with (TB by default): one start and method, fitted on every training
image of one protocol column (its target).

    spec = deploy_spec(config, starts, column_protocols, column_targets, methods)   # checked first (None: no model)
    card = fit_and_save(spec, ...)                                   # after the comparison -> WORKDIR/model/

What is deployed is chosen by the config, never by test results: `deploy.start` (a start's name; "" = the
weights under study, `init_from`; a baselines-only run then deploys nothing; "none" = no model),
`deploy.method` ("probe" or "finetune"; "" = fine-tuning when the run fine-tunes, else the probe) and
`deploy.protocol` (a report column: a protocol, `<protocol>.<target>` with several targets; "" = the first),
whose TRAINING set, one dataset, is fitted on every image with a known target (cv_shenzhen and
shenzhen_to_montgomery both train on all of Shenzhen). The model's output is named "tb" for Tuberculosis, else
after the target, and that one name is the card's output, the classifier's output (Grad-CAM), predict's CSV
column and heatmap file name.

- Threshold: chosen on the out-of-fold predictions of the training data, i.e. the pooled held-out predictions of
  the same start and method in the cross-validation protocol within the training set (`cv_<training set>` for the
  same target, which must be among the run's columns), by `deploy.threshold_rule`: "sensitivity" (default: the
  largest threshold with sensitivity >= screening.sensitivity, 0.9, WHO's triage target) or "youden".
- Probe: the probe refitted on all training features (inner CV chooses the L2 strength, as in every split),
  its weights on standardised features folded into a linear TB head on the start's frozen backbone.
- Fine-tuning: no validation part is left, so training runs for the median best epoch of the cross-validation
  folds that were fine-tuned; then the BatchNorm statistics are recomputed on all the training images (precise
  BN, as every fine-tuned prediction of the comparison; `finetune.bn_stats="target"` adaptation needs the
  target images, which a deployed model does not have, so deployment always uses the training images).
- Saved as a model directory (`metachex_jax.models.saved`, kind "tb_classifier"): `predict --model=WORKDIR` uses
  it, `export` exports it. Its card records the start, method, training data, threshold and how it was chosen,
  the out-of-fold operating point, and the comparison's AUROC (with 95% CI) of the same cell in every protocol.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging
from flax import nnx

from metachex_jax.core import files
from metachex_jax.evaluation import metrics
from metachex_jax.models import saved
from metachex_jax.models.tb_classifier import TbClassifier, fold_standardisation
from metachex_jax.transfer import sets as sets_lib
from metachex_jax.transfer.probe import fit_probe

THRESHOLD_RULES = ("sensitivity", "youden")


@dataclasses.dataclass(frozen=True)
class DeploySpec:
    start: str
    method: str
    protocol: str  # the report column deployed
    target: str
    train_set: str
    cv_protocol: str  # the column whose out-of-fold predictions (threshold) and best epochs are used
    threshold_rule: str

    @property
    def output_name(self) -> str:
        return "tb" if self.target == sets_lib.TB_TARGET else self.target


def deploy_spec(config, starts, column_protocols: dict, column_targets: dict[str, str],
                methods: list[str]) -> DeploySpec | None:
    """The deployment config checked against the run (every problem at once); None when deploy.start="none"."""
    d = config.deploy
    if d.start == "none" or (not d.start and not config.init_from.strip()):
        return None
    names = [s.name for s in starts]
    protocol_names = list(column_protocols)
    start = d.start or names[0]  # init_from's start comes first
    method = d.method or ("finetune" if "finetune" in methods else "probe")
    protocol = d.protocol or (protocol_names[0] if protocol_names else "")
    problems = []
    if start not in names:
        problems.append(f"deploy.start={start!r} is not among this run's starts {names}")
    elif method == "finetune" and next(s for s in starts if s.name == start).kind == "random_bn":
        problems.append(f"deploy.start={start!r} is a probe-only baseline; deploy it with deploy.method=probe")
    if method not in methods:
        problems.append(f"deploy.method={method!r} is not among this run's methods {methods}")
    if d.threshold_rule not in THRESHOLD_RULES:
        problems.append(f"deploy.threshold_rule={d.threshold_rule!r}; expected one of {THRESHOLD_RULES}")
    train_set = cv_protocol = target = ""
    if protocol not in column_protocols:
        problems.append(f"deploy.protocol={protocol!r} is not among this run's protocols {protocol_names}")
    else:
        train_set, target = column_protocols[protocol].train_set, column_targets[protocol]
        cv = [c for c, p in column_protocols.items()
              if p.within and p.test == train_set and column_targets[c] == target]
        cv_protocol = cv[0] if cv else ""
        if not cv:
            problems.append(f"deploy.protocol={protocol!r} trains on {train_set}; its threshold and (fine-tuning) "
                            f"epoch count come from cv_{train_set} for {target}, which must be among the run's "
                            "protocols (a training set of several datasets has none: deploy another protocol)")
    if problems:
        raise ValueError("the deployable model cannot be made as configured (config.deploy):\n  "
                         + "\n  ".join(problems))
    return DeploySpec(start, method, protocol, target, train_set, cv_protocol, d.threshold_rule)


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
                         f"({len(y)} images, {int(np.sum(y))} {spec.target})",
            "oof_sensitivity": float(metrics.sensitivity(y, prob, threshold)),
            "oof_specificity": float(metrics.specificity(y, prob, threshold))}


def fit_and_save(spec: DeploySpec, config, workdir: str, *, starts, view, tables, columns, cells, details,
                 settings, tuner, start_choice: str = "") -> dict:
    """Fit the deployable model (every process: fine-tuning steps are collective), save it under WORKDIR/model/
    (the lead process) and return a summary of its card. `view`: the training set's images of the target
    (sets.TransferSet); `tables`: the start's feature tables per dataset (features.py); `start_choice`: why this
    run of a start with several runs (groups.resolve_deploy), recorded in the card."""
    start = next(s for s in starts if s.name == spec.start)
    key = f"{spec.start}/{spec.method}"
    oof = columns[spec.cv_protocol][key]
    threshold = choose_threshold(spec, oof["label"], oof["prob"], config.screening.to_dict())
    training = {"start": spec.start, "start_info": start.info, "method": spec.method, "protocol": spec.protocol,
                "target": spec.target, "dataset": spec.train_set, "n_images": len(view),
                "n_positive": int(view.y.sum())}
    if start_choice:
        training["start_choice"] = start_choice
    if spec.method == "probe":
        features = sets_lib.features_of(tables, view)
        fit = fit_probe(features, view.y, features[:0], settings, groups=view.patient)
        model = TbClassifier(nnx.clone(start.model.backbone), nnx.Rngs(0))
        kernel, bias = fold_standardisation(fit.weights, fit.bias, fit.mean, fit.scale)
        model.tb_head.kernel[...], model.tb_head.bias[...] = kernel, bias
        training |= {"l2": fit.l2, "converged": fit.converged, "backbone": "frozen (the start's weights)"}
    else:
        best_epochs = details[key][spec.cv_protocol]["best_epoch"]
        epochs = int(np.ceil(np.median(best_epochs)))
        model = tuner.fit_all(start, view.source, epochs, f"{spec.start} deployable model on all of "
                                                          f"{spec.train_set}")
        training |= {"epochs": epochs, "cv_best_epochs": best_epochs,
                     "batchnorm": f"statistics recomputed on all {len(view)} training images",
                     "effective_lr": tuner.effective_lr}
    model.output_name = spec.output_name  # fine-tuning trains it as "tb"; it is deployed under the target's name
    model.eval()
    card = {
        "kind": "tb_classifier",
        # The start's pixel contract (its normalisation also fixes the stem's input channels).
        "model_config": {"arch": config.model.arch, "normalization": start.contract.normalization,
                         "output_name": spec.output_name},
        "input": start.contract.to_json(),
        "outputs": [{"name": spec.output_name, "kind": "probability", "threshold": threshold["threshold"]}],
        "threshold_rule": threshold,
        "training": training,
        "metrics": {protocol: {"auroc": cell["auroc"]} for protocol, cell in cells.get(key, {}).items()},
        "source": {"transfer_workdir": workdir, "demo_data": bool(config.demo)},
        "intended_use": f"research; {spec.target} screening operating point chosen on training data only",
    }
    model_dir = files.join(workdir, "model")
    if jax.process_index() == 0:
        saved.save(model_dir, model, card)
    logging.info("deployable %s model (%s, trained on all of %s, threshold %.4f) saved to %s", spec.target, key,
                 spec.train_set, threshold["threshold"], model_dir)
    return {"path": model_dir, **{k: card[k] for k in ("threshold_rule", "training", "metrics")}}
