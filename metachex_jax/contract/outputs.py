"""What a model outputs, by name: each model class says which outputs it has and of which kind (`output_kinds()`),
and `outputs_of` turns that into the `Output`s a model card, `Predictor`, `predict`'s CSV and the heatmaps use (one
name for each output everywhere).

Kinds: "probability" (the sigmoid of a logit: each pathology by name, `view_ap` = P(AP view), `sex_male` =
P(male), `tb` = P(TB)), "op_norm" (torchxrayvision's op-normalised probability, models/xrv.py) and "years" (age).
A probability may carry a calibrator (`calibration`: Platt scaling, contract/calibration.py), as a transfer run's
deployed model does: `predict --calibrated` adds its calibrated probability.
"""

from __future__ import annotations

import dataclasses

from metachex_jax.contract.calibration import PlattScaling

OUTPUT_KINDS = ("probability", "op_norm", "years")


@dataclasses.dataclass(frozen=True)
class Output:
    name: str
    kind: str  # "probability" (sigmoid of a logit), "op_norm" (torchxrayvision's op-normalised one) or "years"
    threshold: float | None = None  # decision threshold on the probability (e.g. TB screening)
    op_threshold: float | None = None  # "op_norm" outputs: the probability that maps to 0.5 (models/xrv.py)
    calibration: PlattScaling | None = None  # "probability" outputs: a calibrator of the probability

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "calibration"}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> Output:
        """From a model card's "outputs" entry."""
        calibration = data.get("calibration")
        return cls(data["name"], data["kind"], data.get("threshold"), data.get("op_threshold"),
                   PlattScaling.from_json(calibration) if calibration else None)


def outputs_of(model, thresholds: dict | None = None) -> list[Output]:
    """The named outputs of a Flax model (`output_kinds()`), with decision thresholds and op-norm thresholds."""
    thresholds = thresholds or {}
    op_thresholds = model.output_op_thresholds() if hasattr(model, "output_op_thresholds") else {}
    return [Output(name, kind, thresholds.get(name), op_thresholds.get(name))
            for name, kind in model.output_kinds().items()]
