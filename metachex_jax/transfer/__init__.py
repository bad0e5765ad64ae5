"""Transfer: starting weights x {linear probe, fine-tuning} x protocols x targets; TB on Shenzhen and Montgomery
by default, any prepared datasets and binary labels otherwise (e.g. a hospital's own CSV dataset).

Entry point: `python -m metachex_jax.main --config=configs/transfer.py[:demo] --config.init_from=PRE --workdir=DIR`
(`run.run(config, workdir)`). One module per job, in the order a run uses them:

    weights.py     starting weights (pretraining workdir, converted backbone or model directory, random) + content
                   fingerprint + each start's pixel contract
    groups.py      the starts as named groups of runs (several pretraining runs, e.g. seeds, as one start):
                   replicates, the decision across runs, which run deploys
    sets.py        the prepared datasets (all records) + a content fingerprint of each build; each seen through
                   one binary target (images with a known label, folds by patient)
    protocols.py   k-fold CV within a dataset, train on some / test on another; fold/class checks
    features.py    frozen pooled features + head outputs, cached by (weights, dataset, pixel contract) content
    probe.py       L2 logistic regression, strength by inner CV (folds of patients) on the training folds
                   (batched L-BFGS)
    finetune.py    new one-logit head, lower backbone lr (optax.multi_transform), early stopping on validation,
                   precise BatchNorm statistics before every prediction (finetune.bn_stats)
    report.py      per-cell metrics with bootstrap CIs (AUROC, screening operating points, calibration),
                   JSON / markdown / CSV; plot.py draws the ROC and reliability figures (matplotlib)
    paired.py      every pair of cells on their common test images: paired bootstrap, DeLong or the clustered
                   test (patients with several images), Holm, who wins (Holm p < 0.05 and the CI on the same side)
    curves.py      label-efficiency curves: stratified, patient-grouped draws of each training size, the probe
                   (and fine-tuning) per draw on the full run's held-out images, their points, comparisons, files
    deploy.py      the deployable model (TB by default): config.deploy's start, method and protocol column on
                   every training image, threshold from out-of-fold predictions -> WORKDIR/model/ (for predict
                   and export)
    run.py         the whole comparison
"""
