"""Recipes: the defaults that suit one model on one dataset, as torchvision's reference
scripts keep one recipe per model.

A field the user leaves unset (on the command line or in a spec file) takes its recipe's
value, then the spec's own default. The recipe is applied where a user writes a spec (the
CLI's :func:`labctl.cli.spec_options.to_spec`); the resolved spec is what is stored and
queued, so a job's ``spec.json`` says exactly what ran, recipe values included. The one
exception is the learning rate: an unset ``lr`` stays ``None`` in the spec, as before, and
:attr:`JobSpec.effective_lr` reads the recipe's rate for the optimizer. It belongs to the
optimizer, so Adam and AdaMax runs at their own rates stay one setup to compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    model: str
    dataset: str
    values: dict[str, Any]
    #: learning rate per optimizer
    lr: dict[str, float] = field(default_factory=dict)
    #: what it reaches, measured how (the README's recipe table)
    result: str = "not measured here"

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}"


RECIPES = {(r.model, r.dataset): r for r in [
    Recipe("numpy-cnn", "digits", {"batch_size": 16, "epochs": 10, "lr_schedule": "cosine",
                                   "warmup_epochs": 0},
           lr={"adam": 3e-3, "adamax": 5e-3},
           result="AdaMax 98.3%, Adam 98.3% test accuracy after 10 epochs (seed 0, this CPU)"),
    Recipe("numpy-cnn", "mnist", {"batch_size": 64, "epochs": 10, "lr_schedule": "cosine",
                                  "warmup_epochs": 0},
           lr={"adam": 1e-3, "adamax": 2e-3}),
    Recipe("numpy-cnn", "synthetic", {"batch_size": 32, "epochs": 10},
           lr={"adam": 1e-3, "adamax": 2e-3}),
    Recipe("resnet50", "stanford-cars", {"batch_size": 64, "epochs": 30,
                                         "lr_schedule": "cosine", "warmup_epochs": 2,
                                         "image_size": 224},
           lr={"adam": 1e-3, "adamax": 2e-3}),
    Recipe("resnet50", "imagefolder", {"batch_size": 64, "epochs": 30, "lr_schedule": "cosine",
                                       "warmup_epochs": 2, "image_size": 224},
           lr={"adam": 1e-3, "adamax": 2e-3}),
]}


def recipe_for(values: dict[str, Any]) -> Recipe | None:
    """The recipe of the (model, dataset) that ``values`` name, spec defaults filling in."""
    from labctl.shared.spec import JobSpec  # spec reads recipe_lr: imported here, not above

    model = values.get("model") or JobSpec.model_fields["model"].default
    dataset = values.get("dataset") or JobSpec.model_fields["dataset"].default
    return RECIPES.get((model, dataset))


def recipe_lr(model: str, dataset: str, optimizer: str) -> float | None:
    """The recipe's learning rate for ``optimizer``, if its recipe names one."""
    recipe = RECIPES.get((model, dataset))
    return recipe.lr.get(optimizer) if recipe else None


def with_recipe(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` with the recipe's values for the fields they leave unset, and those
    values alone (what the recipe decided; the learning rate is read later, see above)."""
    recipe = recipe_for(values)
    if recipe is None:
        return dict(values), {}
    filled = {k: v for k, v in recipe.values.items() if values.get(k) is None}
    # A warm-up the recipe sets must stay shorter than the epochs the user chose.
    epochs = _as_int(values.get("epochs"))
    if "warmup_epochs" in filled and epochs is not None:
        filled["warmup_epochs"] = min(filled["warmup_epochs"], max(0, epochs - 1))
    return {**values, **filled}, filled


def _as_int(value: Any) -> int | None:
    """An epochs value as typed (an int, or text from a sweep's comma list), if it is one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None  # not a number: the spec's validation says so
