"""The numbers users cite: metrics with bootstrap CIs and tests (metrics.py), their files (reports.py), a
pretraining state on a split (evaluate.py), a run on NIH's expert labels (expert_labels.py), the Grad-CAM
pointing game (pointing_game.py) and the paired AUROC tests' level simulation (auc_test_level.py)."""
