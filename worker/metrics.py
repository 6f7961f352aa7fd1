"""Every Prometheus metric labctl exports, defined in one place.

Naming follows the Prometheus conventions: the application prefix ``labctl_``, base units
(``_seconds``, ``_bytes``), ``_total`` on counters and ``_ratio`` on fractions in [0, 1].
Labels are bounded: ``model``, ``optimizer``, ``dataset``, ``state`` and ``queue`` take a
handful of values each. The one unbounded label, ``job_id``, is only on the running-job
gauges, and :func:`remove_job_series` deletes a job's series when it ends, so a worker that
has run a thousand jobs exports the series of at most one.

Why a plain registry: the worker runs one job at a time in its own process (a thread of
Celery's threads pool, never a child), so the process that trains is the process that
serves ``/metrics``.
With the prefork pool each job would run in a forked child whose metric values the parent's
HTTP server never sees; that needs ``prometheus_client``'s multiprocess mode (a shared
``PROMETHEUS_MULTIPROC_DIR`` of mmap files, no custom collectors, gauges with a
``multiprocess_mode``, and files to clean when children die). We do not use prefork because a
training job owns the whole device (one GPU, or every CPU core through BLAS), so concurrency
comes from running one worker per GPU (``docker compose up --scale worker-gpu=N``), and
without prefork CUDA is never initialised in a parent that forks.

The worker calls :func:`start_metrics_server` once at start-up; the Celery task adds a
``worker.metrics_reporter.MetricsReporter`` to each job's reporters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from labctl.shared.celery_config import PRIORITY_SEP, PRIORITY_STEPS, QUEUES
from labctl.shared.jobstate import STATES, TERMINAL_STATES
from labctl.shared.redis_tls import redis_target

log = logging.getLogger(__name__)

# The ``*_created`` timestamp series only matter to OpenMetrics consumers; in the text format
# Prometheus scrapes they are extra gauges per labelled counter and histogram.
disable_created_metrics()

#: Our own registry rather than the library's global one: tests can read exactly what a worker
#: serves, and nothing another library registers leaks into the exposition.
REGISTRY = CollectorRegistry()
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)  # process_* (CPU, RSS, fds) and python_* are worth keeping

SPEC_LABELS = ("model", "optimizer", "dataset")
JOB_LABELS = ("job_id", *SPEC_LABELS)
FINAL_STATES = tuple(s for s in STATES if s in TERMINAL_STATES)

# An epoch of numpy-cnn on digits takes a fraction of a second; ResNet50 on Stanford Cars
# takes minutes on a GPU and hours on a CPU.
EPOCH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600,
                 7200, 14400, float("inf"))
JOB_BUCKETS = (1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 172800,
               float("inf"))

EPOCH_DURATION = Histogram(
    "labctl_epoch_duration_seconds", "Wall time of one training epoch (evaluation excluded).",
    SPEC_LABELS, buckets=EPOCH_BUCKETS, registry=REGISTRY)
JOB_DURATION = Histogram(
    "labctl_job_duration_seconds", "Wall time of a job on this worker, from start to end.",
    ("state", *SPEC_LABELS), buckets=JOB_BUCKETS, registry=REGISTRY)
JOBS = Counter(
    "labctl_jobs", "Jobs that ended on this worker, by final state.",
    ("state", *SPEC_LABELS), registry=REGISTRY)  # exposed as labctl_jobs_total
JOBS_RUNNING = Gauge(
    "labctl_jobs_running", "Jobs training on this worker now (0 or 1: one job per process).",
    registry=REGISTRY)

# Running-job gauges: one series per job, removed when it ends.
TRAIN_LOSS = Gauge("labctl_job_train_loss", "Mean training loss of the last epoch.",
                   JOB_LABELS, registry=REGISTRY)
TEST_LOSS = Gauge("labctl_job_test_loss", "Test loss after the last epoch.",
                  JOB_LABELS, registry=REGISTRY)
TEST_ACCURACY = Gauge("labctl_job_test_accuracy_ratio", "Test accuracy after the last epoch.",
                      JOB_LABELS, registry=REGISTRY)
TEST_F1 = Gauge("labctl_job_test_f1_macro_ratio", "Test macro-F1 after the last epoch.",
                JOB_LABELS, registry=REGISTRY)
IMAGES_PER_SECOND = Gauge("labctl_job_images_per_second",
                          "Training throughput of the last epoch, summed over its devices.",
                          JOB_LABELS, registry=REGISTRY)
DEVICES = Gauge("labctl_job_devices", "Data-parallel ranks the job trains on (1: one device).",
                JOB_LABELS, registry=REGISTRY)
LEARNING_RATE = Gauge("labctl_job_learning_rate", "Learning rate used by the last epoch.",
                      JOB_LABELS, registry=REGISTRY)
EPOCH = Gauge("labctl_job_epoch", "Epochs finished (1-based; 0 before the first ends).",
              JOB_LABELS, registry=REGISTRY)
EPOCHS = Gauge("labctl_job_epochs", "Epochs the job will run in total.",
               JOB_LABELS, registry=REGISTRY)
EPOCH_PROGRESS = Gauge("labctl_job_epoch_progress_ratio",
                       "Fraction of the current epoch's batches done.",
                       JOB_LABELS, registry=REGISTRY)

JOB_GAUGES = (TRAIN_LOSS, TEST_LOSS, TEST_ACCURACY, TEST_F1, IMAGES_PER_SECOND, LEARNING_RATE,
              EPOCH, EPOCHS, EPOCH_PROGRESS, DEVICES)


def init_spec_series(spec_labels: Sequence[str]) -> None:
    """Create the per-state series of a (model, optimizer, dataset) at 0 when a job begins.

    A counter that first appears already at 1 is invisible to ``increase()``/``rate()``, which
    need a sample before the change; a job runs at least a few scrapes long, so Prometheus
    sees the 0 first. Bounded: only combinations this worker has run.
    """
    for state in FINAL_STATES:
        JOBS.labels(state, *spec_labels)
        JOB_DURATION.labels(state, *spec_labels)
    EPOCH_DURATION.labels(*spec_labels)


def remove_job_series(labels: Sequence[str]) -> None:
    """Drop every running-job series of one job (``labels`` in ``JOB_LABELS`` order)."""
    for gauge in JOB_GAUGES:
        try:
            gauge.remove(*labels)
        except KeyError:  # the job ended before it set this gauge
            pass


class QueueDepthCollector(Collector):
    """``labctl_queue_depth{queue}``: jobs waiting in each queue, read from Redis per scrape.

    Read at scrape time rather than pushed so the number is never stale. Kombu keeps a queue
    as a Redis list named after it, plus one list per non-zero priority step
    (``<queue>\\x06\\x16<step>``); the depth is the sum. Every worker reports the same value,
    so dashboards take ``max by (queue)``. ``labctl_redis_up`` says whether the read worked:
    a scrape never fails because Redis is down.
    """

    SEP = PRIORITY_SEP
    PRIORITY_STEPS = tuple(PRIORITY_STEPS)

    def __init__(self, redis_url: str, queues: Iterable[str] = QUEUES, *, key_prefix: str = "",
                 timeout: float = 1.0):
        import redis  # the worker depends on it anyway; deferred so the CLI need not import it

        self.queues = tuple(queues)
        self.key_prefix = key_prefix  # kombu's global_keyprefix transport option, if set
        # Short timeouts: Prometheus would rather get a scrape without queue depth than none.
        target = redis_target(redis_url)  # TLS as the broker connection has it
        self.client = redis.Redis.from_url(target.url, socket_timeout=timeout,
                                           socket_connect_timeout=timeout,
                                           **target.client_options())

    def keys(self, queue: str) -> list[str]:
        return [f"{self.key_prefix}{queue}{self.SEP + str(step) if step else ''}"
                for step in self.PRIORITY_STEPS]

    def describe(self) -> list[Any]:
        # Without describe() the registry would call collect(), hence Redis, at registration.
        return [GaugeMetricFamily("labctl_queue_depth", ""),
                GaugeMetricFamily("labctl_redis_up", "")]

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("labctl_queue_depth", "Jobs waiting in the queue (Redis LLEN).",
                                  labels=["queue"])
        up = GaugeMetricFamily("labctl_redis_up", "1 if the last read of the queues worked.")
        try:
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                for key in self.keys(queue):
                    pipe.llen(key)
            lengths = pipe.execute()
        except Exception as exc:  # any Redis or network error: report down, keep the scrape
            log.warning("queue depth unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        steps = len(self.PRIORITY_STEPS)
        for i, queue in enumerate(self.queues):
            depth.add_metric([queue], sum(lengths[i * steps:(i + 1) * steps]))
        up.add_metric([], 1)
        yield depth
        yield up


class GpuMemoryCollector(Collector):
    """CUDA memory of this process, per device, from PyTorch's caching allocator.

    Only reports once a job has initialised CUDA in this process: the collector never imports
    torch (a second of start-up, and pointless for a NumPy worker) nor creates a CUDA context
    (hundreds of MiB of device memory, on every visible GPU).
    """

    def describe(self) -> list[Any]:
        return []  # families vary with the devices present; no collect() at registration

    def collect(self) -> Iterator[Any]:
        torch = sys.modules.get("torch")
        # The worker imports torch in a background thread at start-up; until that import
        # completes torch.cuda may not exist yet.
        if torch is None or not hasattr(torch, "cuda"):
            return
        try:
            if not torch.cuda.is_initialized():  # cheap; touches neither driver nor devices
                return
            rows = []
            for index in range(torch.cuda.device_count()):
                # None of these three create a context on a device the job did not use.
                rows.append((f"cuda:{index}", torch.cuda.memory_allocated(index),
                             torch.cuda.memory_reserved(index),
                             torch.cuda.get_device_properties(index).total_memory))
        except Exception as exc:  # a broken driver must not break the scrape
            log.warning("GPU memory unavailable: %s", exc)
            return
        families = [
            GaugeMetricFamily("labctl_gpu_memory_allocated_bytes",
                              "Device memory held by live tensors.", labels=["device"]),
            GaugeMetricFamily("labctl_gpu_memory_reserved_bytes",
                              "Device memory held by PyTorch's caching allocator "
                              "(allocated plus cached).", labels=["device"]),
            GaugeMetricFamily("labctl_gpu_memory_total_bytes", "Device memory in total.",
                              labels=["device"]),
        ]
        for device, *values in rows:
            for family, value in zip(families, values, strict=True):
                family.add_metric([device], value)
        yield from families


_server: Any = None


def start_metrics_server(port: int, redis_url: str | None = None, *, addr: str = "0.0.0.0",
                         queues: Iterable[str] = QUEUES) -> int:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; return the bound port.

    ``port=0`` picks a free port (tests). ``redis_url`` enables the queue-depth collector.
    Listens on every interface by default because Prometheus scrapes the worker across the
    compose network. Calling it again in the same process returns the first server's port.
    """
    global _server
    if _server is not None:
        return _server.server_port
    # Bind first: if the port is taken, nothing is registered and a retry starts clean.
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    if redis_url:
        REGISTRY.register(QueueDepthCollector(redis_url, queues))
    REGISTRY.register(GpuMemoryCollector())
    _server = server
    log.info("metrics on http://%s:%d/metrics", addr, _server.server_port)
    return _server.server_port
