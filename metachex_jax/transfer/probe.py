"""The linear probe: L2-regularised logistic regression on frozen features, strength chosen by inner CV.

For one outer split (training rows, test rows of a feature matrix):

  1. standardise with the TRAINING rows' mean and standard deviation (never the test rows');
  2. for each strength lambda of the grid and each inner fold (on the training rows only; folds of PATIENTS, so
     no patient's images are on both sides of an inner split; stratified, deterministic) fit
     mean_i logloss(y_i, x_i.w + b) + lambda/2 |w|^2  on the other inner folds and score the held-out inner fold;
     choose the lambda with the best pooled inner out-of-fold score ("log_loss" or "auroc"; ties -> the stronger
     regularisation);
  3. refit on all training rows with that lambda; return the inner out-of-fold probabilities at that lambda,
     on which the caller chooses decision thresholds (held-out scores of the training data: in-sample scores
     of a 1024-d model on ~600 images are nearly separable and would put a threshold anywhere);
  4. predict the test rows.

With a fixed validation part (a split_<dataset> protocol: `fit_probe(..., validation=mask)`), steps 1-4 become:
standardise with the FIT rows (the training rows outside the validation part); fit every lambda on them; choose
the lambda whose fit scores best on the validation rows; that fit (no refit) predicts the test rows, and its
validation probabilities are the held-out scores the thresholds are chosen on (`ProbeResult.held_out`).

A solve that stops at `max_iter` without reaching `tol` is not an error but is reported: `ProbeResult.converged`
is False and `unconverged` names the lambdas (and how many of the inner-fold + refit problems) that hit the limit.

Solver (own, not scikit-learn: sklearn's lbfgs LogisticRegressionCV took 120 s for the 10-fold x 5-inner
search on 662 x 1024 features on the 2-core dev box; the goal is < 10 s). With an L2 penalty the optimal w lies
in the span of the training rows, so each outer split is solved in the basis of the training rows' thin SVD,
Z = U S V^T: w = V c, Z w = (U S) c, |w| = |c|, r = rank <= n instead of 1024 dimensions. Every inner problem
uses a subset of the same rows, so the same basis serves all (inner folds + refit) x lambdas: the inner folds and the refit are solved
together, lambda by lambda from the strongest down, each warm-started from the previous solution, by a batched L-BFGS in numpy float64 (each step is two (n x r) x (r x P) matrix products). In that
basis the Hessian at w = 0 is diag(S^2 / 4n) + lambda, L-BFGS's initial inverse Hessian, so it converges in tens
of iterations for every lambda. (optax's L-BFGS, vmapped over the problems, spent ~0.2 s per iteration in its
batched zoom line search; this loop spends a few ms.) Exactness is
tested against scikit-learn's LogisticRegression (C = 1 / (lambda n)).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import threadpoolctl

from metachex_jax.evaluation import metrics


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    inner_folds: int = 5
    l2_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
    selection: str = "log_loss"  # or "auroc"
    max_iter: int = 500
    tol: float = 1e-5
    seed: int = 0

    @classmethod
    def from_config(cls, probe_config, seed: int) -> ProbeSettings:
        return cls(inner_folds=int(probe_config.inner_folds), l2_grid=tuple(float(x) for x in probe_config.l2_grid),
                   selection=str(probe_config.selection), max_iter=int(probe_config.max_iter),
                   tol=float(probe_config.tol), seed=seed)


@dataclasses.dataclass
class ProbeResult:
    test_prob: np.ndarray  # (n_test,) P(TB)
    train_oof_prob: np.ndarray  # (n_train,) held-out P(TB) of the training rows at the chosen lambda: inner out-of-
    # fold (inner CV), or the validation rows' (a fixed validation part; NaN on the fit rows)
    inner_fold: np.ndarray  # (n_train,) the inner fold of each training row (folds of patients); a fixed
    # validation part: 0 for its rows, -1 for the fit rows
    l2: float  # the chosen lambda
    inner_scores: dict  # lambda -> inner-CV score (log loss: lower is better; auroc: higher)
    weights: np.ndarray  # (d,) on the standardised features
    bias: float
    mean: np.ndarray  # standardisation statistics of the training rows
    scale: np.ndarray
    iterations: int  # the largest L-BFGS iteration count of the split
    converged: bool  # every solve (all lambdas, inner folds and refit) reached tol within max_iter
    unconverged: list  # [{"l2": lambda, "problems": n of (inner folds + 1)}] that stopped at max_iter

    @property
    def held_out(self) -> np.ndarray:
        """(n_train,) bool: the training rows whose `train_oof_prob` is a held-out score (thresholds use these)."""
        return self.inner_fold >= 0


def stratified_group_folds(y: np.ndarray, groups, k: int, seed: int) -> np.ndarray:
    """Deterministic fold ids 0..k-1 of the rows, whole GROUPS (patients) to a fold, stratified by the group's label
    (1 if any of its rows is positive) and balanced in rows.

    Per label, its groups (in order of first appearance) are put in a seeded permutation, then largest first (a
    stable sort by size); each goes to the fold holding the fewest rows of that label so far, ties broken
    cyclically from the fold after the previous choice (the second label starts where the first stopped). With
    one row per group this deals the rows round-robin: the row-level stratified folds of earlier versions."""
    y = np.asarray(y)
    _, first_row, group = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    rank = np.empty(len(first_row), np.int64)
    rank[np.argsort(first_row, kind="stable")] = np.arange(len(first_row))
    group = rank[group.reshape(-1)]  # group ids in order of first appearance
    size = np.bincount(group)
    label = np.zeros(len(size), np.int64)
    np.maximum.at(label, group, (y == 1).astype(np.int64))
    fold_of_group = np.empty(len(size), np.int64)
    start = 0  # where the cyclic tie-break begins
    for value in (0, 1):
        members = np.flatnonzero(label == value)
        members = members[np.random.default_rng([seed, value]).permutation(len(members))]
        members = members[np.argsort(-size[members], kind="stable")]
        rows = np.zeros(k, np.int64)  # rows of this label per fold
        for g in members:
            cyclic = (start + np.arange(k)) % k
            fold = int(cyclic[np.argmin(rows[cyclic])])  # the first fewest-rows fold from `start` on
            fold_of_group[g] = fold
            rows[fold] += size[g]
            start = fold + 1
    return fold_of_group[group]


def fit_logistic(z, y, sample_weight, l2, *, max_iter: int = 500, tol: float = 1e-6, memory: int = 10,
                 init=None):
    """Solve P weighted L2 logistic regressions on the same rows at once (batched L-BFGS, numpy float64).

    Each problem p minimises  sum_i w_pi logloss(y_i, z_i.c + b) / sum_i w_pi + l2_p / 2 |c|^2.
    Args:
      z: (n, r) design; preconditioning is exact at c = 0 when its columns are orthogonal (the U S of an SVD).
      y: (n,) 0/1. sample_weight: (P, n) non-negative row weights of each problem. l2: (P,) lambdas.
      tol: stop a problem when its preconditioned gradient norm is below this.
      init: optional (coef (P, r), bias (P,)) to start from (a warm start), default zeros.
    Returns (coef (P, r), bias (P,), iterations (P,), converged (P,) bool: the gradient test passed).
    """
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    weight = np.asarray(sample_weight, np.float64)
    l2 = np.asarray(l2, np.float64)
    count = np.maximum(weight.sum(1), 1e-12)[:, None]  # (P, 1)
    weight_n = weight / count
    num_problems, dim = len(l2), z.shape[1] + 1
    # Inverse of the diagonal Hessian at 0: curvature 1/4 per row, column norms shared in proportion.
    col_sq = np.sum(z * z, axis=0) / len(y)
    h0 = 1.0 / np.concatenate([np.broadcast_to(col_sq / 4 + l2[:, None], (num_problems, dim - 1)),
                               np.full((num_problems, 1), 0.25)], axis=1)

    def value_grad(theta):
        logits = z @ theta[:, :-1].T + theta[:, -1]  # (n, P)
        loss = np.logaddexp(0.0, logits) - y[:, None] * logits
        value = np.sum(weight_n.T * loss, axis=0) + 0.5 * l2 * np.sum(theta[:, :-1] ** 2, axis=1)
        residual = weight_n.T * (_sigmoid(logits) - y[:, None])  # (n, P)
        grad = np.concatenate([residual.T @ z + l2[:, None] * theta[:, :-1], residual.sum(0)[:, None]], axis=1)
        return value, grad

    theta = np.zeros((num_problems, dim))
    if init is not None:
        theta[:, :-1], theta[:, -1] = init
    value, grad = value_grad(theta)
    history: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (s, y, rho) per step, (P, dim) each
    iterations = np.zeros(num_problems, np.int64)
    for _ in range(max_iter):
        active = np.sqrt(np.sum(grad * grad * h0, axis=1)) >= tol
        if not active.any():
            break
        iterations += active
        # Two-loop recursion, batched over problems, initial inverse Hessian h0 (diagonal).
        q = grad.copy()
        alphas = []
        for s, yy, rho in reversed(history):
            a = rho * np.sum(s * q, axis=1)
            q -= a[:, None] * yy
            alphas.append(a)
        r = h0 * q
        for (s, yy, rho), a in zip(history, reversed(alphas)):
            b = rho * np.sum(yy * r, axis=1)
            r += (a - b)[:, None] * s
        direction = np.where(active[:, None], -r, 0.0)
        slope = np.sum(grad * direction, axis=1)
        # Backtracking (Armijo) line search, per problem.
        step = np.ones(num_problems)
        for _ in range(30):
            new_theta = theta + step[:, None] * direction
            new_value, new_grad = value_grad(new_theta)
            failed = active & ~(new_value <= value + 1e-4 * step * slope)
            if not failed.any():
                break
            step = np.where(failed, step * 0.5, step)
        s_vec, y_vec = new_theta - theta, new_grad - grad
        curvature = np.sum(s_vec * y_vec, axis=1)
        ok = active & (curvature > 1e-12)
        rho = np.where(ok, 1.0 / np.where(ok, curvature, 1.0), 0.0)  # rho 0: the pair is a no-op
        history = (history + [(np.where(ok[:, None], s_vec, 0.0), np.where(ok[:, None], y_vec, 0.0), rho)])[-memory:]
        theta = np.where(active[:, None], new_theta, theta)
        value = np.where(active, new_value, value)
        grad = np.where(active[:, None], new_grad, grad)
    converged = np.sqrt(np.sum(grad * grad * h0, axis=1)) < tol
    return theta[:, :-1], theta[:, -1], iterations, converged


def _selection_score(selection: str, y: np.ndarray, prob: np.ndarray) -> float:
    if selection == "log_loss":
        p = np.clip(prob, 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    if selection == "auroc":
        return float(metrics.roc_auc(y, prob))
    raise ValueError(f"probe.selection must be 'log_loss' or 'auroc', got {selection!r}")


def check_both_classes(y: np.ndarray, what: str) -> None:
    counts = np.bincount(np.asarray(y, np.int64), minlength=2)
    if counts.min() == 0:
        raise ValueError(f"{what} has a single class ({int(counts[0])} normal, {int(counts[1])} TB); "
                         "a TB classifier needs both")


def fit_probe(x_train, y_train, x_test, settings: ProbeSettings, *, groups, validation=None) -> ProbeResult:
    """Steps 1-4 of the module docstring for one outer split. `groups`: (n_train,) the training rows' patients;
    the inner folds keep each patient's images together (`stratified_group_folds`). `validation`: None (inner
    CV), or an (n_train,) bool mask of the rows that form a fixed validation part (module docstring).

    BLAS runs single-threaded here: the solves are small, and multi-threaded BLAS next to XLA's threads was
    measured 15x slower on a busy 2-core machine.
    """
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        if validation is not None:
            return _fit_probe_on_validation(x_train, y_train, x_test, settings, np.asarray(validation, bool))
        return _fit_probe(x_train, y_train, x_test, settings, groups)


def _standardise_and_basis(x_fit):
    """(mean, scale, z_fit, design U S, V^T) of the fit rows (steps 1 and the basis of the module docstring)."""
    x_fit = np.asarray(x_fit, np.float64)
    mean, scale = x_fit.mean(0), x_fit.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features (std 0) are left centred at 0
    z_fit = (x_fit - mean) / scale
    eigval, eigvec = np.linalg.eigh(z_fit @ z_fit.T)
    keep = eigval > eigval.max() * 1e-10
    s, u = np.sqrt(eigval[keep]), eigvec[:, keep]
    return mean, scale, z_fit, u * s, (z_fit.T @ u / s).T


def _fit_probe_on_validation(x_train, y_train, x_test, settings: ProbeSettings, validation) -> ProbeResult:
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train = np.asarray(y_train, np.float64)
    if validation.shape != y_train.shape:
        raise ValueError(f"fit_probe: a validation mask of {validation.shape} for {y_train.shape} training labels")
    check_both_classes(y_train[~validation], "the probe's training data without its validation part")
    check_both_classes(y_train[validation], "the probe's validation part")
    mean, scale, _, design, vt = _standardise_and_basis(x_train[~validation])
    grid = np.asarray(settings.l2_grid, np.float64)
    y_fit = y_train[~validation]
    # Every lambda fitted on the fit rows at once (one problem per lambda).
    coef, bias, iterations, converged = fit_logistic(design, y_fit, np.ones((len(grid), len(y_fit))), grid,
                                                     max_iter=settings.max_iter, tol=settings.tol)
    weights = vt.T @ coef.T  # (d, lambdas) on the standardised features
    val_prob = _sigmoid((x_train[validation] - mean) / scale @ weights + bias)
    scores = [_selection_score(settings.selection, y_train[validation], val_prob[:, j]) for j in range(len(grid))]
    sign = 1.0 if settings.selection == "log_loss" else -1.0
    order = np.argsort(-grid, kind="stable")  # ties -> the strongest regularisation
    best = int(order[np.argmin([sign * scores[j] for j in order])])
    held = np.full(len(y_train), np.nan)
    held[validation] = val_prob[:, best]
    unconverged = [{"l2": float(grid[j]), "problems": 1} for j in range(len(grid)) if not converged[j]]
    return ProbeResult(test_prob=_sigmoid((x_test - mean) / scale @ weights[:, best] + bias[best]),
                       train_oof_prob=held, inner_fold=np.where(validation, 0, -1), l2=float(grid[best]),
                       inner_scores={float(g): float(sc) for g, sc in zip(grid, scores)}, weights=weights[:, best],
                       bias=float(bias[best]), mean=mean, scale=scale, iterations=int(iterations.max()),
                       converged=not unconverged, unconverged=sorted(unconverged, key=lambda u: u["l2"]))


def _fit_probe(x_train, y_train, x_test, settings: ProbeSettings, groups) -> ProbeResult:
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train = np.asarray(y_train, np.float64)
    groups = np.asarray(groups)
    if groups.shape != y_train.shape:
        raise ValueError(f"fit_probe: {groups.shape} groups for {y_train.shape} training labels")
    check_both_classes(y_train, "the probe's training data")
    # Step 1: standardise with training statistics. The basis of the training rows: z_train = U S V^T; design U S,
    # w = V c, from the eigendecomposition of the n x n Gram matrix (cheaper than the SVD of the n x d matrix when
    # n < d); directions with eigenvalue below 1e-10 of the largest (numerically no data) are dropped.
    mean, scale, _, design, vt = _standardise_and_basis(x_train)
    z_test = (x_test - mean) / scale

    # Step 2: inner folds of patients (as many as the smaller class of patients allows) x lambdas, plus the refit.
    positive_groups = np.unique(groups[y_train == 1])
    n_groups = len(np.unique(groups))
    n_minor = int(min(len(positive_groups), n_groups - len(positive_groups)))
    k = min(settings.inner_folds, n_minor)
    if k < 2:
        raise ValueError(f"the probe's training data has only {n_minor} patient(s) of one class (a patient with a "
                         "positive image counts as positive): inner cross-validation needs at least 2 of each")
    inner = stratified_group_folds(y_train, groups, k, settings.seed)
    grid = np.asarray(settings.l2_grid, np.float64)
    masks = np.asarray([(inner != f) for f in range(k)] + [np.ones(len(y_train), bool)], np.float64)
    # The k inner problems + the refit, solved together, along the grid from the strongest lambda down, each
    # lambda warm-started from the previous one's solution (a regularisation path: far fewer iterations).
    coef = np.zeros((len(grid), k + 1, design.shape[1]))
    bias = np.zeros((len(grid), k + 1))
    iterations, unconverged = 0, []
    warm = None
    for j in np.argsort(-grid, kind="stable"):
        coef[j], bias[j], iters, converged = fit_logistic(design, y_train, masks, np.full(k + 1, grid[j]),
                                                          max_iter=settings.max_iter, tol=settings.tol, init=warm)
        warm = (coef[j], bias[j])
        iterations = max(iterations, int(iters.max()))
        if not converged.all():
            unconverged.append({"l2": float(grid[j]), "problems": int((~converged).sum())})
    oof = np.zeros((len(y_train), len(grid)))
    for f in range(k):
        held = inner == f
        oof[held] = _sigmoid(design[held] @ coef[:, f].T + bias[:, f])
    scores = [_selection_score(settings.selection, y_train, oof[:, j]) for j in range(len(grid))]
    # Best score; ties -> the largest lambda (scan from strongest regularisation down).
    sign = 1.0 if settings.selection == "log_loss" else -1.0
    order = np.argsort(-grid, kind="stable")
    best = int(order[np.argmin([sign * scores[j] for j in order])])

    # Step 3: the refit with the chosen lambda.
    w = vt.T @ coef[best, k]
    # Step 4.
    test_prob = _sigmoid(z_test @ w + bias[best, k])
    return ProbeResult(test_prob=test_prob, train_oof_prob=oof[:, best], inner_fold=inner, l2=float(grid[best]),
                       inner_scores={float(g): float(sc) for g, sc in zip(grid, scores)}, weights=w,
                       bias=float(bias[best, k]), mean=mean, scale=scale, iterations=iterations,
                       converged=not unconverged, unconverged=sorted(unconverged, key=lambda u: u["l2"]))


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x)))
