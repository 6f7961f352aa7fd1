"""The spec flags shared by every command that takes a spec (run, submit, sweep).

``-f FILE`` loads a YAML/JSON spec; each flag given on the command line overrides the
file's field. Values reach pydantic as typed by the user, so a bad value is reported by
the spec itself, naming the field ("epochs: Input should be greater than or equal to 1").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any, Literal, get_args, get_origin

import click

from labctl.cli.errors import BadSpec
from labctl.shared.recipes import with_recipe
from labctl.shared.spec import JobSpec, SpecError, build_spec, load_spec_file

# (flag declarations, spec field); each flag's help comes from the field (field_help).
# Numbers are read strictly (:class:`SpecNumber`); pydantic checks every value's range.
VALUE_FLAGS: list[tuple[tuple[str, ...], str]] = [
    (("--model",), "model"),
    (("--opt", "--optimizer"), "optimizer"),
    (("--dataset",), "dataset"),
    (("--data-root",), "data_root"),
    (("--epochs",), "epochs"),
    (("--batch-size",), "batch_size"),
    (("--lr",), "lr"),
    (("--weight-decay",), "weight_decay"),
    (("--lr-schedule",), "lr_schedule"),
    (("--warmup-epochs",), "warmup_epochs"),
    (("--image-size",), "image_size"),
    (("--num-classes",), "num_classes"),
    (("--seed",), "seed"),
    (("--device",), "device"),
    (("--devices",), "devices"),
    (("--limit-train",), "limit_train"),
    (("--limit-test",), "limit_test"),
    (("--validation",), "validation"),
    (("--num-workers",), "num_workers"),
    (("--data-path",), "data_path"),
    (("--init-weights",), "init_weights"),
    (("--name",), "name"),
    (("--priority",), "priority"),
]
BOOL_FLAGS: list[tuple[str, str]] = [
    ("--amp/--no-amp", "amp"),
    ("--channels-last/--no-channels-last", "channels_last"),
    ("--compile/--no-compile", "compile"),
    ("--crop-to-bbox/--no-crop-to-bbox", "crop_to_bbox"),
]
_PREFIX = "spec__"


class SpecNumber(click.ParamType):
    """An INTEGER or FLOAT flag, written plainly: ``5_0`` or ``0x10`` are refused (Python's
    ``int()`` would read them as 50 and 16). The range is left to the spec, whose message
    names the field."""

    _PATTERNS = {"integer": r"[+-]?\d+",
                 "float": r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"}

    def __init__(self, kind: str, field: str, *, lists: bool = False):
        self.name, self.kind = kind, int if kind == "integer" else float
        self.field, self.lists = field, lists

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"{self.name.upper()}[,...]" if self.lists else self.name.upper()

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        items = [item.strip() for item in text.split(",")] if self.lists else [text]
        for item in items:
            if (item or not self.lists) and not re.fullmatch(self._PATTERNS[self.name], item):
                # As the spec's own errors read: one line naming the field, exit 2.
                raise BadSpec(f"{self.field}: {item!r} is not "
                              f"{'an' if self.name == 'integer' else 'a'} {self.name}")
        # A comma list stays text for the sweep's grid (empty items are the grid's to refuse).
        return text if len(items) > 1 or not text else self.kind(text)


def flag_type(name: str, lists: bool = False) -> click.ParamType | None:
    """INTEGER or FLOAT for numeric fields (``int | None`` included); None: text. With
    ``lists``, a comma list of them (``labctl sweep``)."""
    annotation = JobSpec.model_fields[name].annotation
    kinds = {annotation, *get_args(annotation)}
    if int in kinds:
        return SpecNumber("integer", name, lists=lists)
    if float in kinds:
        return SpecNumber("float", name, lists=lists)
    return None


def value_range(name: str) -> str:
    """The field's bounds as Click writes a range, e.g. ``1<=x<=1000``; '' if none."""
    low = high = ""
    for rule in JobSpec.model_fields[name].metadata:
        if (ge := getattr(rule, "ge", None)) is not None:
            low = f"{ge}<="
        if (gt := getattr(rule, "gt", None)) is not None:
            low = f"{gt}<"
        if (le := getattr(rule, "le", None)) is not None:
            high = f"<={le}"
        if (lt := getattr(rule, "lt", None)) is not None:
            high = f"<{lt}"
    return f"{low}x{high}" if low or high else ""


def field_help(name: str) -> str:
    """A flag's help from its spec field: the description, the choices, ``[default]``."""
    info = JobSpec.model_fields[name]
    text = (info.description or name).rstrip(".")
    if get_origin(info.annotation) is Literal:
        text += f" ({' | '.join(get_args(info.annotation))})"
    default = info.get_default(call_default_factory=True)
    if bounds := value_range(name):
        text += f" ({bounds})"
    if isinstance(default, bool):
        text += f" [{'on' if default else 'off'}]"
    elif default is not None:
        text += f" [{default}]"
    return text


def spec_options(fn: Callable[..., Any] | None = None, *, lists: bool = False) -> Any:
    """Add ``-f FILE`` and every spec flag; the command receives ``spec_values: dict``
    (file fields overridden by the flags that were given). ``@spec_options(lists=True)``:
    numeric flags also take comma lists (``labctl sweep``)."""
    if fn is None:
        return functools.partial(spec_options, lists=lists)

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
    for decls, field in reversed(VALUE_FLAGS):
        wrapper = click.option(*decls, _PREFIX + field, default=None,
                               type=flag_type(field, lists), help=field_help(field))(wrapper)
    for decl, field in reversed(BOOL_FLAGS):
        wrapper = click.option(decl, _PREFIX + field, default=None,
                               help=field_help(field))(wrapper)
    wrapper = click.option("--tag", _PREFIX + "tags", multiple=True,
                           help="free label; repeat for several")(wrapper)
    wrapper = click.option("-f", "--file", "spec_file", type=click.Path(dir_okay=False),
                           default=None, help="YAML or JSON spec; flags override it")(wrapper)
    return wrapper


def to_spec(values: dict[str, Any]) -> JobSpec:
    """Validate, with the recipe of its (model, dataset) for the fields left unset
    (``shared/recipes.py``), turning a :class:`SpecError` into exit code 2 with one line."""
    return to_spec_and_recipe(values)[0]


def to_spec_and_recipe(values: dict[str, Any]) -> tuple[JobSpec, dict[str, Any]]:
    """:func:`to_spec`, and the values its recipe decided."""
    resolved, from_recipe = with_recipe(values)
    try:
        return build_spec(resolved), from_recipe
    except SpecError as exc:
        raise BadSpec(str(exc)) from None


def load_file_or_fail(path: str) -> dict[str, Any]:
    try:
        return load_spec_file(path)
    except SpecError as exc:
        raise BadSpec(str(exc)) from None
