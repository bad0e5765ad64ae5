"""Platt scaling: a model's probability mapped to a calibrated one, `sigmoid(a * logit(p) + b)` with a > 0.

    platt = fit_platt(y, prob, fitted_on="cv_shenzhen out-of-fold predictions")   # y 0/1, prob in [0, 1]
    platt(prob)                                                                    # calibrated probabilities
    card_output["calibration"] = platt.to_json()                                   # travels with the output

Fitted by maximum likelihood on (logit(p), y) with Platt's (1999) target smoothing: the targets are
(N+ + 1) / (N+ + 2) for positives and 1 / (N- + 2) for negatives, so the fit stays finite when the scores
separate the classes; it is otherwise an ordinary two-parameter logistic regression on the logit (Newton's method
with step halving). The map is strictly increasing (a > 0): every threshold t on p has its image t' on the
calibrated scale with the same decisions, so an operating point's sensitivity and specificity do not change.
Scores that do not rank the images (a fitted slope <= 0) give the constant smoothed base rate with a vanishing
slope (`MIN_SLOPE`) instead of a decreasing map, and `degenerate` says so.

Logits are taken in float64 with p clipped into (0, 1) at the smallest and largest float64 steps, so distinct
probabilities keep distinct logits (a float32 model's saturated 1.0 is the only value clipped).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_SLOPE = 1e-6
_HIGHEST = np.nextafter(1.0, 0.0)
_LOWEST = np.finfo(np.float64).tiny


def logit(prob) -> np.ndarray:
    p = np.clip(np.asarray(prob, np.float64), _LOWEST, _HIGHEST)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


@dataclasses.dataclass(frozen=True)
class PlattScaling:
    a: float  # slope on the logit (> 0)
    b: float  # intercept
    n: int = 0  # images it was fitted on
    n_positive: int = 0
    fitted_on: str = ""
    degenerate: bool = False  # the scores did not rank the fitting images: constant base rate

    def __call__(self, prob) -> np.ndarray:
        z = np.atleast_1d(np.asarray(self.a * logit(prob) + self.b, np.float64))
        out = _sigmoid(z)
        return out.reshape(np.shape(prob))

    def to_json(self) -> dict:
        return {"method": "platt", **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> PlattScaling:
        if data.get("method", "platt") != "platt":
            raise ValueError(f"unknown calibration method {data.get('method')!r}; expected 'platt'")
        return cls(float(data["a"]), float(data["b"]), int(data.get("n", 0)), int(data.get("n_positive", 0)),
                   str(data.get("fitted_on", "")), bool(data.get("degenerate", False)))


def smoothed_targets(y: np.ndarray) -> np.ndarray:
    """Platt's targets: (N+ + 1) / (N+ + 2) for positives, 1 / (N- + 2) for negatives."""
    positives = int(np.sum(y == 1))
    negatives = len(y) - positives
    return np.where(y == 1, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))


def _log_loss(theta, z, t) -> float:
    s = theta[0] * z + theta[1]
    # -[t log sigmoid(s) + (1 - t) log(1 - sigmoid(s))] = log(1 + e^s) - t s, computed stably
    return float(np.sum(np.logaddexp(0.0, s) - t * s))


def fit_platt(y, prob, *, fitted_on: str = "", max_iter: int = 100, tol: float = 1e-12) -> PlattScaling:
    """Platt scaling fitted on labels `y` (0/1) and probabilities `prob` (module docstring)."""
    y = np.asarray(y).astype(np.int64).ravel()
    z = logit(prob).ravel()
    if len(y) != len(z):
        raise ValueError(f"{len(y)} labels but {len(z)} probabilities")
    if len(y) == 0 or not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"Platt scaling needs 0/1 labels, got {np.unique(y)[:10]}")
    t = smoothed_targets(y)
    n_positive = int(np.sum(y == 1))
    theta = np.array([1.0, 0.0])
    loss = _log_loss(theta, z, t)
    for _ in range(max_iter):
        p = _sigmoid(theta[0] * z + theta[1])
        w = p * (1.0 - p)
        gradient = np.array([np.sum((p - t) * z), np.sum(p - t)])
        hessian = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]])
        hessian += 1e-12 * np.eye(2) * max(1.0, np.trace(hessian))  # a constant z leaves it singular
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        while size > 1e-10:  # step halving: Newton may overshoot far from the optimum
            candidate = theta - size * step
            new_loss = _log_loss(candidate, z, t)
            if new_loss <= loss:
                break
            size /= 2
        else:
            break
        converged = loss - new_loss <= tol * max(1.0, abs(loss))
        theta, loss = candidate, new_loss
        if converged:
            break
    if theta[0] <= 0:  # scores that do not rank: the smoothed base rate, still strictly increasing
        base = float(np.mean(t))
        return PlattScaling(MIN_SLOPE, float(np.log(base) - np.log1p(-base)), len(y), n_positive, fitted_on, True)
    return PlattScaling(float(theta[0]), float(theta[1]), len(y), n_positive, fitted_on)
