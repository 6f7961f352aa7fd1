"""The deployment files agree with the code: compose, Prometheus, Grafana, the image.

Nothing here needs a Docker engine: ``docker-compose config`` validates and resolves the
compose file, ``promtool`` checks the Prometheus config and every dashboard query.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from dashboards import (
    GRAFANA_VARIABLES,
    PROMETHEUS_YML,
    dashboard_exprs,
    load_dashboard,
    panels,
    substitute,
)

from labctl.shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources"
DASHBOARD_PROVIDERS = ROOT / "deploy/grafana/provisioning/dashboards"
DOCKERFILE = ROOT / "gpu.Dockerfile"
ENTRYPOINT = ROOT / "deploy/gpu-entrypoint.sh"
WORKERS = ("worker-gpu", "worker-cpu")

needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                   reason="docker-compose not installed (apt install "
                                   "docker-compose)")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (apt install prometheus)")


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def run_compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # A copy in a temp folder with its own .env: a developer's real .env never leaks in.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in env and not k.startswith(
        ("LABCTL_", "REDIS_", "GRAFANA_", "FLOWER_", "PROMETHEUS_", "DATA_DIR", "WORKER_"))}
    return subprocess.run(["docker-compose", "config"], cwd=tmp_path, env=clean,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (apt install docker-compose)")
    tmp = tmp_path_factory.mktemp("compose")
    done = run_compose_config(tmp, env_example())
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def mounts(service: dict) -> dict[str, str]:
    """container path -> 'source:mode'."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            out[target] = f"{source}:{mode[0] if mode else 'rw'}"
        else:
            mode = "ro" if volume.get("read_only") else "rw"
            out[volume["target"]] = f"{volume['source']}:{mode}"
    return out


def worker_queues(service: dict) -> set[str]:
    command = service["command"]
    command = command.split() if isinstance(command, str) else command
    for flag in ("--queues", "-Q", "--queue", "-q"):
        if flag in command:
            return set(command[command.index(flag) + 1].split(","))
    raise AssertionError(f"no queue flag in {command}")


# --- docker-compose.yml ------------------------------------------------------------------

@needs_compose
def test_compose_file_is_valid_and_has_every_service(compose):
    assert set(compose["services"]) >= {"redis", *WORKERS, "prometheus", "grafana", "flower",
                                        "cli"}
    # Optional pieces stay out of a plain `docker compose up`.
    assert compose["services"]["flower"]["profiles"] == ["flower"]
    assert compose["services"]["cli"]["profiles"] == ["cli"]
    for name in ("redis", *WORKERS, "prometheus", "grafana"):
        assert "profiles" not in compose["services"][name], name


@needs_compose
@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "DATA_DIR"])
def test_compose_refuses_to_start_without_a_required_setting(tmp_path, missing):
    env = {k: v for k, v in env_example().items() if k != missing}
    done = run_compose_config(tmp_path, env)
    assert done.returncode != 0
    assert missing in done.stderr


def variables_the_code_reads() -> set[str]:
    """LABCTL_* names: the Settings fields, plus the few read straight from os.environ."""
    names = {f"LABCTL_{field.upper()}" for field in Settings.model_fields}
    for package in ("cli", "worker", "shared"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"[\"'](LABCTL_[A-Z_]+)[\"']", path.read_text()))
    return names


@needs_compose
def test_every_labctl_variable_is_one_the_code_reads(compose):
    known = variables_the_code_reads()
    seen = set()
    for name, service in compose["services"].items():
        for key in service_env(service):
            if key.startswith("LABCTL_"):
                assert key in known, f"{name}: nothing in labctl reads {key}"
                seen.add(key)
    assert {"LABCTL_REDIS_URL", "LABCTL_ARTIFACTS_DIR", "LABCTL_DATA_DIR",
            "LABCTL_METRICS_PORT"} <= seen
    # The host-side variables in .env.example are settings too (labctl reads .env).
    for key in env_example():
        if key.startswith("LABCTL_") and key != "LABCTL_IMAGE":  # IMAGE: compose's own
            assert key.removeprefix("LABCTL_").lower() in Settings.model_fields, key


@needs_compose
def test_containers_reach_redis_with_its_password(compose):
    password = env_example()["REDIS_PASSWORD"]
    for name in (*WORKERS, "cli"):
        url = service_env(compose["services"][name])["LABCTL_REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0", name
    flower = service_env(compose["services"]["flower"])
    assert flower["CELERY_BROKER_URL"] == f"redis://:{password}@redis:6379/0"
    # And the host-side URL in .env.example uses the same password, on the published port.
    host_url = env_example()["LABCTL_REDIS_URL"]
    assert host_url == f"redis://:{password}@127.0.0.1:{env_example()['REDIS_PORT']}/0"


@needs_compose
def test_redis_persists_requires_a_password_and_is_health_checked(compose):
    redis = compose["services"]["redis"]
    command = redis["command"] if isinstance(redis["command"], str) else " ".join(
        redis["command"])
    assert "--appendonly yes" in command
    assert "--requirepass" in command and env_example()["REDIS_PASSWORD"] not in command
    assert re.search(r"redis-cli\b[^|]*\bping\b", " ".join(redis["healthcheck"]["test"]))
    assert mounts(redis)["/data"].startswith("redis-data:")
    assert all(str(p.get("host_ip", p) if isinstance(p, dict) else p).startswith("127.0.0.1")
               for p in redis["ports"])
    for name in (*WORKERS, "cli", "flower"):
        assert compose["services"][name]["depends_on"]["redis"]["condition"] == \
            "service_healthy", name


LABCTL_SERVICES = (*WORKERS, "cli")
TLS_ENV = {"REDIS_SCHEME": "rediss", "REDIS_TLS_DIR": "/srv/labctl-tls",
           "REDIS_TLS_CA": "/tls/ca.crt", "REDIS_TLS_CERT": "/tls/worker.crt",
           "REDIS_TLS_KEY": "/tls/worker.key", "REDIS_TLS_AUTH_CLIENTS": "yes",
           "REDIS_BIND": "0.0.0.0"}


def run_in_container(command: str | list[str], tmp_path: Path, env: dict[str, str],
                     fake: str) -> list[str]:
    """Run a service's resolved command (a shell line, or an argv list) with a stand-in for
    the ``fake`` program that records its arguments, and return them. Compose writes a
    literal ``$`` as ``$$``."""
    argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
    bin_dir = tmp_path / f"bin-{fake}"
    bin_dir.mkdir()
    record = tmp_path / f"{fake}.args"
    stand_in = bin_dir / fake
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho PONG\n')
    stand_in.chmod(0o755)
    done = subprocess.run([arg.replace("$$", "$") for arg in argv], capture_output=True,
                          text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env})
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


def redis_server_args(redis: dict, tmp_path: Path) -> list[str]:
    return run_in_container(redis["command"], tmp_path, service_env(redis), "redis-server")


def healthcheck_args(redis: dict, tmp_path: Path) -> list[str]:
    kind, line = redis["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    return run_in_container(line, tmp_path, service_env(redis), "redis-cli")


@needs_compose
def test_plain_loopback_redis_stays_the_default(compose, tmp_path):
    redis = compose["services"]["redis"]
    args = redis_server_args(redis, tmp_path)
    assert "--tls-port" not in args and "--port" not in args  # the plain port, 6379
    assert args[args.index("--requirepass") + 1] == env_example()["REDIS_PASSWORD"]
    for name in LABCTL_SERVICES:
        env = service_env(compose["services"][name])
        assert env["LABCTL_REDIS_URL"].startswith("redis://"), name
        assert not any(env[f"LABCTL_REDIS_TLS_{k}"] for k in ("CA", "CERT", "KEY")), name
    assert healthcheck_args(redis, tmp_path) == ["ping"]


@needs_compose
def test_compose_runs_redis_over_tls_when_the_variables_say_so(tmp_path):
    done = run_compose_config(tmp_path, {**env_example(), **TLS_ENV})
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    password = env_example()["REDIS_PASSWORD"]
    redis = services["redis"]
    args = redis_server_args(redis, tmp_path)
    # TLS only: no plain port, the TLS one where the plain one was.
    assert args[args.index("--port") + 1] == "0"
    assert args[args.index("--tls-port") + 1] == "6379"
    assert args[args.index("--tls-cert-file") + 1] == "/tls/redis.crt"
    assert args[args.index("--tls-key-file") + 1] == "/tls/redis.key"
    assert args[args.index("--tls-ca-cert-file") + 1] == "/tls/ca.crt"
    assert args[args.index("--tls-auth-clients") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == password and "--appendonly" in args
    assert mounts(redis)["/tls"] == "/srv/labctl-tls:ro"
    assert any("0.0.0.0" in (str(p.get("host_ip")) if isinstance(p, dict) else p)
               for p in redis["ports"])
    # The healthcheck speaks TLS too, or Redis never becomes healthy and nothing starts.
    health = healthcheck_args(redis, tmp_path)
    assert health[:3] == ["--tls", "--cacert", "/tls/ca.crt"] and health[-1] == "ping"
    for name in LABCTL_SERVICES:
        service = services[name]
        env = service_env(service)
        assert env["LABCTL_REDIS_URL"] == f"rediss://:{password}@redis:6379/0", name
        assert env["LABCTL_REDIS_TLS_CA"] == "/tls/ca.crt", name
        assert env["LABCTL_REDIS_TLS_CERT"] == "/tls/worker.crt", name
        assert env["LABCTL_REDIS_TLS_KEY"] == "/tls/worker.key", name
        assert mounts(service)["/tls"] == "/srv/labctl-tls:ro", name
    assert service_env(services["flower"])["CELERY_BROKER_URL"].startswith("rediss://")


@needs_compose
def test_workers_on_a_second_host_reach_the_first_hosts_redis(tmp_path):
    env = {**env_example(), **TLS_ENV, "REDIS_ADDRESS": "redis.lab.example:6380"}
    done = run_compose_config(tmp_path, env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name in LABCTL_SERVICES:
        url = service_env(services[name])["LABCTL_REDIS_URL"]
        assert url.startswith("rediss://:") and url.endswith("@redis.lab.example:6380/0")


@needs_compose
def test_workers_consume_the_queues_the_app_routes_to(compose):
    from labctl.worker.app import QUEUES, make_app

    assert worker_queues(compose["services"]["worker-gpu"]) == {"gpu"}
    assert worker_queues(compose["services"]["worker-cpu"]) == {"cpu"}
    declared = {q.name for q in make_app().conf.task_queues}
    assert declared == set(QUEUES) == {"cpu", "gpu"}
    import inspect

    from labctl.worker.metrics import QueueDepthCollector

    depth_queues = inspect.signature(QueueDepthCollector).parameters["queues"].default
    assert set(depth_queues) == set(QUEUES)  # queue depth covers every queue


@needs_compose
def test_gpu_worker_reserves_nvidia_gpus_and_shares_the_gpu_locks(compose):
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    lock_dir = re.search(r'lock_dir="\$\{LABCTL_GPU_LOCK_DIR:-([^}]+)\}"',
                         ENTRYPOINT.read_text()).group(1)
    assert mounts(gpu)[lock_dir].startswith("gpu-locks:")
    assert "deploy" not in compose["services"]["worker-cpu"]
    for name in WORKERS:  # DataLoader processes need more than Docker's 64 MB of /dev/shm
        assert "shm_size" in compose["services"][name], name


@needs_compose
def test_artefact_and_dataset_volumes_match_the_settings(compose):
    assert {"artifacts", "datasets", "gpu-locks"} <= set(compose["volumes"])
    for name in (*WORKERS, "cli"):
        service = compose["services"][name]
        env, mounted = service_env(service), mounts(service)
        assert mounted[env["LABCTL_ARTIFACTS_DIR"]] == "artifacts:rw", name
        assert mounted[env["LABCTL_DATA_DIR"]] == "datasets:ro", name
        assert env["LABCTL_DATA_DIR"] == "/data"
        if name in WORKERS:  # the decode cache must be writable, /data is not
            assert mounted[env["LABCTL_DATA_CACHE_DIR"]] == "data-cache:rw", name
    datasets = compose["volumes"]["datasets"]
    assert datasets["driver_opts"]["device"] == env_example()["DATA_DIR"]


@needs_compose
def test_prometheus_scrapes_every_worker_on_its_metrics_port(compose):
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_job = jobs["labctl-worker"]
    (sd,) = worker_job["dns_sd_configs"]
    assert set(sd["names"]) == set(WORKERS)
    for name in WORKERS:
        assert service_env(compose["services"][name])["LABCTL_METRICS_PORT"] == str(sd["port"])
    # The image's default and EXPOSE agree with it too.
    dockerfile = DOCKERFILE.read_text()
    assert f"LABCTL_METRICS_PORT={sd['port']}" in dockerfile
    assert re.search(rf"^EXPOSE {sd['port']}$", dockerfile, re.M)
    # A target label must not shadow a metric label (queue is on labctl_queue_depth).
    for relabel in worker_job.get("relabel_configs", []):
        assert relabel.get("target_label") not in {"queue", "job_id", "model", "optimizer",
                                                   "dataset", "state", "device"}
    prometheus = compose["services"]["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"].endswith(":ro")


@needs_compose
def test_grafana_is_provisioned_with_the_datasource_and_dashboard(compose, dashboard):
    grafana = compose["services"]["grafana"]
    mounted = mounts(grafana)
    assert mounted["/etc/grafana/provisioning"].endswith("deploy/grafana/provisioning:ro")
    (provider_file,) = DASHBOARD_PROVIDERS.glob("*.yml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert mounted[provider["options"]["path"]].endswith("deploy/grafana/dashboards:ro")
    (ds_file,) = DATASOURCES.glob("*.yml")
    (datasource,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    uids = {t["datasource"]["uid"] for p in panels(dashboard) for t in p["targets"]}
    uids |= {v["datasource"]["uid"] for v in dashboard["templating"]["list"]}
    assert uids == {datasource["uid"]}
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape
    env = service_env(grafana)
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == env_example()["GRAFANA_ADMIN_PASSWORD"]
    assert any(str(p.get("published", "")) == "3000" if isinstance(p, dict) else "3000" in p
               for p in grafana["ports"])


@needs_compose
def test_cli_service_runs_labctl_with_the_workers_settings(compose):
    cli, worker = compose["services"]["cli"], compose["services"]["worker-cpu"]
    assert cli["image"] == worker["image"]
    shared = {"LABCTL_REDIS_URL", "LABCTL_ARTIFACTS_DIR", "LABCTL_DATA_DIR"}
    assert {k: service_env(cli)[k] for k in shared} == {k: service_env(worker)[k]
                                                        for k in shared}


def test_env_example_sets_every_required_variable_and_env_is_ignored():
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE.read_text()))
    assert required <= set(env_example())
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# --- Prometheus --------------------------------------------------------------------------

@needs_promtool
def test_promtool_accepts_the_prometheus_config():
    done = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the Grafana dashboard ---------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Every sample name a worker can expose, collectors included."""
    import types

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from labctl.worker import metrics as m

    names = {s.name for f in text_string_to_metric_families(generate_latest(m.REGISTRY).decode())
             for s in f.samples}
    for collector in (m.EPOCH_DURATION, m.JOB_DURATION):
        base = collector._name
        names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    names |= {g._name for g in m.JOB_GAUGES} | {"labctl_jobs_total"}
    queue = m.QueueDepthCollector("redis://127.0.0.1:1/0")
    names |= {f.name for f in queue.describe()}
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        is_initialized=lambda: True, device_count=lambda: 1, memory_allocated=lambda i: 0,
        memory_reserved=lambda i: 0,
        get_device_properties=lambda i: types.SimpleNamespace(total_memory=1)))
    import sys

    real = sys.modules.get("torch")
    sys.modules["torch"] = fake
    try:
        names |= {s.name for f in m.GpuMemoryCollector().collect() for s in f.samples}
    finally:
        if real is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = real
    return names


def test_dashboard_panels_all_query_something(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    for panel in panels(dashboard):
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), panel["title"]
            assert target.get("refId"), panel["title"]


def test_dashboard_queries_only_metrics_the_worker_exports(dashboard):
    exported = exported_metric_names()
    for title, expr in dashboard_exprs(dashboard):
        for name in re.findall(r"\b(labctl_[a-z0-9_]+)", expr):
            assert name in exported, f"{title}: {name} is not exported by shared.metrics"


def test_dashboard_covers_the_required_views(dashboard):
    text = " ".join(expr for _, expr in dashboard_exprs(dashboard))
    for metric in ("labctl_job_train_loss", "labctl_job_test_loss",
                   "labctl_job_test_accuracy_ratio", "labctl_job_test_f1_macro_ratio",
                   "labctl_epoch_duration_seconds", "labctl_job_images_per_second",
                   "labctl_jobs_total", "labctl_queue_depth", "labctl_gpu_memory"):
        assert metric in text, metric


def test_dashboard_variables_select_model_optimizer_and_job(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"model", "optimizer", "job"} <= set(variables)
    for name in ("model", "optimizer", "job"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
    job_gauges = [expr for _, expr in dashboard_exprs(dashboard) if "labctl_job_" in expr
                  and "duration" not in expr]
    assert job_gauges
    for expr in job_gauges:  # every per-job panel follows the selection
        for label, var in (("model", "$model"), ("optimizer", "$optimizer"),
                           ("job_id", "$job")):
            assert f'{label}=~"{var}"' in expr, expr
    # Adam and AdaMax side by side: a panel repeated per selected optimizer.
    assert any(p.get("repeat") == "optimizer" for p in panels(dashboard))


def test_dashboard_panels_do_not_overlap(dashboard):
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path, dashboard):
    # promtool has no "check expression": each query becomes a recording rule instead.
    variables = {**GRAFANA_VARIABLES, "$model": ".*", "$optimizer": ".*", "$dataset": ".*",
                 "$job": ".*"}
    rules = [{"record": f"labctl:dashboard_check_{i}", "expr": substitute(expr, variables)}
             for i, (_, expr) in enumerate(dashboard_exprs(dashboard))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the image ---------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_image_runs_as_a_non_root_user_with_a_healthcheck_and_the_worker_command():
    instructions = dockerfile_instructions()
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in {"root", "0", "0:0"}
    assert any(kw == "HEALTHCHECK" and "/metrics" in rest for kw, rest in instructions)
    (cmd,) = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    assert cmd[:2] == ["labctl", "worker"]
    # The USER comes before the CMD, after every install step.
    kinds = [kw for kw, _ in instructions]
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")


def test_image_installs_dependencies_before_copying_the_source():
    instructions = dockerfile_instructions()
    copies = [(i, rest) for i, (kw, rest) in enumerate(instructions) if kw == "COPY"]
    runs = [(i, rest) for i, (kw, rest) in enumerate(instructions) if kw == "RUN"]
    first_source = min(i for i, rest in copies if re.search(r"\b(cli|worker|shared)\b", rest))
    deps_install = min(i for i, rest in runs if "pip install" in rest)
    pyproject = min(i for i, rest in copies if "pyproject.toml" in rest)
    assert pyproject < deps_install < first_source


def test_every_copied_path_exists_and_is_not_docker_ignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for kw, rest in dockerfile_instructions():
        if kw != "COPY":
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            if "*" in source:
                continue
            assert (ROOT / source).exists(), source
            top = source.split("/")[0]
            assert top not in ignored or f"!{source}" in ignored, f"{source} is dockerignored"
    for secret in (".env", ".venv", ".git", "artifacts"):
        assert secret in ignored


def test_dockerfile_dependencies_come_from_pyproject(tmp_path):
    # The image installs exactly pyproject's list (no second requirements file to drift):
    # run the Dockerfile's own extraction command on pyproject.toml and compare.
    text = DOCKERFILE.read_text()
    command = re.search(r'python -c "(.+?)" \\\n\s*> /tmp/requirements.txt', text)
    assert command, "the dependency layer's extraction command moved"
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    extracted = subprocess.run([sys.executable, "-c", command[1]], cwd=tmp_path, text=True,
                               capture_output=True, check=True).stdout.split()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert extracted == [dep.replace(" ", "") for dep in declared]
    assert "torch==2.14.1" in extracted and "torchvision==0.29.1" in extracted
    assert "pip install -r /tmp/requirements.txt" in text
    assert "pip install --no-deps ." in text  # the source adds no dependency of its own


# --- deploy/gpu-entrypoint.sh ------------------------------------------------------------

@pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) not installed")
def test_gpu_entrypoint_gives_each_replica_its_own_gpu(tmp_path):
    dev, locks = tmp_path / "dev", tmp_path / "locks"
    dev.mkdir()
    locks.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    env = {**os.environ, "LABCTL_GPU_LOCK_DIR": str(locks), "LABCTL_GPU_DEV_DIR": str(dev)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    probe = ["sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"; exec sleep 30']

    def start():
        return subprocess.Popen([str(ENTRYPOINT), *probe], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = start()
    try:
        assert first.stdout.readline().strip() == "0"
        second = start()
        try:
            assert second.stdout.readline().strip() == "1"
            third = subprocess.run([str(ENTRYPOINT), "true"], env=env, capture_output=True,
                                   text=True, timeout=30)
            assert third.returncode == 75 and "all 2 GPUs are taken" in third.stderr
        finally:
            second.kill()
            second.wait()
        # A replica that died frees its GPU for the next one.
        deadline = time.monotonic() + 10
        while True:
            again = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES"'],
                                   env=env, capture_output=True, text=True, timeout=30)
            if again.stdout.strip() == "1" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.stdout.strip() == "1"
    finally:
        first.kill()
        first.wait()


def test_gpu_entrypoint_is_a_no_op_without_gpus_or_lock_folder(tmp_path):
    env = {**os.environ, "LABCTL_GPU_LOCK_DIR": str(tmp_path / "absent"),
           "LABCTL_GPU_DEV_DIR": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]" "$@"',
                           "_", "a b", "c"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "[] a b c"
    (tmp_path / "locks").mkdir()  # a lock folder but no /dev/nvidiaN (a CPU worker)
    env["LABCTL_GPU_LOCK_DIR"] = str(tmp_path / "locks")
    done = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "[]"


@needs_compose
def test_worker_commands_parse_with_the_real_cli(compose):
    from labctl.cli.worker_cmd import worker

    for name in WORKERS:
        command = compose["services"][name]["command"]
        assert command[:2] == ["labctl", "worker"], name
        ctx = worker.make_context("worker", list(command[2:]))  # parses, runs nothing
        assert ctx.params["concurrency"] == 1, f"{name}: one solo worker per container"
        assert ctx.params["metrics_port"] is None  # so LABCTL_METRICS_PORT applies


def test_gpu_entrypoint_leaves_a_multi_gpu_worker_its_gpus(tmp_path):
    """LABCTL_GPUS (labctl worker --gpus): the worker owns those GPUs and sets
    CUDA_VISIBLE_DEVICES itself; the entrypoint must not pin it to one GPU."""
    dev, locks = tmp_path / "dev", tmp_path / "locks"
    dev.mkdir()
    locks.mkdir()
    for name in ("nvidia0", "nvidia1"):
        (dev / name).touch()
    env = {**os.environ, "LABCTL_GPU_LOCK_DIR": str(locks), "LABCTL_GPU_DEV_DIR": str(dev),
           "LABCTL_GPUS": "0,1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([str(ENTRYPOINT), "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"'],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "[]"
    assert not list(locks.iterdir())  # no GPU claimed from the replicas
