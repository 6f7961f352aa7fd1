"""Reading the Grafana dashboard the way Grafana does, for test_deploy and the Prometheus
integration test."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/labctl.json"
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"

#: Grafana's built-in variables, as it would fill them for a 15 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data, including those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.extend(panel.get("panels", []))
        if panel["type"] != "row":
            out.append(panel)
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    # Longest name first: $__rate_interval must not be mangled by a shorter $__r... name.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(name, variables[name])
    return expr


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]
