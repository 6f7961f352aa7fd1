"""``labctl spec schema|show`` and ``labctl validate FILE``."""

from __future__ import annotations

import json

import click

from labctl.cli.spec_options import load_file_or_fail, spec_options, to_spec, to_spec_and_recipe
from labctl.shared.recipes import recipe_for
from labctl.shared.spec import spec_schema


@click.group("spec")
def spec_group() -> None:
    """Inspect the job spec."""


# Every read command takes --json so scripts can pass it uniformly; these two print JSON
# already, so the flag changes nothing.
_accept_json = click.option("--json", "as_json", is_flag=True,
                            help="print JSON (the default here; for uniform scripts)")


@spec_group.command("schema")
@_accept_json
def schema(as_json: bool) -> None:
    """Print the JSON schema of a job spec, with every default."""
    click.echo(json.dumps(spec_schema(), indent=2))


@spec_group.command("show")
@spec_options
@_accept_json
def show(spec_values: dict, as_json: bool) -> None:
    """Print the spec that these options produce, defaults filled in; say on stderr which
    values came from the recipe of its model and dataset."""
    spec, from_recipe = to_spec_and_recipe(spec_values)
    recipe = recipe_for(spec_values)
    if recipe is not None and spec.lr is None and spec.optimizer in recipe.lr:
        from_recipe["lr"] = recipe.lr[spec.optimizer]
    if from_recipe and recipe is not None:
        click.echo(f"labctl: from the {recipe.name} recipe: "
                   + ", ".join(f"{k}={v}" for k, v in from_recipe.items()), err=True)
    resolved = spec.model_dump(mode="json")
    resolved["lr"] = spec.effective_lr
    resolved["image_size"] = spec.effective_image_size
    click.echo(json.dumps(resolved, indent=2))


@click.command("validate")
# No click.Path checks: load_spec_file names an empty name or a directory in one line.
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="print the validated spec as JSON")
def validate(file: str, as_json: bool) -> None:
    """Check a YAML or JSON spec file. Exit 0 if valid, 2 if not."""
    spec = to_spec(load_file_or_fail(file))
    if as_json:
        click.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
    else:
        click.echo(f"{file}: valid ({spec.model} / {spec.optimizer} / {spec.dataset}, "
                   f"{spec.epochs} epochs)")
