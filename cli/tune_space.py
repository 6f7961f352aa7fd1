"""What ``labctl tune`` searches and how a trial is scored, with no Optuna or job code.

Every optimizer gets the same space (Choi et al. 2019: rankings hold only under equal tuning
budgets), sampled by the same seeded TPE sampler. The objective reads the trial job's
per-epoch rows, which with ``spec.validation`` set are the validation split's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from labctl.cli.analysis.robust import epochs_to_target

#: The objectives, and the direction Optuna optimises each in.
OBJECTIVES = {"accuracy": "maximize", "time-to-target": "minimize"}
#: Fraction of the training split every trial is scored on (spec.validation).
DEFAULT_VALIDATION = 0.2
DEFAULT_TARGET = 0.95


@dataclass(frozen=True)
class Range:
    """One hyperparameter: Optuna's ``suggest_float(name, low, high, log=log)``."""

    name: str
    low: float
    high: float
    log: bool

    def describe(self) -> str:
        kind = "log-uniform" if self.log else "uniform"
        return f"{self.name} {kind} [{self.low:g}, {self.high:g}]"


#: Wide enough that both optimizers' good settings lie inside it: the rate spans four
#: decades around Kingma & Ba's defaults; beta2 stops below 1, where AdaMax's infinity norm
#: and Adam's second moment would never forget.
SEARCH_SPACE: tuple[Range, ...] = (
    Range("lr", 1e-5, 1e-1, log=True),
    Range("beta1", 0.5, 0.99, log=False),
    Range("beta2", 0.9, 0.9999, log=False),
    Range("eps", 1e-10, 1e-4, log=True),
    Range("weight_decay", 1e-6, 1e-2, log=True),
)


def space_as_json() -> list[dict[str, Any]]:
    return [asdict(r) for r in SEARCH_SPACE]


def spec_values(params: dict[str, float]) -> dict[str, Any]:
    """A trial's sampled parameters as spec fields (``beta1``, ``beta2`` -> ``betas``)."""
    return {"lr": params["lr"], "betas": [params["beta1"], params["beta2"]],
            "eps": params["eps"], "weight_decay": params["weight_decay"]}


def best_accuracy(rows: list[dict[str, Any]]) -> float:
    return max((r["test_accuracy"] for r in rows), default=0.0)


def score(rows: list[dict[str, Any]], objective: str, target: float) -> float:
    """The trial's value for ``objective`` from its epoch rows (``[]``: learnt nothing)."""
    if objective == "accuracy":
        return best_accuracy(rows)
    return epochs_to_target(rows, target)
