"""``labctl worker``: a Celery worker in the foreground, one job at a time in the one thread of
Celery's threads pool (the main thread serves remote control and events meanwhile).

``--concurrency N`` starts N such workers as child processes rather than one prefork pool:
each job then owns a whole process (one per GPU, no CUDA in a forking parent, metrics in the
process that trains). Child i is named ``<name>i@host`` (``labctl-<pid>-i@host`` by
default: see ``cli/worker_names.py``) and serves metrics on ``P+i``; this
process forwards SIGINT/SIGTERM/SIGQUIT to them and restarts a child that dies unexpectedly
(its job, if any, is requeued by the reapers). A child dies with this process, even when
it is SIGKILLed (``cli/parent_watch.py``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import click

from labctl.cli.errors import BadSpec, BrokerUnavailable, StoreUnwritable
from labctl.cli.parent_watch import SUPERVISOR_PID_ENV, die_with_supervisor
from labctl.cli.worker_names import DEFAULT_NAME, expand, reserve
from labctl.shared.records import JobRecords
from labctl.shared.settings import get_settings
from labctl.shared.store_check import store_problem

QUEUE_NAMES = ("cpu", "gpu")
#: A child that dies sooner than this after starting is broken, not unlucky: don't loop.
MIN_CHILD_UPTIME = 10.0


def parse_queues(value: str) -> str:
    queues = [q.strip() for q in value.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUE_NAMES]
    if not queues or unknown:
        raise click.BadParameter(f"choose from {', '.join(QUEUE_NAMES)} "
                                 f"(got {', '.join(unknown) or 'nothing'})")
    return ",".join(dict.fromkeys(queues))


@click.command("worker")
@click.option("--queues", "-Q", default="cpu,gpu", show_default=True,
              callback=lambda _ctx, _param, value: parse_queues(value),
              help="comma-separated queues to take jobs from")
@click.option("--concurrency", "-c", type=click.IntRange(1, 64), default=1, show_default=True,
              help="worker processes to start (one job each)")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus /metrics here (child i of --concurrency N: port+i) "
                   "[$LABCTL_METRICS_PORT]")
@click.option("--loglevel", "-l", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--hostname", "-n", default=DEFAULT_NAME, show_default=True,
              help="node name (%h: this host, %p: this process' id); a name another "
                   "running worker has is refused")
@click.option("--gpus", default=None, metavar="0,1,...", envvar="LABCTL_GPUS",
              help="GPUs this worker gives its jobs: a --devices N job runs one rank on "
                   "each of the first N (sets CUDA_VISIBLE_DEVICES) [$LABCTL_GPUS]")
def worker(queues: str, concurrency: int, metrics_port: int | None, loglevel: str,
           hostname: str, gpus: str | None) -> None:
    """Run a worker in the foreground until Ctrl-C / SIGTERM.

    On SIGTERM the running job stops at its next batch and goes back to the queue; it
    resumes from its last epoch checkpoint on the next free worker.
    """
    die_with_supervisor()
    # The supervisor's pid names its children (labctl-<pid>-1@host...); a worker its own.
    hostname = hostname.replace("%p", str(os.getpid()))
    if gpus is not None:
        use_gpus(gpus, concurrency)
    check_artifacts_dir()
    if metrics_port is None:
        metrics_port = get_settings().metrics_port
    if metrics_port:  # 0 picks free ports; None serves none
        for port in range(metrics_port, metrics_port + concurrency):
            check_port_free(port)
    records = check_broker()
    if concurrency == 1:
        hostname = expand(hostname)
        if records is not None:  # an unreachable Redis is waited for by Celery
            try:
                reserve(records, hostname, queues.split(","))
            finally:
                records.client.close()
        run_one_worker(queues, metrics_port, loglevel, hostname)
    else:
        if records is not None:  # each child reserves its own name
            records.client.close()
        sys.exit(supervise(queues, concurrency, metrics_port, loglevel, hostname))


def use_gpus(value: str, concurrency: int) -> None:
    """Give this worker (and so each job it runs) the GPUs listed, before anything in the
    process can initialise CUDA. One worker owns them all: a data-parallel job needs them
    in one place, so --concurrency N would split what --gpus joins."""
    from labctl.worker.capacity import GPUS_ENV, parse_gpus

    try:
        listed = parse_gpus(value)
    except ValueError as exc:
        raise BadSpec(f"--gpus: {exc}") from None
    if concurrency > 1:
        raise BadSpec("--gpus gives one worker several GPUs; use it with --concurrency 1 "
                      "(or one worker per GPU: --concurrency N without --gpus)")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu) for gpu in listed)
    os.environ[GPUS_ENV] = os.environ["CUDA_VISIBLE_DEVICES"]


def check_port_free(port: int) -> None:
    """Exit 2 if /metrics cannot be served on ``port``: a worker that trains on without its
    metrics is invisible to Prometheus, and scrapes of that port reach whoever holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the http server does
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            raise BadSpec(f"--metrics-port {port}: {exc.strerror or exc}") from None


def check_artifacts_dir() -> None:
    """Exit 73 with one line, before taking any job, if job folders cannot be written."""
    root = get_settings().artifacts_dir
    problem = store_problem(root)
    if problem:
        raise StoreUnwritable(f"the artifacts directory {root} {problem}; this worker takes "
                              "no jobs (LABCTL_ARTIFACTS_DIR)")


def check_broker() -> JobRecords | None:
    """Exit 69 with one line when Redis answers but refuses this worker: its TLS certificate
    (wrong CA, a host name it does not list) or our credentials. Celery would retry those
    forever, one error every few seconds, and they never fix themselves. An unreachable or
    still-loading Redis is left to Celery, which waits for it (Redis may start later).
    Returns the records client (None: unreachable for now)."""
    from labctl.cli.broker import BrokerRefused, open_records

    try:
        records = open_records()
    except BrokerRefused:
        raise
    except BrokerUnavailable:
        return None
    return records


def run_one_worker(queues: str, metrics_port: int | None, loglevel: str,
                    hostname: str) -> None:
    # The worker_init hook in labctl.worker.app reads the port from the settings.
    if metrics_port is not None:
        os.environ["LABCTL_METRICS_PORT"] = str(metrics_port)
        get_settings.cache_clear()
    from labctl.worker.app import app

    try:
        # One thread: one job per process, trained beside the consumer rather than inside
        # it (as solo would), so the worker answers `celery inspect` and Flower while it
        # trains. Threads, not prefork: no fork, and the job dies with the process. No
        # --pool: the app's own (worker_pool, the threads pool with labctl's terminate).
        app.worker_main(["worker", "--concurrency", "1", "--queues", queues,
                         "--hostname", hostname, "--loglevel", loglevel.upper(),
                         # Mingle and gossip sync worker state we don't use; skipping them
                         # makes a worker ready a second sooner.
                         "--without-mingle", "--without-gossip"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    # Celery has shut down cleanly (job handed back, connections closed). Skip the
    # interpreter's teardown of torch and friends, which takes seconds: `docker stop`
    # gives a container ten before SIGKILL.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def child_name(hostname: str, index: int) -> str:
    """``w@h`` -> ``w1@h``; a name ending in a digit gets a dash: ``labctl-812-1@h``."""
    name, _, host = hostname.partition("@")
    dash = "-" if name[-1:].isdigit() else ""
    return f"{name}{dash}{index}@{host or '%h'}"


def child_command(queues: str, metrics_port: int | None, loglevel: str, hostname: str,
                  index: int) -> list[str]:
    command = [sys.executable, "-m", "labctl.cli.main", "worker", "--queues", queues,
               "--concurrency", "1", "--loglevel", loglevel,
               "--hostname", child_name(hostname, index)]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port + index - 1 if metrics_port else 0)]
    return command


def supervise(queues: str, concurrency: int, metrics_port: int | None, loglevel: str,
              hostname: str) -> int:
    """Start ``concurrency`` worker processes, forward signals, restart the ones that crash."""
    commands = [child_command(queues, metrics_port, loglevel, hostname, i)
                for i in range(1, concurrency + 1)]
    children: dict[int, tuple[subprocess.Popen, float]] = {}
    stopping: list[int] = []

    def start(index: int) -> None:
        # Own session: a terminal's Ctrl-C reaches this process only, which forwards it
        # once (a second SIGINT would make Celery cold-stop the child mid-batch).
        children[index] = (subprocess.Popen(commands[index - 1], start_new_session=True,
                                            env={**os.environ,
                                                 SUPERVISOR_PID_ENV: str(os.getpid())}),
                           time.monotonic())

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for process, _ in children.values():
            if process.poll() is None:
                process.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(signum, forward)
    for index in range(1, concurrency + 1):
        start(index)
    click.echo(f"started {concurrency} worker processes on {queues}", err=True)

    exit_code, broken = 0, False
    while children:
        time.sleep(0.5)
        for index, (process, started) in list(children.items()):
            code = process.poll()
            if code is None:
                continue
            del children[index]
            exit_code = max(exit_code, code if code > 0 else 1 if code < 0 else 0)
            if stopping:
                continue
            if time.monotonic() - started < MIN_CHILD_UPTIME:
                click.echo(f"labctl: worker {index} exited with {code} right after starting; "
                           "stopping all", err=True)
                broken = True
                forward(signal.SIGTERM, None)
                continue
            click.echo(f"labctl: worker {index} exited with {code}; restarting it", err=True)
            start(index)
    return (exit_code or 1) if broken else exit_code
