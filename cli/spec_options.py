"""The spec flags shared by every command that takes a spec (run, submit, sweep).

``-f FILE`` loads a YAML/JSON spec; each flag given on the command line overrides the
file's field. Values reach pydantic as typed by the user, so a bad value is reported by
the spec itself, naming the field ("epochs: Input should be greater than or equal to 1").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from labctl.cli.errors import BadSpec
from labctl.shared.spec import JobSpec, SpecError, build_spec, load_spec_file

# (flag declarations, spec field, help). Non-boolean flags take text; pydantic parses it.
VALUE_FLAGS: list[tuple[tuple[str, ...], str, str]] = [
    (("--model",), "model", "numpy-cnn | resnet50 [resnet50]"),
    (("--opt", "--optimizer"), "optimizer", "adam | adamax [adamax]"),
    (("--dataset",), "dataset", "digits | mnist | stanford-cars | imagefolder | synthetic"),
    (("--data-root",), "data_root", "dataset folder [$LABCTL_DATA_DIR]"),
    (("--epochs",), "epochs", "passes over the training split [30]"),
    (("--batch-size",), "batch_size", "images per step [64]"),
    (("--lr",), "lr", "learning rate [adam 1e-3, adamax 2e-3]"),
    (("--weight-decay",), "weight_decay", "coupled L2 penalty [0]"),
    (("--lr-schedule",), "lr_schedule", "constant | cosine [cosine]"),
    (("--warmup-epochs",), "warmup_epochs", "linear warm-up epochs [0]"),
    (("--image-size",), "image_size", "resize side [224 for photos, native otherwise]"),
    (("--num-classes",), "num_classes", "classes of the synthetic dataset [10]"),
    (("--seed",), "seed", "random seed [0]"),
    (("--device",), "device", "auto | cpu | cuda | cuda:N [auto]"),
    (("--limit-train",), "limit_train", "train on a subset of this size"),
    (("--limit-test",), "limit_test", "evaluate on a subset of this size"),
    (("--num-workers",), "num_workers", "DataLoader workers [4]"),
    (("--init-weights",), "init_weights", "torchvision-format checkpoint to start from"),
    (("--name",), "name", "a label for humans"),
]
BOOL_FLAGS: list[tuple[str, str, str]] = [
    ("--amp/--no-amp", "amp", "bf16 autocast (resnet50) [off]"),
    ("--channels-last/--no-channels-last", "channels_last", "channels_last memory [on]"),
    ("--compile/--no-compile", "compile", "torch.compile the model [off]"),
    ("--crop-to-bbox/--no-crop-to-bbox", "crop_to_bbox", "crop Stanford Cars to boxes [off]"),
]
_PREFIX = "spec__"


def spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``-f FILE`` and every spec flag; the command receives ``spec_values: dict``
    (file fields overridden by the flags that were given)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        spec_file = kwargs.pop("spec_file")
        flags = {k.removeprefix(_PREFIX): v for k, v in list(kwargs.items())
                 if k.startswith(_PREFIX)}
        for key in flags:
            kwargs.pop(_PREFIX + key)
        tags = flags.pop("tags")
        values = load_file_or_fail(spec_file) if spec_file else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        if tags:
            values["tags"] = list(tags)
        return fn(*args, spec_values=values, **kwargs)

    # Click applies decorators bottom-up; reversed keeps --help in the table's order.
    for decls, field, help_text in reversed(VALUE_FLAGS):
        wrapper = click.option(*decls, _PREFIX + field, default=None, help=help_text)(wrapper)
    for decl, field, help_text in reversed(BOOL_FLAGS):
        wrapper = click.option(decl, _PREFIX + field, default=None, help=help_text)(wrapper)
    wrapper = click.option("--tag", _PREFIX + "tags", multiple=True,
                           help="free label; repeat for several")(wrapper)
    wrapper = click.option("-f", "--file", "spec_file", type=click.Path(dir_okay=False),
                           default=None, help="YAML or JSON spec; flags override it")(wrapper)
    return wrapper


def to_spec(values: dict[str, Any]) -> JobSpec:
    """Validate, turning a :class:`SpecError` into exit code 2 with one line."""
    try:
        return build_spec(values)
    except SpecError as exc:
        raise BadSpec(str(exc)) from None


def load_file_or_fail(path: str) -> dict[str, Any]:
    try:
        return load_spec_file(path)
    except SpecError as exc:
        raise BadSpec(str(exc)) from None
