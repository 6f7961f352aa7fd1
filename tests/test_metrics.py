"""Prometheus metrics: names, labels, the job lifecycle, collectors and the exposition format."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from labctl.shared.spec import build_spec
from labctl.worker import metrics as m
from labctl.worker.metrics_reporter import MetricsReporter

SPEC = build_spec({"model": "numpy-cnn", "optimizer": "adamax", "dataset": "digits",
                   "epochs": 3})
ROW = {"epoch": 1, "train_loss": 1.25, "test_loss": 1.5, "test_accuracy": 0.625,
       "test_f1_macro": 0.5, "epoch_seconds": 2.0, "images_per_second": 640.0, "lr": 0.002}
SPEC_LABELS = {"model": "numpy-cnn", "optimizer": "adamax", "dataset": "digits"}

_job_counter = iter(range(1, 10**6))


def new_job_id() -> str:
    # Metrics are process-global: each test uses its own job id so tests stay independent.
    return f"20260101-000000-{next(_job_counter):06x}"


def value(name: str, **labels) -> float | None:
    return m.REGISTRY.get_sample_value(name, labels)


def exposition() -> str:
    return generate_latest(m.REGISTRY).decode()


def families() -> dict:
    return {f.name: f for f in text_string_to_metric_families(exposition())}


# --- names and labels --------------------------------------------------------------------

def test_every_application_metric_follows_the_naming_rules():
    m.JOBS.labels(state="succeeded", **SPEC_LABELS).inc(0)  # a series, so samples exist
    ours = {name: f for name, f in families().items() if name.startswith("labctl_")}
    assert ours, "no labctl_ metric exposed"
    assert any(f.type == "counter" for f in ours.values())
    for name, family in ours.items():
        if family.type == "counter":
            names = {s.name for s in family.samples}
            assert f"{name}_total" in names, name
            assert names <= {f"{name}_total", f"{name}_created"}, names
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
        assert "_ms" not in name and "milliseconds" not in name, name
    # Everything else is the standard process/runtime set, nothing from another library.
    others = {name for name in families() if not name.startswith("labctl_")}
    assert all(n.startswith(("process_", "python_")) for n in others), others


def test_the_documented_metrics_exist_with_bounded_labels():
    expected = {
        "labctl_epoch_duration_seconds": ("histogram", {"model", "optimizer", "dataset"}),
        "labctl_job_duration_seconds": ("histogram", {"state", "model", "optimizer", "dataset"}),
        "labctl_jobs": ("counter", {"state", "model", "optimizer", "dataset"}),
        "labctl_jobs_running": ("gauge", set()),
    }
    for gauge in m.JOB_GAUGES:
        expected[gauge._name] = ("gauge", {"job_id", "model", "optimizer", "dataset"})
    collectors = {c._name: c for c in (m.EPOCH_DURATION, m.JOB_DURATION, m.JOBS, m.JOBS_RUNNING,
                                        *m.JOB_GAUGES)}
    assert set(collectors) == set(expected)
    for name, (kind, labels) in expected.items():
        assert collectors[name]._type == kind, name
        assert set(collectors[name]._labelnames) == labels, name
    # job_id, the only unbounded label, is only on series that are removed at the end.
    for c in (m.EPOCH_DURATION, m.JOB_DURATION, m.JOBS, m.JOBS_RUNNING):
        assert "job_id" not in c._labelnames


def test_epoch_buckets_span_fractions_of_a_second_to_hours():
    assert m.EPOCH_BUCKETS[0] <= 0.1 and 3600 <= m.EPOCH_BUCKETS[-2]
    assert m.JOB_BUCKETS[-2] >= 86400


# --- the job lifecycle -------------------------------------------------------------------

def test_epoch_sets_the_running_job_gauges_and_observes_epoch_time():
    job_id = new_job_id()
    labels = {"job_id": job_id, **SPEC_LABELS}
    before = value("labctl_epoch_duration_seconds_count", **SPEC_LABELS) or 0
    running = value("labctl_jobs_running")
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    assert value("labctl_jobs_running") == running + 1
    assert value("labctl_job_epochs", **labels) == 3
    assert value("labctl_job_epoch", **labels) == 0
    reporter.on_batch(1, 5, 20)
    assert value("labctl_job_epoch_progress_ratio", **labels) == 0.25
    reporter.on_epoch(ROW)
    assert value("labctl_job_train_loss", **labels) == 1.25
    assert value("labctl_job_test_loss", **labels) == 1.5
    assert value("labctl_job_test_accuracy_ratio", **labels) == 0.625
    assert value("labctl_job_test_f1_macro_ratio", **labels) == 0.5
    assert value("labctl_job_images_per_second", **labels) == 640.0
    assert value("labctl_job_learning_rate", **labels) == 0.002
    assert value("labctl_job_epoch", **labels) == 1
    # epoch + progress never passes the epoch count: the finished epoch is in EPOCH alone
    assert value("labctl_job_epoch_progress_ratio", **labels) == 0
    assert value("labctl_epoch_duration_seconds_count", **SPEC_LABELS) == before + 1
    assert value("labctl_epoch_duration_seconds_bucket", **SPEC_LABELS, le="2.5") >= 1
    reporter.on_end("succeeded", {})


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_end_counts_the_state_and_removes_every_series_of_the_job(state):
    job_id = new_job_id()
    clock = iter([100.0, 142.0]).__next__
    reporter = MetricsReporter(SPEC, job_id, clock=clock)
    total = value("labctl_jobs_total", state=state, **SPEC_LABELS) or 0
    durations = value("labctl_job_duration_seconds_sum", state=state, **SPEC_LABELS) or 0
    running = value("labctl_jobs_running")
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    reporter.on_batch(1, 1, 2)
    reporter.on_epoch(ROW)
    assert job_id in exposition()
    reporter.on_end(state, {"error": None, "summary": {}})
    reporter.on_end(state, {"error": None, "summary": {}})  # idempotent
    assert value("labctl_jobs_total", state=state, **SPEC_LABELS) == total + 1
    assert value("labctl_job_duration_seconds_sum", state=state, **SPEC_LABELS) == durations + 42
    assert value("labctl_jobs_running") == running
    assert job_id not in exposition()


def test_a_job_that_fails_before_it_starts_is_counted_without_touching_running():
    job_id = new_job_id()
    running = value("labctl_jobs_running")
    total = value("labctl_jobs_total", state="failed", **SPEC_LABELS) or 0
    MetricsReporter(SPEC, job_id).on_end("failed", {"error": "data_root: missing"})
    assert value("labctl_jobs_running") == running
    assert value("labctl_jobs_total", state="failed", **SPEC_LABELS) == total + 1
    assert job_id not in exposition()


def test_a_resumed_job_reports_the_epoch_it_resumes_after():
    job_id = new_job_id()
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 2})
    assert value("labctl_job_epoch", job_id=job_id, **SPEC_LABELS) == 2
    reporter.on_end("succeeded", {})


def test_two_concurrent_jobs_have_separate_series_for_side_by_side_comparison():
    a, b = new_job_id(), new_job_id()
    adam = build_spec({"model": "numpy-cnn", "optimizer": "adam", "dataset": "digits"})
    ra, rb = MetricsReporter(adam, a), MetricsReporter(SPEC, b)
    ra.on_start(a, adam, {"start_epoch": 0})
    rb.on_start(b, SPEC, {"start_epoch": 0})
    ra.on_epoch({**ROW, "train_loss": 2.0})
    rb.on_epoch({**ROW, "train_loss": 1.0})
    assert value("labctl_job_train_loss", job_id=a, model="numpy-cnn", optimizer="adam",
                 dataset="digits") == 2.0
    assert value("labctl_job_train_loss", job_id=b, **SPEC_LABELS) == 1.0
    ra.on_end("succeeded", {})
    assert value("labctl_job_train_loss", job_id=b, **SPEC_LABELS) == 1.0
    rb.on_end("succeeded", {})


# --- exposition format -------------------------------------------------------------------

def test_the_exposition_parses_and_carries_the_job_labels():
    job_id = new_job_id()
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    reporter.on_epoch(ROW)
    try:
        fams = families()
        samples = [s for s in fams["labctl_job_test_accuracy_ratio"].samples
                   if s.labels.get("job_id") == job_id]
        assert samples and samples[0].labels == {"job_id": job_id, **SPEC_LABELS}
        assert samples[0].value == 0.625
        assert fams["labctl_jobs"].type == "counter"
        assert fams["labctl_epoch_duration_seconds"].type == "histogram"
    finally:
        reporter.on_end("succeeded", {})


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_exposition():
    job_id = new_job_id()
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    reporter.on_epoch(ROW)
    try:
        text = exposition()
    finally:
        reporter.on_end("succeeded", {})
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    # promtool prints lint problems and exits 1 (3 for lint-only failures in newer releases).
    assert done.returncode == 0, done.stdout + done.stderr


# --- collectors --------------------------------------------------------------------------

class FakePipeline:
    def __init__(self, lists: dict[str, int]):
        self.lists, self.keys = lists, []

    def llen(self, key):
        self.keys.append(key)

    def execute(self):
        return [self.lists.get(k, 0) for k in self.keys]


class FakeRedis:
    def __init__(self, lists):
        self.lists = lists

    def pipeline(self, transaction=True):
        return FakePipeline(self.lists)


def collected(collector) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}


def test_queue_depth_sums_kombu_priority_lists():
    collector = m.QueueDepthCollector("redis://127.0.0.1:1/0")
    sep = "\x06\x16"
    collector.client = FakeRedis({"cpu": 2, f"cpu{sep}3": 1, f"cpu{sep}9": 4, "gpu": 5})
    got = collected(collector)
    assert got[("labctl_queue_depth", (("queue", "cpu"),))] == 7
    assert got[("labctl_queue_depth", (("queue", "gpu"),))] == 5
    assert got[("labctl_redis_up", ())] == 1


def test_queue_keys_are_the_ones_kombu_writes():
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    assert tuple(PRIORITY_STEPS) == m.QueueDepthCollector.PRIORITY_STEPS
    channel = types.SimpleNamespace(sep=Channel.sep, priority_steps=PRIORITY_STEPS)
    channel.priority = lambda n: Channel.priority(channel, n)
    kombu_keys = [Channel._q_for_pri(channel, "gpu", p) for p in PRIORITY_STEPS]
    assert m.QueueDepthCollector("redis://127.0.0.1:1/0").keys("gpu") == kombu_keys


def test_queue_depth_reports_redis_down_without_failing_the_scrape():
    collector = m.QueueDepthCollector("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens
    got = collected(collector)
    assert got == {("labctl_redis_up", ()): 0}


def test_queue_collector_does_not_touch_redis_when_registered():
    from prometheus_client import CollectorRegistry

    class NoRedis:
        """Records any use of the client."""

        def __init__(self):
            self.used: list[str] = []

        def __getattr__(self, name):
            self.used.append(name)
            raise AssertionError(f"registering called redis .{name}")

    collector = m.QueueDepthCollector("redis://127.0.0.1:1/0")
    collector.client = NoRedis()
    registry = CollectorRegistry()
    registry.register(collector)
    assert collector.client.used == []
    # Registered under its names, known from describe() alone:
    assert {family.name for family in collector.describe()} <= set(
        registry._get_names(collector))


def _fake_torch(initialised: bool, calls: list[str]):
    def record(name, result):
        def fn(*args):
            calls.append(name)
            return result
        return fn

    cuda = types.SimpleNamespace(
        is_initialized=lambda: initialised,
        is_available=record("is_available", True),
        device_count=record("device_count", 2),
        memory_allocated=lambda i: 1000 * (i + 1),
        memory_reserved=lambda i: 2000 * (i + 1),
        get_device_properties=lambda i: types.SimpleNamespace(total_memory=80 * 2**30),
    )
    return types.SimpleNamespace(cuda=cuda)


def test_gpu_collector_is_silent_without_torch(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert collected(m.GpuMemoryCollector()) == {}
    assert "torch" not in sys.modules  # and it did not import it


def test_gpu_collector_does_not_initialise_cuda(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(False, calls))
    assert collected(m.GpuMemoryCollector()) == {}
    assert calls == []


def test_gpu_collector_reports_each_device_once_cuda_is_in_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(True, []))
    got = collected(m.GpuMemoryCollector())
    assert got[("labctl_gpu_memory_allocated_bytes", (("device", "cuda:0"),))] == 1000
    assert got[("labctl_gpu_memory_reserved_bytes", (("device", "cuda:1"),))] == 4000
    assert got[("labctl_gpu_memory_total_bytes", (("device", "cuda:1"),))] == 80 * 2**30


def test_gpu_collector_survives_a_broken_driver(monkeypatch):
    torch = _fake_torch(True, [])
    torch.cuda.device_count = lambda: 1 / 0
    monkeypatch.setitem(sys.modules, "torch", torch)
    assert collected(m.GpuMemoryCollector()) == {}


# --- the HTTP server ---------------------------------------------------------------------

def test_metrics_server_serves_the_registry_over_http():
    port = m.start_metrics_server(0, addr="127.0.0.1")
    assert m.start_metrics_server(0, addr="127.0.0.1") == port  # once per process
    job_id = new_job_id()
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    finally:
        reporter.on_end("succeeded", {})
    assert f'job_id="{job_id}"' in body
    assert "labctl_jobs_running" in body


# --- jobs that leave without ending ------------------------------------------------------

def test_close_releases_a_handed_back_job_without_counting_a_state():
    job_id = new_job_id()
    running = value("labctl_jobs_running")
    totals = {s: value("labctl_jobs_total", state=s, **SPEC_LABELS) for s in m.FINAL_STATES}
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    reporter.on_epoch(ROW)
    reporter.close()
    reporter.on_batch(2, 1, 10)  # late hooks do not bring the series back
    reporter.on_epoch({**ROW, "epoch": 2})
    reporter.on_end("succeeded", {})  # nor count a state after close
    assert value("labctl_jobs_running") == running
    assert job_id not in exposition()
    assert {s: value("labctl_jobs_total", state=s, **SPEC_LABELS)
            for s in m.FINAL_STATES} == totals


def test_a_forgotten_reporter_releases_its_series_when_collected():
    import gc

    job_id = new_job_id()
    running = value("labctl_jobs_running")
    reporter = MetricsReporter(SPEC, job_id)
    reporter.on_start(job_id, SPEC, {"start_epoch": 0})
    reporter.on_epoch(ROW)
    assert value("labctl_jobs_running") == running + 1
    del reporter
    gc.collect()
    assert value("labctl_jobs_running") == running
    assert job_id not in exposition()


def test_final_state_series_exist_at_zero_once_a_job_starts():
    # increase() needs the 0 before the 1; a new (model, optimizer, dataset) gets it at once.
    spec = build_spec({"model": "resnet50", "optimizer": "adam", "dataset": "synthetic"})
    labels = {"model": "resnet50", "optimizer": "adam", "dataset": "synthetic"}
    reporter = MetricsReporter(spec, new_job_id())
    for state in m.FINAL_STATES:
        assert value("labctl_jobs_total", state=state, **labels) == 0
        assert value("labctl_job_duration_seconds_count", state=state, **labels) == 0
    assert value("labctl_epoch_duration_seconds_count", **labels) == 0
    reporter.close()
