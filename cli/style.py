"""Colour for a terminal: job states at a glance (succeeded green, failed red, running
yellow). ``click.echo`` drops the colour when the output is not a terminal, and
``NO_COLOR`` (https://no-color.org) turns it off everywhere."""

from __future__ import annotations

import os

import click

STATE_COLOURS = {"succeeded": "green", "failed": "red", "running": "yellow",
                 "cancelled": "magenta", "abandoned": "red", "queued": "cyan"}


def state_text(state: str, text: str | None = None) -> str:
    """``text`` (default: ``state``) coloured as ``state``, unless NO_COLOR is set."""
    text = state if text is None else text
    if os.environ.get("NO_COLOR") or state not in STATE_COLOURS:
        return text
    return click.style(text, fg=STATE_COLOURS[state])
