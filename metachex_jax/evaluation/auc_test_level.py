"""Does the paired AUROC test hold its level when patients have several images? A simulation with known truth
(`rejection_rates`; the command `python -m metachex_jax.auc_test_level [--datasets=2000] [--patients=200]
[--seed=0]`).

Each null data set: `patients` patients, each with 1 to 4 images (uniform), a patient-level label (positive with
probability `prevalence`), and two scores per image from models of EQUAL true AUROC:

    score_r = mu * label + sqrt(rho_w) * u_r(patient) + sqrt(1 - rho_w) * e_r(image),     r in {a, b}

with standard normal u and e, corr(u_a, u_b) = corr(e_a, e_b) = rho_m. So each score has unit variance within a
class, two images of one patient correlate rho_w (0.5) under one model, the two models' scores of one image
correlate rho_m (0.6), and the image-level AUROC of both is Phi(mu / sqrt 2), set to `auroc` (0.8). Every data set
is tested with the clustered test (`metrics.clustered_auc_test`, patients as clusters) and, for contrast, with
plain DeLong (`metrics.delong_test`, which takes the images as independent); the fraction of p-values below
`alpha` is each test's rejection rate under the null, which a valid test keeps near alpha. The last line printed
is one JSON object with every figure. Same arguments, same output.
"""

from __future__ import annotations

import statistics

import numpy as np

from metachex_jax.evaluation import metrics

# The null model of the check (module docstring).
NULL_MODEL = {"max_images": 4, "prevalence": 0.5, "auroc": 0.8, "rho_within": 0.5, "rho_models": 0.6}


def null_dataset(rng: np.random.Generator, patients: int, max_images: int, prevalence: float, auroc: float,
                 rho_within: float, rho_models: float):
    """(label, score_a, score_b, patient) per image of one null data set (module docstring)."""
    images = rng.integers(1, max_images + 1, patients)
    patient = np.repeat(np.arange(patients), images)
    label = np.repeat((rng.random(patients) < prevalence).astype(np.int64), images)
    mu = np.sqrt(2.0) * statistics.NormalDist().inv_cdf(auroc)
    models = np.array([[1.0, rho_models], [rho_models, 1.0]])
    chol = np.linalg.cholesky(models)
    u = rng.standard_normal((patients, 2)) @ chol.T  # patient effects of models a and b
    e = rng.standard_normal((len(patient), 2)) @ chol.T  # image effects
    score = mu * label[:, None] + np.sqrt(rho_within) * u[patient] + np.sqrt(1.0 - rho_within) * e
    return label, score[:, 0], score[:, 1], patient


def rejection_rates(datasets: int = 1000, patients: int = 200, seed: int = 0, alpha: float = 0.05) -> dict:
    """Rejection rates at `alpha` of the clustered test and of plain DeLong over `datasets` null data sets."""
    rng = np.random.default_rng(seed)
    rejected = {"clustered": 0, "delong": 0}
    for _ in range(datasets):
        label, a, b, patient = null_dataset(rng, patients, **NULL_MODEL)
        rejected["clustered"] += metrics.clustered_auc_test(label, a, b, patient)["p_value"] < alpha
        rejected["delong"] += metrics.delong_test(label, a, b)["p_value"] < alpha
    rates = {test: count / datasets for test, count in rejected.items()}
    return {"datasets": datasets, "patients": patients, **NULL_MODEL, "alpha": alpha, "seed": seed,
            "rejection_rate": rates,
            "monte_carlo_se": {test: float(np.sqrt(r * (1 - r) / datasets)) for test, r in rates.items()}}
