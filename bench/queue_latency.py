"""Queue latency: time from calling ``submit_job`` to the job being claimed (state running)
by an idle worker; p50 and p95 over 50 tiny jobs.

    python -m bench.queue_latency              # starts a private redis-server and one worker
    python -m bench.queue_latency --redis-url redis://host:6379/0   # an idle running stack

The clock starts just before ``submit_job`` (record written, message sent) and stops at the
record's ``started_at``, stamped by the worker when its claim succeeds: broker delivery,
Celery's dispatch and the claim script are all inside. Each job is a tiny numpy-cnn run on
digits, and the next one is submitted only once the worker is idle again. Results go to the
``queue`` section of docs/benchmarks.md; other sections are kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from labctl.bench.docs_page import BENCHMARKS_PAGE, write_section

REPO = Path(__file__).resolve().parent.parent
DOC = BENCHMARKS_PAGE
SECTION = "queue"
GOAL_P50_MS = 100.0
TINY_JOB = {"model": "numpy-cnn", "dataset": "digits", "epochs": 1, "batch_size": 64,
            "limit_train": 128, "limit_test": 64, "num_workers": 0, "lr_schedule": "constant"}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: p95 of 50 samples is the 48th smallest."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


def wait_idle(records, timeout: float = 60.0) -> None:
    """The previous job's message is acked (kombu's ``unacked`` hash is empty): the worker
    is back to waiting on the queue. A short pause lets it re-issue its BRPOP."""
    deadline = time.monotonic() + timeout
    while records.client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)


def measure(redis_url: str, jobs: int, timeout: float = 120.0) -> list[float]:
    """Submit ``jobs`` tiny jobs one at a time; return each one's latency in ms."""
    from labctl.shared.jobstate import TERMINAL_STATES
    from labctl.shared.queue import celery_app, submit_job
    from labctl.shared.records import JobRecords, parse_iso
    from labctl.shared.spec import build_spec

    records = JobRecords.from_url(redis_url)
    app = celery_app()
    spec = build_spec(TINY_JOB)
    latencies = []
    for n in range(jobs):
        wait_idle(records)
        submitted = time.time()
        job_id = submit_job(spec, records=records, app=app)
        deadline = time.monotonic() + timeout
        while (record := records.get(job_id))["state"] not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record['state']} after {timeout}s")
            time.sleep(0.01)
        if record["state"] != "succeeded":
            raise RuntimeError(f"job {job_id} {record['state']}: {record.get('error')}")
        latencies.append((parse_iso(record["started_at"]) - submitted) * 1000)
        print(f"job {n + 1}/{jobs}: {latencies[-1]:.1f} ms", file=sys.stderr)
    return latencies


def report(latencies: list[float]) -> str:
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    verdict = "met" if p50 <= GOAL_P50_MS else "NOT met"
    return "\n".join([
        "## Queue latency",
        "",
        f"Submit to running on an idle worker (solo pool, local redis-server), "
        f"{len(latencies)} tiny numpy-cnn jobs, one at a time; `python -m bench.queue_latency`.",
        f"Host: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}.",
        "",
        "| p50 | p95 | mean | min | max |",
        "|---|---|---|---|---|",
        f"| {p50:.1f} ms | {p95:.1f} ms | {statistics.mean(latencies):.1f} ms "
        f"| {min(latencies):.1f} ms | {max(latencies):.1f} ms |",
        "",
        f"Goal p50 <= {GOAL_P50_MS:.0f} ms: {verdict}.",
    ])



def private_stack(stack: ExitStack, workdir: Path) -> str:
    """A redis-server and one worker of our own, torn down by ``stack``."""
    from labctl.shared.testing import RedisServer, WorkerProcess

    server = stack.enter_context(RedisServer(workdir / "redis", appendonly=False))
    worker = WorkerProcess(server.url, workdir / "worker.log", name="bench", queues="cpu",
                           env={"LABCTL_ARTIFACTS_DIR": str(workdir / "artifacts")})
    stack.enter_context(worker)
    return server.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="submit-to-running latency of the queue")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--redis-url", default=None,
                        help="measure an existing idle stack instead of a private one")
    parser.add_argument("--no-write", action="store_true", help="print, don't update the doc")
    args = parser.parse_args(argv)

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="labctl-bench-") as tmp:
        url = args.redis_url or private_stack(stack, Path(tmp))
        os.environ["LABCTL_REDIS_URL"] = url
        from labctl.shared.settings import get_settings

        get_settings.cache_clear()
        measure(url, 2)  # warm-up: the worker's first job imports the engines
        latencies = measure(url, args.jobs)
    body = report(latencies)
    print(body)
    if not args.no_write:
        write_section(DOC, SECTION, body)
        print(f"wrote the {SECTION} section of {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
