"""The stack in containers: the real ``docker-compose.yml`` and the image of ``gpu.Dockerfile``.

Runs only with ``LABCTL_CONTAINER_TESTS=1`` (``make test-containers``), on a machine prepared
with ``../shared/tools/container-engine setup`` and an image built by ``container-engine
build-image``: podman behind a Docker-compatible socket, driven by docker-compose.

Nothing in the compose file is rewritten: the test writes an env file the way a user copies
``.env.example`` to ``.env`` (its own passwords, free ports, a temp ``DATA_DIR``) and runs
compose under its own project name, so the stack, its volumes and its network are private.
The one thing podman does differently is the healthchecks: it schedules them through systemd,
absent here, so the test runs ``container-engine health`` in a loop, as a Docker engine would
on its own (``depends_on: condition: service_healthy`` waits for that).

One stack for the module; the tests run in file order, each leaving it as it found it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from dashboards import GRAFANA_VARIABLES, load_dashboard, panels, substitute
from test_deploy import env_example

from labctl.shared.records import JobRecords
from labctl.shared.testing import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENGINE = Path(os.environ.get("LABCTL_CONTAINER_ENGINE",
                             ROOT.parent / "shared/tools/container-engine"))
DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///run/podman/podman.sock")
IMAGE = "labctl:latest"
PASSWORD = "containers-test-pw"
#: The deploy config scrapes every 15 s and refreshes its DNS discovery every 15 s.
SCRAPE_SECONDS = 15

pytestmark = [
    pytest.mark.containers,
    pytest.mark.skipif(os.environ.get("LABCTL_CONTAINER_TESTS") != "1",
                       reason="container tests run with `make test-containers`"),
]

#: A digits job that trains for about half a minute in a container on a quiet machine (batch 2:
#: an epoch is ~0.6 s), long enough to be stopped after its second epoch with most still to go.
#: Longer under load, which the waits allow for; the Redis test pauses the worker instead of
#: counting on any job's length.
LONG_JOB = ["--model", "numpy-cnn", "--dataset", "digits", "--opt", "adamax",
            "--epochs", "40", "--batch-size", "2", "--seed", "1"]
SHORT_JOB = ["--model", "numpy-cnn", "--dataset", "digits", "--opt", "adamax",
             "--epochs", "2", "--batch-size", "16"]
ENDED = ("succeeded", "failed", "cancelled")


class Stack:
    """One compose project, driven the way docs/deploy.md drives it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.project = f"labctlct{os.getpid()}"
        self.redis_port, self.prometheus_port = free_port(), free_port()
        data_dir = tmp / "datasets"
        data_dir.mkdir()
        env = {**env_example(), "REDIS_PASSWORD": PASSWORD, "GRAFANA_ADMIN_PASSWORD": "unused",
               "FLOWER_PASSWORD": "unused", "DATA_DIR": str(data_dir),
               "REDIS_PORT": str(self.redis_port), "PROMETHEUS_PORT": str(self.prometheus_port),
               "WORKER_SHM_SIZE": "256m", "LABCTL_IMAGE": IMAGE,
               # The Redis test pauses the worker (heartbeats and all) for up to a minute or
               # two under load: its own lease must not run out meanwhile.
               "LABCTL_HEARTBEAT_SECONDS": "2", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "300"}
        self.env_file = tmp / "compose.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        # The developer's shell must not override the env file (compose prefers it).
        self.process_env = {k: v for k, v in os.environ.items() if not k.startswith(
            ("LABCTL_", "REDIS_", "GRAFANA_", "FLOWER_", "PROMETHEUS_", "DATA_DIR", "WORKER_",
             "COMPOSE_"))}
        self.process_env["DOCKER_HOST"] = DOCKER_HOST
        self._health_stop = threading.Event()
        self._health = threading.Thread(target=self._health_loop, daemon=True)
        self.records = JobRecords.from_url(f"redis://:{PASSWORD}@127.0.0.1:{self.redis_port}/0")

    def compose(self, *args: str, timeout: float = 300, check: bool = True
                ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            ["docker-compose", "-p", self.project, "-f", str(COMPOSE),
             "--env-file", str(self.env_file), *args],
            env=self.process_env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
        return done

    def labctl(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``docker compose run --rm cli labctl ...`` (-T: no terminal here)."""
        return self.compose("run", "--rm", "-T", "cli", "labctl", *args, timeout=timeout)

    def submit(self, *args: str) -> str:
        return self.labctl("submit", *args).stdout.splitlines()[0].strip()

    def copy_out(self, job_id: str) -> Path:
        """The copy-out command of docs/deploy.md, section 6."""
        out = self.tmp / f"out-{job_id}"
        out.mkdir()
        self.compose("run", "--rm", "-T", "--user", f"{os.getuid()}:{os.getgid()}",
                     "-v", f"{out}:/out", "cli", "sh", "-c", f"cp -r /artifacts/{job_id} /out/")
        return out / job_id

    def container_ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def health(self, container_id: str) -> str | None:
        done = subprocess.run(["podman", "inspect", container_id], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            return None
        state = json.loads(done.stdout)[0]["State"]
        return (state.get("Health") or state.get("Healthcheck") or {}).get("Status")

    def healthy(self, *services: str) -> bool:
        ids = [i for s in services for i in (self.container_ids(s) or [None])]
        return all(i is not None and self.health(i) == "healthy" for i in ids)

    def _health_loop(self) -> None:
        while not self._health_stop.wait(3):
            subprocess.run([str(ENGINE), "health"], capture_output=True, timeout=120)

    def up(self) -> Stack:
        self._health.start()
        self.compose("up", "-d", "redis", "worker-cpu", "prometheus", timeout=600)
        wait_for(lambda: self.healthy("redis", "worker-cpu", "prometheus"), 180, interval=2,
                 what="redis, worker-cpu and prometheus to be healthy")
        return self

    def down(self) -> None:
        try:
            self.compose("--profile", "cli", "down", "-v", "--remove-orphans", timeout=300,
                         check=False)
        finally:
            self._health_stop.set()
            self._health.join(timeout=130)

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout

    # --- job records, read from the published Redis port ----------------------------------

    def record(self, job_id: str) -> dict:
        return self.records.get(job_id) or {}

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 480) -> dict:
        return wait_for(lambda: (r := self.record(job_id)).get("state") in states and r,
                        timeout, interval=0.5, what=f"job {job_id} to be {states}")

    def wait_epoch(self, job_id: str, epoch: int, timeout: float = 240) -> dict:
        return wait_for(lambda: (r := self.record(job_id)).get("state") == "running"
                        and (r.get("epoch") or 0) >= epoch and r,
                        timeout, interval=0.3, what=f"job {job_id} to reach epoch {epoch}")

    # --- Prometheus, through its published loopback port ----------------------------------

    def prometheus(self, path: str, **params) -> list:
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}?{query}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        data = body["data"]
        return data["result"] if isinstance(data, dict) and "result" in data else data

    def worker_targets(self) -> list[dict]:
        targets = self.prometheus("targets", state="active")["activeTargets"]
        return [t for t in targets if t["labels"].get("job") == "labctl-worker"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    if not ENGINE.exists():
        pytest.fail(f"{ENGINE} not found: the container tests need the container engine")
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose not installed: run `container-engine setup` first")
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        pytest.fail(f"no {IMAGE} image: run `container-engine build-image` first")
    tmp = tmp_path_factory.mktemp("containers")
    os.chmod(tmp, 0o755)  # the containers' uid 10001 reads DATA_DIR below it
    built = Stack(tmp)
    try:
        built.up()
        yield built
    except BaseException:
        print(built.logs())
        raise
    finally:
        built.down()


def metrics_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- the tests, in order ------------------------------------------------------------------

def test_worker_runs_as_the_image_user_and_reaches_redis(stack):
    (worker,) = stack.container_ids("worker-cpu")
    done = subprocess.run(["podman", "exec", worker, "id", "-u"], capture_output=True,
                          text=True, timeout=30)
    assert done.stdout.strip() == "10001", done.stderr
    workers = stack.records.live_workers()
    assert len(workers) == 1 and workers[0]["queues"] == ["cpu"], workers


def test_a_job_submitted_through_the_cli_service_succeeds_and_its_artefacts_copy_out(stack):
    done = stack.labctl("submit", *SHORT_JOB, "--follow")
    job_id = done.stdout.splitlines()[0].strip()
    # The id on stdout, the epochs and the outcome on stderr.
    assert f"job {job_id} succeeded" in done.stderr, (done.stdout, done.stderr)
    folder = stack.copy_out(job_id)
    rows = metrics_rows(folder)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert json.loads((folder / "status.json").read_text())["state"] == "succeeded"
    assert json.loads((folder / "summary.json").read_text())["job_id"] == job_id
    assert (folder / "model.npz").is_file(), sorted(p.name for p in folder.iterdir())
    # The docs say the files are world-readable, so the host user's copy could read them.
    assert all(p.stat().st_uid == os.getuid() for p in folder.rglob("*"))


def test_a_stopped_worker_hands_its_job_back_and_it_finishes_each_epoch_once(stack):
    job_id = stack.submit(*LONG_JOB)
    stack.wait_epoch(job_id, 2)
    stack.compose("stop", "worker-cpu", timeout=120)  # SIGTERM, the file's grace period
    record = stack.record(job_id)
    assert record["state"] == "queued", record
    assert record["attempts"] == 2, record
    stack.compose("start", "worker-cpu")
    record = stack.wait_state(job_id, ENDED)
    assert record["state"] == "succeeded", (record, stack.logs())
    folder = stack.copy_out(job_id)
    epochs = int(LONG_JOB[LONG_JOB.index("--epochs") + 1])
    assert [r["epoch"] for r in metrics_rows(folder)] == list(range(1, epochs + 1))
    log = stack.records.read_log(job_id)
    assert any("resumed from checkpoint after epoch" in line for line in log), log


def test_prometheus_scrapes_the_worker_and_the_dashboard_has_data_for_the_job(stack):
    targets = wait_for(lambda: [t for t in stack.worker_targets() if t["health"] == "up"],
                       3 * SCRAPE_SECONDS, interval=1, what="an up labctl-worker target")
    assert {t["labels"]["pool"] for t in targets} == {"cpu"}
    # A job's gauges live only while it runs and the file scrapes every 15 s: this job runs
    # until Prometheus holds two scrapes of it, then is cancelled (no time is spent on the
    # rest of its epochs).
    job_id = stack.submit("--model", "numpy-cnn", "--dataset", "digits", "--opt", "adamax",
                          "--epochs", "200", "--batch-size", "2")
    wait_for(lambda: stack.prometheus(
        "query", query=f'count_over_time(labctl_job_epoch{{job_id="{job_id}"}}[15m]) >= 2'),
        8 * SCRAPE_SECONDS, interval=2, what="two scrapes of the job's gauges")
    stack.labctl("cancel", job_id)
    assert stack.wait_state(job_id, ENDED)["state"] == "cancelled"
    record = stack.record(job_id)
    # The end's counts are scraped within one interval.
    time.sleep(SCRAPE_SECONDS + 2)
    end = time.time()
    start = end - 15 * 60
    variables = {**GRAFANA_VARIABLES, "$__range": "15m", "$model": record["model"],
                 "$dataset": record["dataset"], "$optimizer": f"({record['optimizer']})",
                 "$job": f"({job_id})"}
    empty = []
    for panel in panels(load_dashboard()):
        repeat = panel.get("repeat")
        local = {**variables, **({f"${repeat}": record["optimizer"]} if repeat else {})}
        for target in panel["targets"]:
            expr = substitute(target["expr"], local)
            if "labctl_gpu_memory" in expr:
                continue  # a numpy job on a CPU worker never initialises CUDA
            if target.get("instant"):
                result = stack.prometheus("query", query=expr, time=end)
            else:
                result = stack.prometheus("query_range", query=expr, start=start, end=end,
                                          step=SCRAPE_SECONDS)
            values = [float(v) for series in result
                      for _, v in (series.get("values") or [series["value"]])]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_a_redis_restart_mid_job_loses_neither_the_job_nor_the_queued_ones(stack):
    running = stack.submit(*LONG_JOB)
    stack.wait_epoch(running, 1)
    # Frozen mid-job (SIGSTOP-like, through the cgroup freezer) for the submissions and the
    # restart, so the job is certainly still running when Redis goes, however fast it trains.
    # podman's own pause: compose v1 lists only running containers, so its `unpause` finds
    # none on podman (a paused container is not in `ps`).
    (worker,) = stack.container_ids("worker-cpu")
    subprocess.run(["podman", "pause", worker], check=True, capture_output=True, timeout=60)
    try:
        queued = [stack.submit(*SHORT_JOB, "--seed", str(seed)) for seed in (2, 3)]
        assert stack.record(running)["state"] == "running"
        assert [stack.record(j)["state"] for j in queued] == ["queued", "queued"]
        stack.compose("restart", "redis", timeout=120)
        # AOF on the redis-data volume: the records and the queue came back with Redis.
        wait_for(lambda: _pings(stack), 60, interval=0.5, what="redis to answer again")
    finally:
        subprocess.run(["podman", "unpause", worker], check=True, capture_output=True,
                       timeout=60)
    for job_id in (running, *queued):
        record = stack.wait_state(job_id, ENDED)
        assert record["state"] == "succeeded", (job_id, record, stack.logs())


def _pings(stack: Stack) -> bool:
    try:
        return stack.records.client.ping()
    except Exception:  # noqa: BLE001 - any failure means not yet
        return False


def test_two_cpu_workers_get_distinct_names_and_share_the_queue(stack):
    stack.compose("up", "-d", "--no-recreate", "--scale", "worker-cpu=2", "worker-cpu",
                  timeout=300)
    wait_for(lambda: len(stack.container_ids("worker-cpu")) == 2
             and stack.healthy("worker-cpu"), 180, interval=2,
             what="two healthy worker-cpu replicas")
    names = wait_for(lambda: len(n := {w["name"] for w in stack.records.live_workers()}) == 2
                     and n, 60, interval=1, what="two live workers")
    # Each job outlasts the next one's submission (a few seconds of `compose run`), so the
    # second goes to the idle worker: prefetch 1, and the busy one holds its single slot.
    jobs = [stack.submit(*LONG_JOB[:-2], "--seed", str(seed)) for seed in (4, 5)]
    records = [stack.wait_state(job_id, ENDED) for job_id in jobs]
    assert [r["state"] for r in records] == ["succeeded", "succeeded"], records
    assert {r["worker"] for r in records} == names, (records, names)
    # Prometheus finds the new replica through the service name's DNS records.
    up = wait_for(lambda: len(t := [t for t in stack.worker_targets() if t["health"] == "up"])
                  == 2 and t, 4 * SCRAPE_SECONDS, interval=1, what="two up worker targets")
    assert len({t["labels"]["instance"] for t in up}) == 2


def test_teardown_removes_the_volumes(stack):
    volumes = subprocess.run(["podman", "volume", "ls", "-q"], capture_output=True, text=True,
                             timeout=30).stdout.split()
    ours = {v for v in volumes if v.startswith(f"{stack.project}_")}
    assert {f"{stack.project}_artifacts", f"{stack.project}_redis-data"} <= ours
    stack.down()
    volumes = subprocess.run(["podman", "volume", "ls", "-q"], capture_output=True, text=True,
                             timeout=30).stdout.split()
    assert not [v for v in volumes if v.startswith(f"{stack.project}_")]
    assert not stack.container_ids("redis")


# --- deploy/gpu-entrypoint.sh, in containers of the image ---------------------------------

def test_gpu_entrypoint_in_the_image_gives_each_replica_its_own_gpu(tmp_path):
    """No GPU here: each container gets two fake ``/dev/nvidiaN`` nodes (what the NVIDIA
    runtime would mount; the script counts them, it does not call nvidia-smi) and the
    replicas share a real named volume at the image's lock folder, as worker-gpu's do."""
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        pytest.fail(f"no {IMAGE} image: run `container-engine build-image` first")
    volume = f"labctlct{os.getpid()}-gpu-locks"
    names = [f"{volume}-{i}" for i in range(2)]
    fake_dev = "mkdir -p /tmp/dev && touch /tmp/dev/nvidia0 /tmp/dev/nvidia1 /tmp/dev/nvidiactl"

    def replica(name: str | None, command: str, detach: bool) -> subprocess.CompletedProcess:
        # The image's own entrypoint, reached through exec from a shell that fakes the nodes.
        args = ["podman", "run", "--rm", *(["-d", "--name", name] if detach else []),
                "-v", f"{volume}:/var/lock/labctl-gpus", "-e", "LABCTL_GPU_DEV_DIR=/tmp/dev",
                "--entrypoint", "sh", IMAGE, "-c",
                f'{fake_dev} && exec labctl-entrypoint sh -c \'{command}\'']
        return subprocess.run(args, capture_output=True, text=True, timeout=120)

    def logs(name: str) -> str:
        return subprocess.run(["podman", "logs", name], capture_output=True, text=True,
                              timeout=30).stdout

    try:
        held = 'echo "gpu=$CUDA_VISIBLE_DEVICES order=$CUDA_DEVICE_ORDER uid=$(id -u)"; sleep 120'
        for name in names:
            assert replica(name, held, detach=True).returncode == 0
            wait_for(lambda n=name: "gpu=" in logs(n), 60, interval=0.5, what=f"{name} to start")
        assert [logs(n).strip() for n in names] == [
            "gpu=0 order=PCI_BUS_ID uid=10001", "gpu=1 order=PCI_BUS_ID uid=10001"]
        third = replica(None, "true", detach=False)
        assert third.returncode == 75 and "all 2 GPUs are taken" in third.stderr, third
        # A replica that exits frees its GPU for the next one (the lock dies with it).
        subprocess.run(["podman", "rm", "-f", "-t", "0", names[0]], capture_output=True,
                       timeout=60)
        again = replica(None, 'echo "gpu=$CUDA_VISIBLE_DEVICES"', detach=False)
        assert again.returncode == 0 and again.stdout.strip() == "gpu=0", again
    finally:
        for name in names:
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True,
                           timeout=60)
        subprocess.run(["podman", "volume", "rm", "-f", volume], capture_output=True,
                       timeout=60)
