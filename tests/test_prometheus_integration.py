"""A real Prometheus scrapes a real worker running real jobs; the dashboard's queries work.

One stack for the module: a private password-protected ``redis-server``, one ``labctl
worker`` on the cpu queue serving /metrics on a free port, and ``prometheus`` on loopback
scraping it every second. Two numpy-cnn jobs on digits are submitted with ``labctl submit``:
AdaMax first (long enough to be scraped mid-job), then Adam, which waits in the queue
meanwhile, so queue depth, both optimizers and the side-by-side panels all get data.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dashboards import GRAFANA_VARIABLES, PROMETHEUS_YML, load_dashboard, panels, substitute
from prometheus_client.parser import text_string_to_metric_families

from labctl.shared.artifacts import ArtifactStore
from labctl.shared.testing import RedisServer, WorkerProcess, free_port, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus not installed (apt install prometheus)"),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server not installed (apt install redis-server)"),
]

PASSWORD = "metrics-test-pw"
SCRAPE_SECONDS = 0.5
#: Both jobs must span several scrapes, and a digits epoch at batch 8 takes only 0.15 s on a
#: quiet machine: a job's gauges live from its first epoch's end to its last.
LONG_JOB = {"model": "numpy-cnn", "opt": "adamax", "dataset": "digits", "epochs": 12,
            "batch-size": 8, "seed": 1}
SHORT_JOB = {**LONG_JOB, "opt": "adam", "epochs": 10, "seed": 2}


def duration(seconds: float) -> str:
    """Prometheus' duration syntax takes no fractions: 0.5 s is "500ms"."""
    return f"{round(seconds * 1000)}ms"
#: metrics.jsonl column -> the running-job gauge that must carry it.
ROW_TO_METRIC = {
    "train_loss": "labctl_job_train_loss",
    "test_loss": "labctl_job_test_loss",
    "test_accuracy": "labctl_job_test_accuracy_ratio",
    "test_f1_macro": "labctl_job_test_f1_macro_ratio",
    "images_per_second": "labctl_job_images_per_second",
    "lr": "labctl_job_learning_rate",
    "epoch": "labctl_job_epoch",
}


# --- helpers ------------------------------------------------------------------------------

def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """The worker's /metrics as {(sample name, labels): value}."""
    text = http_get(f"http://127.0.0.1:{port}/metrics")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def job_samples(samples: dict, job_id: str) -> dict[str, float]:
    return {name: value for (name, labels), value in samples.items()
            if ("job_id", job_id) in labels}


def sample(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Prometheus:
    """``prometheus`` on a free loopback port, its TSDB in a temp folder."""

    def __init__(self, directory: Path, worker_port: int):
        self.directory = directory
        self.port = free_port()
        # The deploy config's worker job, with the compose DNS discovery swapped for the test
        # worker's address and the label that relabelling would have added.
        deploy = yaml.safe_load(PROMETHEUS_YML.read_text())
        job = next(j for j in deploy["scrape_configs"] if j["job_name"] == "labctl-worker")
        config = {
            "global": {"scrape_interval": duration(SCRAPE_SECONDS),
                       "evaluation_interval": duration(SCRAPE_SECONDS)},
            "scrape_configs": [{
                "job_name": job["job_name"], "scrape_interval": duration(SCRAPE_SECONDS),
                "scrape_timeout": duration(SCRAPE_SECONDS),
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"],
                                    "labels": {"pool": "cpu"}}],
            }],
        }
        self.config_path = directory / "prometheus.yml"
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        log = open(self.directory / "prometheus.log", "wb")  # noqa: SIM115 - the child's
        self.process = subprocess.Popen(
            ["prometheus", f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self._ready, 60, interval=0.2, what="prometheus to be ready")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.log_text()[-2000:]}")
        try:
            http_get(f"{self.url}/-/ready", timeout=1)
            return True
        except OSError:
            return False

    def api(self, path: str, **params) -> list:
        query = urllib.parse.urlencode(params, doseq=True)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}", timeout=30))
        assert body["status"] == "success", body
        return body["data"]["result"] if isinstance(body["data"], dict) else body["data"]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        try:
            return (self.directory / "prometheus.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Observed:
    """What the fixture saw, for the tests to check."""

    store: ArtifactStore
    prometheus: Prometheus
    long_id: str
    short_id: str
    start: float
    end: float = 0.0
    during: list[tuple[dict[str, float], int]] = field(default_factory=list)  # (gauges, epoch)
    queue_depth_during: list[float] = field(default_factory=list)
    running_during: list[float] = field(default_factory=list)
    redis_up_during: list[float] = field(default_factory=list)
    after: dict = field(default_factory=dict)
    worker_log: str = ""

    def rows(self, job_id: str) -> list[dict]:
        return self.store.job(job_id).read_metrics()


def submit(redis_url: str, artifacts: Path, cwd: Path, job: dict) -> str:
    args = [item for key, value in job.items() for item in (f"--{key}", str(value))]
    env = {"LABCTL_REDIS_URL": redis_url, "LABCTL_ARTIFACTS_DIR": str(artifacts),
           "PATH": "/usr/bin:/bin"}
    # cwd: a temp folder, so no developer .env is read.
    done = subprocess.run([sys.executable, "-m", "labctl.cli.main", "submit", *args], cwd=cwd,
                          env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[0].strip()


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> Observed:
    tmp = tmp_path_factory.mktemp("prom")
    artifacts = tmp / "artifacts"
    metrics_port = free_port()
    with RedisServer(tmp / "redis", password=PASSWORD) as redis_server:
        worker = WorkerProcess(redis_server.url, tmp / "worker.log", queues="cpu", env={
            "LABCTL_ARTIFACTS_DIR": str(artifacts), "LABCTL_METRICS_PORT": str(metrics_port),
            "LABCTL_HEARTBEAT_SECONDS": "1", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "30",
        })
        prometheus = Prometheus(tmp / "prometheus", metrics_port)
        try:
            prometheus.start()
            start = time.time()
            # Both jobs are queued before the worker starts: a `labctl submit` takes as long
            # as the AdaMax job itself on a loaded machine, and the Adam job must wait in the
            # queue while the AdaMax one trains.
            long_id = submit(redis_server.url, artifacts, tmp, LONG_JOB)
            short_id = submit(redis_server.url, artifacts, tmp, SHORT_JOB)
            seen = Observed(ArtifactStore(artifacts), prometheus, long_id, short_id, start)
            worker.start()
            _watch_long_job(seen, metrics_port, worker)
            wait_for(lambda: _ended(redis_server, short_id), 300, interval=0.2,
                     what="both jobs to end")
            time.sleep(4 * SCRAPE_SECONDS)  # let Prometheus scrape the final state
            seen.after = scrape(metrics_port)
            seen.end = time.time()
            seen.worker_log = worker.log_text()
            yield seen
        finally:
            prometheus.stop()
            worker.stop()


def _ended(redis_server: RedisServer, job_id: str) -> bool:
    state = redis_server.client().hget(f"labctl:job:{job_id}", "state")
    return state is not None and json.loads(state) in ("succeeded", "failed", "cancelled")


def _watch_long_job(seen: Observed, port: int, worker: WorkerProcess) -> None:
    """Scrape the worker while the AdaMax job trains, keeping each scrape's job gauges."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker died:\n{worker.log_text()[-3000:]}")
        try:
            samples = scrape(port)
        except OSError:  # the worker is still starting
            time.sleep(0.05)
            continue
        gauges = job_samples(samples, seen.long_id)
        if gauges:
            seen.queue_depth_during.append(sample(samples, "labctl_queue_depth", queue="cpu"))
            seen.running_during.append(sample(samples, "labctl_jobs_running"))
            seen.redis_up_during.append(sample(samples, "labctl_redis_up"))
            seen.during.append((gauges, int(gauges.get("labctl_job_epoch", 0))))
        elif seen.during:
            return  # the series are gone: the job ended
        time.sleep(0.05)
    raise TimeoutError(f"the AdaMax job did not end:\n{worker.log_text()[-3000:]}")


# --- the worker's /metrics ----------------------------------------------------------------

def test_both_jobs_succeeded(observed):
    for job_id in (observed.long_id, observed.short_id):
        status = observed.store.job(job_id).read_status()
        assert status["state"] == "succeeded", (status, observed.worker_log[-3000:])


def test_gauges_during_the_job_match_metrics_jsonl(observed):
    rows = {row["epoch"]: row for row in observed.rows(observed.long_id)}
    epochs = LONG_JOB["epochs"]
    assert len(rows) == epochs
    mid_job = [(g, e) for g, e in observed.during if 1 <= e < epochs]
    assert len(mid_job) >= 3, "the job was not scraped mid-way; make LONG_JOB longer"
    epochs_seen, consistent = set(), 0
    for gauges, epoch in mid_job:
        row = rows[epoch]
        expected = {metric: float(row[column]) for column, metric in ROW_TO_METRIC.items()}
        got = {metric: gauges.get(metric) for metric in expected}
        # A scrape can fall between two set() calls of one epoch; those are skipped, but most
        # scrapes see one epoch's values throughout.
        if got == pytest.approx(expected, rel=1e-12, abs=0):
            consistent += 1
            epochs_seen.add(epoch)
        assert gauges["labctl_job_epochs"] == epochs
        assert 0 <= gauges["labctl_job_epoch_progress_ratio"] <= 1
    assert consistent >= 0.8 * len(mid_job) and len(epochs_seen) >= 2, (
        f"{consistent} of {len(mid_job)} mid-job scrapes matched metrics.jsonl "
        f"(epochs {sorted(epochs_seen)})")


def test_queue_depth_running_and_redis_up_during_the_job(observed):
    # The Adam job waits in the cpu queue while the AdaMax one trains (one job per worker).
    assert 1 in observed.queue_depth_during, observed.queue_depth_during
    assert set(observed.running_during) == {1}
    assert set(observed.redis_up_during) == {1}  # reached with the password in the URL


def test_after_the_jobs_their_series_are_gone_and_their_end_is_counted(observed):
    after = observed.after
    for job_id in (observed.long_id, observed.short_id):
        assert not job_samples(after, job_id)
    for job, job_id in ((LONG_JOB, observed.long_id), (SHORT_JOB, observed.short_id)):
        rows = observed.rows(job_id)
        spec = {"model": job["model"], "optimizer": job["opt"], "dataset": job["dataset"]}
        assert sample(after, "labctl_jobs_total", state="succeeded", **spec) == 1
        assert sample(after, "labctl_jobs_total", state="failed", **spec) == 0
        assert sample(after, "labctl_epoch_duration_seconds_count", **spec) == len(rows)
        assert sample(after, "labctl_epoch_duration_seconds_sum", **spec) == pytest.approx(
            sum(r["epoch_seconds"] for r in rows), rel=1e-9)
        assert sample(after, "labctl_job_duration_seconds_count", state="succeeded",
                      **spec) == 1
    assert sample(after, "labctl_jobs_running") == 0
    assert sample(after, "labctl_queue_depth", queue="cpu") == 0
    assert sample(after, "labctl_queue_depth", queue="gpu") == 0


# --- what Prometheus stored ---------------------------------------------------------------

def test_prometheus_stored_the_values_of_metrics_jsonl(observed):
    rows = observed.rows(observed.long_id)
    for column in ("train_loss", "test_accuracy", "test_f1_macro"):
        metric = ROW_TO_METRIC[column]
        result = observed.prometheus.api(
            "query_range", query=f'{metric}{{job_id="{observed.long_id}"}}',
            start=observed.start, end=observed.end, step="1s")
        assert len(result) == 1, result
        assert result[0]["metric"]["pool"] == "cpu"
        stored = {float(v) for _, v in result[0]["values"]}
        assert stored and stored <= {float(r[column]) for r in rows}, column


# --- the Grafana dashboard against real data ---------------------------------------------

def _variables(observed: Observed) -> dict[str, str]:
    # Grafana renders a multi-value selection as a regex alternation.
    return {**GRAFANA_VARIABLES, "$__rate_interval": duration(4 * SCRAPE_SECONDS + 1),
            "$__interval": duration(SCRAPE_SECONDS),
            "$__range": f"{int(observed.end - observed.start) + 10}s",
            "$model": LONG_JOB["model"], "$dataset": LONG_JOB["dataset"],
            "$optimizer": f"({SHORT_JOB['opt']}|{LONG_JOB['opt']})",
            "$job": f"({observed.long_id}|{observed.short_id})"}


def _finite_values(result: list) -> list[float]:
    values = []
    for series in result:
        points = series.get("values") or [series["value"]]
        values += [float(v) for _, v in points if math.isfinite(float(v))]
    return values


def _queries(dashboard: dict, variables: dict[str, str]):
    for panel in panels(dashboard):
        # A repeated panel is one panel per selected value: each must have data.
        repeat = panel.get("repeat")
        values = variables[f"${repeat}"].strip("()").split("|") if repeat else [None]
        for value in values:
            local = {**variables, **({f"${repeat}": value} if repeat else {})}
            for target in panel["targets"]:
                yield (f"{panel['title'].replace(f'${repeat}', value or '')} "
                       f"[{target['refId']}]", substitute(target["expr"], local), target)


def test_every_dashboard_query_returns_data(observed):
    dashboard = load_dashboard()
    variables = _variables(observed)
    empty = []
    for title, expr, target in _queries(dashboard, variables):
        if "labctl_gpu_memory" in expr:
            continue  # a numpy job never initialises CUDA: see test_gpu_panel_is_well_formed
        if target.get("instant"):
            result = observed.prometheus.api("query", query=expr, time=observed.end)
        else:
            result = observed.prometheus.api("query_range", query=expr, start=observed.start,
                                             end=observed.end, step=SCRAPE_SECONDS)
        if not _finite_values(result):
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_gpu_panel_is_well_formed_without_a_gpu(observed):
    # CPU-only here: the GPU memory queries must parse and run, returning nothing. Their data
    # path is covered by tests/test_metrics.py (GpuMemoryCollector with a stand-in torch).
    dashboard = load_dashboard()
    gpu = [(t, e) for t, e, _ in _queries(dashboard, _variables(observed))
           if "labctl_gpu_memory" in e]
    assert gpu
    for _title, expr in gpu:
        observed.prometheus.api("query", query=expr, time=observed.end)


def test_dashboard_variables_offer_both_optimizers_and_both_jobs(observed):
    dashboard = load_dashboard()
    variables = {v["name"]: v["query"]["query"] for v in dashboard["templating"]["list"]}
    chosen = {"$model": LONG_JOB["model"], "$optimizer": ".*", "$dataset": ".*"}

    def label_values(query: str) -> set[str]:
        # label_values(selector, label): Grafana asks the series API over the time range.
        selector, label = query.removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
        series = observed.prometheus.api("series", **{"match[]": substitute(selector, chosen)},
                                         start=observed.start, end=observed.end)
        return {s[label.strip()] for s in series if label.strip() in s}

    assert label_values(variables["optimizer"]) == {"adam", "adamax"}
    assert label_values(variables["model"]) == {LONG_JOB["model"]}
    assert label_values(variables["dataset"]) == {LONG_JOB["dataset"]}
    assert label_values(variables["job"]) == {observed.long_id, observed.short_id}
