"""The transfer comparison, `run(config, workdir)`, read top to bottom as the run happens. TB on Shenzhen and
Montgomery is the default; any prepared datasets and binary targets work (config.protocols, config.targets):

  1. starting weights    config.init_from (required unless config.baselines_only: one run, or several runs
                         as one start) + config.compare_with, as named groups of runs (groups.load_groups; all
                         checked first; "random_bn" gets BatchNorm statistics from ChestX-ray14 training
                         images)
  2. data                every dataset the protocols name, all records (sets.load_datasets), built in the run's
                         pixel geometry (config.model.geometry: a start of another geometry is refused first,
                         sets.geometry_problems); per target, the
                         images whose target is known, with folds (sets.transfer_set); a protocol whose
                         datasets lack a target is skipped for it, with a note
  3. protocols           checked before any work: folds 0..k-1, both classes in every part (protocols)
  4. features            frozen pooled features + head outputs per start x dataset, cached by content (features)
  5. linear probe        per split: standardise, inner-CV L2 strength, refit, predict (probe; a split_<d>
                         protocol: the strength chosen on its validation split); a solve that hits
                         probe.max_iter is logged and noted in the report
  6. fine-tuning         per split (the first finetune.max_folds of a CV protocol): new head, early stop,
                         precise BatchNorm statistics before every prediction (finetune)
     (5, 6)              thresholds and a Platt calibrator per split from training-side scores only
                         (report.learned_on_training)
  6b. label efficiency   config.train_sizes: the probe (and with config.train_sizes_finetune the fine-tuning) on
                         draws of each size of every split's training images, the same held-out images (curves)
  7. cell metrics        AUROC, operating points, calibration per cell (report.cell_metrics); every pair of
                         cells compared on their common test images per protocol (paired), once per replicate
                         when a start has several runs, then decided across the runs (groups.summarise)
  8. age and sex         the MetaChexNet heads on each dataset vs its ages and sexes (report.age_sex_metrics)
  9. deployable model    config.deploy's start (of a start with several runs: the run with the best validation
                         result of its pretraining), method and protocol column fitted on every training image,
                         threshold from out-of-fold predictions -> WORKDIR/model/ for `predict` (deploy)
 10. report              WORKDIR/report/: JSON, markdown, ROC and reliability PNGs, per-image CSVs (report);
                         the label-efficiency curves' figures and predictions in WORKDIR/report/curves/
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from metachex_jax.contract.pixels import PixelContract
from metachex_jax.core import files
from metachex_jax.core.errors import ConfigError, MissingDataError
from metachex_jax.data.input import datasets as nih_datasets
from metachex_jax.data.input.spec import DataSpec
from metachex_jax.transfer import curves as curves_lib
from metachex_jax.transfer import deploy as deploy_lib
from metachex_jax.transfer import features as features_lib
from metachex_jax.transfer import groups as groups_lib
from metachex_jax.transfer import paired as paired_lib
from metachex_jax.transfer import protocols as protocols_lib
from metachex_jax.transfer import report as report_lib
from metachex_jax.transfer import sets as sets_lib
from metachex_jax.transfer import weights
from metachex_jax.transfer.finetune import Finetuner
from metachex_jax.transfer.probe import ProbeSettings, fit_probe

METHODS = ("probe", "finetune")


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.replace("+", ",").split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"config.methods: unknown {unknown} (or none given); use probe, finetune or probe+finetune")
    return names


def _not_converged_note(start, split, fit, settings) -> str:
    where = f"fold {split.fold}" if split.fold >= 0 else "the whole set"
    lambdas = ", ".join(f"{u['l2']:g} ({u['problems']} solves)" for u in fit.unconverged)
    return (f"probe {start.name} {split.protocol} {where}: L-BFGS stopped at probe.max_iter={settings.max_iter} "
            f"without reaching tol={settings.tol:g} for lambda {lambdas}; the chosen lambda is {fit.l2:g}")


def _estimate_batchnorm_statistics(start, config, spec: DataSpec) -> None:
    """The "random_bn" start: BatchNorm statistics from ChestX-ray14 training images (see weights.py)."""
    if spec.demo is None:
        spec = dataclasses.replace(spec, manual_dir="")  # the TB raw folder: never prepare ChestX-ray14 from it here
    try:
        nih_train = nih_datasets.chestxray14_splits(spec)["train"]
    except FileNotFoundError as e:
        raise MissingDataError(f"starting weights {start.name!r} take their BatchNorm statistics from the "
                               f"ChestX-ray14 training images, which were not found:\n{e}") from e
    start.info["bn_statistics_images"] = features_lib.calibrate_batchnorm(
        start.model, nih_train, kind="nih", contract=start.contract, batch_size=config.feature_batch_size,
        max_images=config.bn_statistics_images)
    start.fingerprint = weights.weights_fingerprint(start.model)  # the feature cache must see the new statistics


def run(config, workdir: str) -> dict:
    workdir = files.absolute(workdir)  # a gs:// workdir stays a URL
    began = time.perf_counter()
    methods = parse_methods(config.methods)
    protocol_list = protocols_lib.parse_protocols(config.protocols)
    targets = protocols_lib.parse_targets(config.targets)

    # 1-3. Starting weights, data, protocols: every input is checked before the long work starts. Each start is
    # fed the pixels its weights expect (its contract), at this run's image size.
    groups = groups_lib.load_groups(groups_lib.group_specs(config), config.model, config.seed,
                                    str(config.checkpoint_step), contract=PixelContract.from_config(config))
    starts = [start for group in groups for start in group.starts]
    spec = DataSpec.from_config(config)
    needed = tuple(dict.fromkeys(d for p in protocol_list for d in p.datasets))
    mismatched = sets_lib.geometry_problems(starts, spec, needed)  # before any dataset is read or prepared
    if mismatched:
        raise ConfigError(mismatched)
    records = sets_lib.load_datasets(spec, needed)
    problems, splits, notes = [], {}, []
    if "probe" not in methods:
        problems += [f"starting weights {s.name!r} are a linear-probe baseline (fine-tuning would repeat 'random'); "
                     "drop them from config.compare_with or add the probe to config.methods"
                     for s in starts if s.kind == "random_bn"]
    views: dict[str, dict[str, sets_lib.TransferSet]] = {}  # target -> set name -> its images of that target
    protocol_targets: dict[str, str] = {}  # report column -> target
    column_protocols: dict[str, protocols_lib.Protocol] = {}  # report column -> protocol
    for target in targets:
        for protocol in protocol_list:
            lacking = [d for d in protocol.datasets if not sets_lib.has_target(records[d], target)]
            if lacking:
                notes.append(f"{protocol.name} is not run for {target}: {', '.join(lacking)} has no {target} label")
                continue
            key = protocols_lib.column_name(protocol.name, target, len(targets) > 1)
            sets_t = views.setdefault(target, {})
            for name in (protocol.train_set, protocol.test):
                if name not in sets_t:
                    sets_t[name] = sets_lib.transfer_set(records, tuple(name.split("+")), target,
                                                         num_folds=spec.num_folds, fold_seed=spec.fold_seed)
            try:
                splits[key] = protocols_lib.check_protocol(protocol, sets_t, need_validation="finetune" in methods)
                protocol_targets[key], column_protocols[key] = target, protocol
            except ValueError as e:
                problems.append(str(e))
    for target in targets:
        if not any(t == target for t in protocol_targets.values()) and not problems:
            problems.append(f"no protocol can run for target {target!r}: " + "; ".join(
                n for n in notes if n.endswith(f"has no {target} label")))
    deploy_config, deploy_choice = groups_lib.resolve_deploy(config, groups)
    try:
        deploy_spec = deploy_lib.deploy_spec(deploy_config, starts, column_protocols, protocol_targets, methods)
    except ValueError as e:
        problems.append(str(e))
    if problems:  # the data cannot serve this config (its folds, methods, deployment): errors the user fixes
        raise ConfigError(problems)
    column_names = list(protocol_targets)
    for start in starts:
        if start.kind == "random_bn":
            _estimate_batchnorm_statistics(start, config, spec)
        logging.info("start %s: %s (weights %s)", start.name, start.info, start.fingerprint[:12])

    # 4. Features (needed by the probe and by the age/sex evaluation), per dataset; a set's are rows of them.
    tables, timings = {}, {}
    want_age_sex = [s for s in starts if s.has_trained_metadata_heads]
    for start in starts:
        if "probe" not in methods and start not in want_age_sex:
            continue
        for name, dataset in records.items():
            table = features_lib.features_for(start, dataset, batch_size=config.feature_batch_size,
                                              cache_dir=config.feature_cache_dir)
            tables[start.name, name] = table
            timings[f"features {start.name} {name} ({table['cache']}) s"] = table["seconds"]
            if table["cache"] == "miss" and table["images_per_s"]:  # 0 when one batch held them all
                timings[f"features {start.name} {name} img/s (after compilation)"] = table["images_per_s"]

    cells: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    details: dict[str, dict] = {}

    screening = config.screening.to_dict()
    columns: dict[str, dict[str, dict]] = {}  # protocol -> {"start/method": per-image columns}

    def add_cell(start, method, protocol, split_results, extra):
        key = f"{start.name}/{method}"
        cols = report_lib.cell_columns(split_results, views[protocol_targets[protocol]])
        cells.setdefault(key, {})[protocol] = report_lib.cell_metrics(cols, config.n_boot, config.seed, screening,
                                                                     config.calibration_bins)
        details.setdefault(key, {})[protocol] = extra
        predictions[f"{start.name}_{method}_{protocol}"] = cols
        columns.setdefault(protocol, {})[key] = cols

    # 5. Linear probe.
    settings = ProbeSettings.from_config(config.probe, config.seed)
    if "probe" in methods:
        for start in starts:
            per_dataset = {name: tables[start.name, name] for name in records}
            for protocol in column_names:
                sets_t = views[protocol_targets[protocol]]
                t0 = time.perf_counter()
                results, extra = [], {"l2": [], "iterations": [], "converged": [], "thresholds": []}
                first = splits[protocol][0]  # every split of a protocol has the same training and test sets
                train_features = sets_lib.features_of(per_dataset, sets_t[first.train_set])
                test_features = sets_lib.features_of(per_dataset, sets_t[first.test_set])
                for split in splits[protocol]:
                    y_train = sets_t[split.train_set].y[split.train]
                    fixed = column_protocols[protocol].fixed_split  # choose on its validation split
                    fit = fit_probe(train_features[split.train], y_train, test_features[split.test], settings,
                                    groups=sets_t[split.train_set].patient[split.train],
                                    validation=np.isin(split.train, split.validation) if fixed else None)
                    thresholds = report_lib.learned_on_training(y_train[fit.held_out],
                                                                fit.train_oof_prob[fit.held_out], screening)
                    results.append((split, fit.test_prob, thresholds))
                    for k in ("l2", "iterations", "converged"):
                        extra[k].append(getattr(fit, k))
                    extra["thresholds"].append(thresholds)
                    if not fit.converged:
                        notes.append(_not_converged_note(start, split, fit, settings))
                        logging.warning("%s", notes[-1])
                extra["fit_seconds"] = time.perf_counter() - t0
                timings[f"probe fit {start.name} {protocol} ({len(splits[protocol])} splits) s"] = extra["fit_seconds"]
                logging.info("probe %s %s: %d splits fitted in %.2f s", start.name, protocol,
                             len(splits[protocol]), extra["fit_seconds"])
                add_cell(start, "probe", protocol, results, extra)

    # 6. Fine-tuning.
    tuner = None
    validation_predictions = {}  # (start/method, column) -> (labels, probabilities): a fixed split's deployment
    if "finetune" in methods:
        s = config.finetune
        tuner = Finetuner(s, seed=config.seed)
        finetune_info = {"bn_stats": s.bn_stats, "effective_lr": tuner.effective_lr,
                         "lr_scaling": s.optim.lr_scaling, "global_batch": tuner.global_batch}
        for start in starts:
            if start.kind == "random_bn":
                notes.append(f"{start.name} is not fine-tuned: it differs from 'random' in its BatchNorm statistics "
                             "only, which fine-tuning recomputes for its weights before predicting, so its "
                             "predictions would be identical to random/finetune's (tested).")
                continue
            for protocol in column_names:
                chosen = splits[protocol][:s.max_folds] if s.max_folds else splits[protocol]
                results = []
                extra = {"best_epoch": [], "epochs_run": [], "val_auroc": [], "folds": [], "thresholds": [],
                         "bn_images": [], "test_bn_stats": []}
                t0 = time.perf_counter()
                for split in chosen:
                    out = tuner.run(start, split, views[protocol_targets[protocol]])
                    thresholds = report_lib.learned_on_training(out.val_y, out.val_prob, screening)
                    validation_predictions[f"{start.name}/finetune", protocol] = (out.val_y, out.val_prob)
                    results.append((split, out.test_prob, thresholds))
                    for k in ("best_epoch", "epochs_run", "val_auroc", "bn_images", "test_bn_stats"):
                        extra[k].append(getattr(out, k))
                    extra["folds"].append(split.fold)
                    extra["thresholds"].append(thresholds)
                extra["seconds"] = time.perf_counter() - t0
                timings[f"finetune {start.name} {protocol} ({len(chosen)} splits) s"] = extra["seconds"]
                add_cell(start, "finetune", protocol, results, extra)

    # 6b. Label-efficiency curves.
    replicates = [[s.name for s in replicate] for replicate in groups_lib.replicates(groups)]
    curves, curve_predictions = None, None
    sizes = curves_lib.parse_sizes(config.train_sizes)
    if sizes:
        t0 = time.perf_counter()
        plans = curves_lib.plan_draws(splits, views, protocol_targets, sizes=sizes, draws=config.train_draws,
                                      seed=config.seed)
        curve_predictions, curve_notes = {}, []
        if "probe" in methods:
            curve_predictions = curves_lib.probe_curves(plans, starts, tables, views, protocol_targets, splits,
                                                        settings, columns)
        if config.train_sizes_finetune and "finetune" in methods:
            tuned, curve_notes = curves_lib.finetune_curves(plans, starts, tuner, views, protocol_targets, splits,
                                                            columns, config.seed)
            for protocol, per_key in tuned.items():
                curve_predictions.setdefault(protocol, {}).update(per_key)
        held_out = {protocol: {key.split("/")[1]: cols for key, cols in reversed(columns[protocol].items())}
                    for protocol in column_names}
        curves = curves_lib.summarise(curve_predictions, plans, held_out, n_boot=config.n_boot, seed=config.seed,
                                      target_auroc=config.curve_target_auroc, replicates=replicates,
                                      notes=curve_notes)
        timings["label-efficiency curves s"] = time.perf_counter() - t0

    # 7. Paired comparisons of the cells, per protocol and replicate (the cell metrics were computed in add_cell).
    paired = {}
    for protocol in column_names:
        for r, names in enumerate(replicates):
            family = {key: cols for key, cols in columns.get(protocol, {}).items() if key.split("/")[0] in names}
            if len(family) > 1:
                comparisons = paired_lib.paired_comparisons(family, config.n_boot, config.seed)
                for c in comparisons if len(replicates) > 1 else ():
                    c["replicate"] = r
                paired.setdefault(protocol, []).extend(comparisons)

    # 8. Age and sex, externally.
    age_sex = {start.name: {name: report_lib.age_sex_metrics(tables[start.name, name], dataset.patient,
                                                             config.n_boot, config.seed)
                            for name, dataset in records.items()}
               for start in want_age_sex}

    # 9. The deployable model.
    deployed = None
    if deploy_spec is not None:
        t0 = time.perf_counter()
        deployed = deploy_lib.fit_and_save(deploy_spec, config, workdir, starts=starts,
                                           view=views[deploy_spec.target][deploy_spec.train_set],
                                           tables={name: tables[deploy_spec.start, name] for name in records
                                                   if (deploy_spec.start, name) in tables},
                                           columns=columns, cells=cells, details=details, settings=settings,
                                           tuner=tuner, validation_predictions=validation_predictions,
                                           start_choice=deploy_choice)
        timings["deployable model s"] = time.perf_counter() - t0

    # 10. Report.
    timings["total s"] = time.perf_counter() - began
    result = {
        "protocols": column_names,
        "protocol_targets": protocol_targets,
        "targets": targets,
        "methods": methods,
        "cells": cells,
        "paired": paired,
        "groups": groups_lib.summarise(cells, paired, groups),
        "curves": curves,
        "screening": screening,
        "calibration_bins": config.calibration_bins,
        "finetune": finetune_info if "finetune" in methods else None,
        "details": details,
        "age_sex": age_sex,
        "deployed_model": deployed,
        "notes": notes,
        "timings": timings,
        "starts": {s.name: {**s.info, "group": s.group, "weights_fingerprint": s.fingerprint} for s in starts},
        "datasets": {name: {"build": str(d.build_dir), "fingerprint": d.fingerprint, "n_images": len(d),
                            "targets": {t: {"known": int((d.labels[:, d.column(t)] >= 0).sum()),
                                            "positive": int((d.labels[:, d.column(t)] == 1).sum())}
                                        for t in targets if d.column(t) is not None},
                            "stored_folds": int(d.fold.max()) + 1 if (d.fold >= 0).all() else None,
                            "flagged_readings": d.flagged_readings}
                     for name, d in records.items()},
        "config": config.to_dict(),
    }
    if jax.process_index() == 0:
        out_dir = files.join(workdir, "report")
        report_lib.write_report(out_dir, result, predictions)
        if curves is not None:
            curves_lib.write_curves(files.join(out_dir, "curves"), curves, curve_predictions, plans, held_out, splits,
                                    views, protocol_targets)
        logging.info("report written to %s\n%s", out_dir, report_lib.markdown(result))
    return result
