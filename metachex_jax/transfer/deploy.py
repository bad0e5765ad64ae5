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
- A fixed split (`split_<dataset>`) deploys the comparison's own model of that split, fitted on its train split
  and chosen on its validation split (the probe's strength; fine-tuning's best epoch, retraced with the same
  seed), with the threshold chosen on its validation predictions; no cv_<dataset> is needed.
- Probe: the probe refitted on all training features (inner CV chooses the L2 strength, as in every split),
  its weights on standardised features folded into a linear TB head on the start's frozen backbone.
- Fine-tuning: no validation part is left, so training runs for the median best epoch of the cross-validation
  folds that were fine-tuned; then the BatchNorm statistics are recomputed on all the training images (precise
  BN, as every fine-tuned prediction of the comparison; `finetune.bn_stats="target"` adaptation needs the
  target images, which a deployed model does not have, so deployment always uses the training images).
- Calibrator: Platt scaling (contract/calibration.py) fitted on the same out-of-fold predictions, in the card's
  output entry; `predict --calibrated` adds the calibrated probability (the decision stays at the threshold: the
  map is increasing, so the operating point is the same on either scale).
- OOD description (contract/ood.py, `deploy.ood_quantile`; 0 = none): the deployed model's pooled features of
  every training image; the threshold from their out-of-fold distances (each CV fold under the description of the
  other folds), in `ood.npz` beside the card. A fine-tuned backbone was fitted on those images, so their
  distances may run smaller than new images' alike: expect flag rates above the nominal one (a probe's backbone
  is the start's, never fitted on them).
- Saved as a model directory (`metachex_jax.models.saved`, kind "tb_classifier"): `predict --model=WORKDIR` uses
  it, `export` exports it. Its card records the start, method, training data, threshold and how it was chosen,
  the out-of-fold operating point, the calibrator, the OOD description, and the comparison's AUROC (with 95% CI)
  of the same cell in every protocol.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging
from flax import nnx

from metachex_jax.contract import ood
from metachex_jax.contract.calibration import fit_platt
from metachex_jax.core import files
from metachex_jax.evaluation import metrics
from metachex_jax.models import saved
from metachex_jax.models.tb_classifier import TbClassifier, fold_standardisation
from metachex_jax.transfer import features as features_lib
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
    fixed_split: bool = False  # a split_<dataset> column: its own validation split chooses (module docstring)

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
        if column_protocols[protocol].fixed_split:
            cv = [protocol]  # its own validation split gives the threshold and the epochs
        cv_protocol = cv[0] if cv else ""
        if not cv:
            problems.append(f"deploy.protocol={protocol!r} trains on {train_set}; its threshold and (fine-tuning) "
                            f"epoch count come from cv_{train_set} for {target}, which must be among the run's "
                            "protocols (a training set of several datasets has none: deploy another protocol)")
    if problems:
        raise ValueError("the deployable model cannot be made as configured (config.deploy):\n  "
                         + "\n  ".join(problems))
    return DeploySpec(start, method, protocol, target, train_set, cv_protocol, d.threshold_rule,
                      column_protocols[protocol].fixed_split)


def choose_threshold(spec: DeploySpec, y: np.ndarray, prob: np.ndarray, screening: dict) -> dict:
    """The decision threshold on out-of-fold predictions, and the operating point it gives there."""
    if spec.threshold_rule == "sensitivity":
        threshold = metrics.threshold_at_sensitivity(y, prob, screening["sensitivity"])
        rule = f"largest threshold with out-of-fold sensitivity >= {screening['sensitivity']:g} (WHO triage target)"
    else:
        threshold = metrics.youden_threshold(y, prob)
        rule = "Youden's J on the out-of-fold predictions"
    return {"threshold": float(threshold), "rule": spec.threshold_rule, "description": rule,
            "chosen_on": f"{spec.cv_protocol} {'validation' if spec.fixed_split else 'out-of-fold'} predictions "
                         f"of {spec.start}/{spec.method} ({len(y)} images, {int(np.sum(y))} {spec.target})",
            "oof_sensitivity": float(metrics.sensitivity(y, prob, threshold)),
            "oof_specificity": float(metrics.specificity(y, prob, threshold))}


def ood_description(spec: DeploySpec, model, start, view, config) -> ood.FeatureReference:
    """The deployed model's OOD description: its features of every training image (`view`), the threshold from
    their out-of-fold distances over the training set's CV folds; for a dataset's fixed split (split_<dataset>),
    its features of the train split's images, the threshold from the validation split's distances."""
    table, _ = features_lib.extract(model, view.source, contract=start.contract, batch_size=config.feature_batch_size)
    if spec.fixed_split:
        part = np.asarray(view.split)
        source = {"dataset": spec.train_set, "target": spec.target, "images": int(np.sum(part == "train")),
                  "reference": f"the deployed model's features of the {spec.train_set} train split's images",
                  "heldout": f"its validation split ({int(np.sum(part == 'validation'))} images)"}
        return ood.describe(table["features"][part == "train"], table["features"][part == "validation"],
                            quantile=config.deploy.ood_quantile, source=source)
    source = {"dataset": spec.train_set, "target": spec.target, "images": len(view),
              "reference": f"the deployed model's features of every {spec.train_set} training image",
              "folds": f"{spec.cv_protocol} folds (by patient)"}
    return ood.describe_out_of_fold(table["features"], view.fold, quantile=config.deploy.ood_quantile,
                                    source=source)


def fit_and_save(spec: DeploySpec, config, workdir: str, *, starts, view, tables, columns, cells, details,
                 settings, tuner, validation_predictions=None, start_choice: str = "") -> dict:
    """Fit the deployable model (every process: fine-tuning steps are collective), save it under WORKDIR/model/
    (the lead process) and return a summary of its card. `view`: the training set's images of the target
    (sets.TransferSet); `tables`: the start's feature tables per dataset (features.py); `validation_predictions`:
    {(start/method, column): (labels, probabilities)} of fine-tuning's validation parts (a fixed split's);
    `start_choice`: why this run of a start with several runs (groups.resolve_deploy), recorded in the card."""
    start = next(s for s in starts if s.name == spec.start)
    key = f"{spec.start}/{spec.method}"
    if spec.fixed_split:
        model, threshold, training, scores = _fixed_split_model(spec, config, start, key, view, tables, details,
                                                                settings, tuner, validation_predictions or {})
    else:
        model, threshold, training, scores = _model_on_every_image(spec, config, start, key, view, tables, columns,
                                                                   details, settings, tuner)
    training = {"start": spec.start, "start_info": start.info, "method": spec.method, "protocol": spec.protocol,
                "target": spec.target, "dataset": spec.train_set, **training}
    if start_choice:
        training["start_choice"] = start_choice
    return _save(spec, config, workdir, start, view, key, model, threshold, scores, training, cells)


def _fixed_split_model(spec: DeploySpec, config, start, key, view, tables, details, settings, tuner,
                       validation_predictions):
    """The comparison's model of a split_<dataset> column: fitted on the train split, chosen on validation."""
    part = np.asarray(view.split)
    rows = np.flatnonzero((part == "train") | (part == "validation"))
    validation = part[rows] == "validation"
    training = {"n_images": int((~validation).sum()), "n_positive": int(view.y[rows][~validation].sum()),
                "validation_images": int(validation.sum())}
    if spec.method == "probe":
        features = sets_lib.features_of(tables, view)[rows]
        fit = fit_probe(features, view.y[rows], features[:0], settings, groups=view.patient[rows],
                        validation=validation)
        scores = view.y[rows][fit.held_out], fit.train_oof_prob[fit.held_out]
        threshold = choose_threshold(spec, *scores, config.screening.to_dict())
        return _probe_head(start, fit), threshold, {**training, "l2": fit.l2, "converged": fit.converged,
                                                    "backbone": "frozen (the start's weights)"}, scores
    epochs = int(details[key][spec.protocol]["best_epoch"][0])
    y, prob = validation_predictions[key, spec.protocol]
    threshold = choose_threshold(spec, y, prob, config.screening.to_dict())
    model = tuner.fit_all(start, sets_lib.RecordSubset(view.source, rows[~validation]), epochs,
                          f"{spec.start} deployable model on the train split of {spec.train_set}", seed_offset=0)
    return model, threshold, {**training, "epochs": epochs, "effective_lr": tuner.effective_lr,
                              "batchnorm": "statistics recomputed on the train split's images"}, (y, prob)


def _probe_head(start, fit) -> TbClassifier:
    """The probe folded into a linear head on the start's frozen backbone."""
    model = TbClassifier(nnx.clone(start.model.backbone), nnx.Rngs(0))
    kernel, bias = fold_standardisation(fit.weights, fit.bias, fit.mean, fit.scale)
    model.tb_head.kernel[...], model.tb_head.bias[...] = kernel, bias
    return model


def _model_on_every_image(spec: DeploySpec, config, start, key, view, tables, columns, details, settings, tuner):
    """Fitted on every image of the training set; threshold and epochs from cv_<training set>."""
    oof = columns[spec.cv_protocol][key]
    scores = oof["label"], oof["prob"]
    threshold = choose_threshold(spec, *scores, config.screening.to_dict())
    training = {"n_images": len(view), "n_positive": int(view.y.sum())}
    if spec.method == "probe":
        features = sets_lib.features_of(tables, view)
        fit = fit_probe(features, view.y, features[:0], settings, groups=view.patient)
        return _probe_head(start, fit), threshold, {**training, "l2": fit.l2, "converged": fit.converged,
                                                    "backbone": "frozen (the start's weights)"}, scores
    best_epochs = details[key][spec.cv_protocol]["best_epoch"]
    epochs = int(np.ceil(np.median(best_epochs)))
    model = tuner.fit_all(start, view.source, epochs, f"{spec.start} deployable model on all of {spec.train_set}")
    return model, threshold, {**training, "epochs": epochs, "cv_best_epochs": best_epochs,
                              "batchnorm": f"statistics recomputed on all {len(view)} training images",
                              "effective_lr": tuner.effective_lr}, scores


def _save(spec: DeploySpec, config, workdir: str, start, view, key, model, threshold, scores, training,
          cells) -> dict:
    """The model directory: weights and card (threshold, calibrator fitted on `scores`, the predictions the threshold
    was chosen on; OOD description)."""
    model.output_name = spec.output_name  # fine-tuning trains it as "tb"; it is deployed under the target's name
    model.eval()
    platt = fit_platt(*scores, fitted_on=threshold["chosen_on"])
    description = ood_description(spec, model, start, view, config) if config.deploy.ood_quantile else None
    card = {
        "kind": "tb_classifier",
        # The start's pixel contract (its normalisation also fixes the stem's input channels).
        "model_config": {"arch": config.model.arch, "normalization": start.contract.normalization,
                         "output_name": spec.output_name},
        "input": start.contract.to_json(),
        "outputs": [{"name": spec.output_name, "kind": "probability", "threshold": threshold["threshold"],
                     "calibration": platt.to_json()}],
        "threshold_rule": threshold,
        "training": training,
        "metrics": {protocol: {"auroc": cell["auroc"]} for protocol, cell in cells.get(key, {}).items()},
        "source": {"transfer_workdir": workdir, "demo_data": bool(config.demo)},
        "intended_use": f"research; {spec.target} screening operating point chosen on training data only",
    }
    extra = {}
    if description is not None:
        card["ood"], extra[ood.FILE] = description.card_entry(), description.to_bytes()
    model_dir = files.join(workdir, "model")
    if jax.process_index() == 0:
        saved.save(model_dir, model, card, extra)
    logging.info("deployable %s model (%s, trained on %s %s, threshold %.4f) saved to %s", spec.target, key,
                 "the train split of" if spec.fixed_split else "all of", spec.train_set, threshold["threshold"],
                 model_dir)
    return {"path": model_dir, "calibration": platt.to_json(), "ood": card.get("ood"),
            **{k: card[k] for k in ("threshold_rule", "training", "metrics")}}
