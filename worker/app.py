"""The workers' Celery app: ``celery -A labctl.worker.app worker -Q cpu,gpu``, or ``labctl
worker``.

Only workers import this module; senders use ``labctl.shared.celery_config``, which holds the
task name, the queues and the configuration both sides share. The task module is listed in
``include`` and imported by the worker only.

One job per process: a job owns its device (a GPU, or every core through BLAS), so one job
per process is all the concurrency we want; more workers means more processes (``labctl
worker --concurrency N`` starts N of them). ``labctl worker`` runs it in the one thread of
Celery's threads pool, so the main thread keeps serving the consumer (remote control, event
heartbeats) and Flower and ``celery inspect`` see a busy worker. No fork, so CUDA is never
initialised in a parent that forks, a SIGKILL of the worker kills its job with it (no orphan
keeps training and writing checkpoints), and the process that trains is the one serving
``/metrics``. See docs/queue.md.
"""

from __future__ import annotations

import logging
import threading
import warnings
from urllib.parse import urlsplit

from celery import Celery, signals
from celery.exceptions import CPendingDeprecationWarning
from kombu.transport import redis as kombu_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from labctl.shared.celery_config import (
    QUEUES,
    SOCKET_TIMEOUT,
    TASK_NAME,
    celery_settings,
    tls_settings,
)
from labctl.shared.redis_tls import redis_target
from labctl.shared.settings import get_settings, redact_url

log = logging.getLogger(__name__)

#: For the consumer's pubsub reads: fail at once (``GuardedRedisChannel._receive_one``).
NO_RETRY = Retry(NoBackoff(), 0)


class GuardedRedisChannel(kombu_redis.Channel):
    """Drops a message that kombu or Celery cannot even parse, instead of dying or stalling.

    kombu pops a message off the Redis list and parses its JSON envelope before Celery sees
    it: text that is not JSON, or JSON that is not an envelope, raises there and Celery stops
    the worker ("Unrecoverable error"). An envelope naming our task with a body Celery cannot
    unpack raises after the message was marked unacked, and with a prefetch of one the worker
    then waits forever for its ack. Anyone who can write to Redis could stop every worker
    with one LPUSH. Both cases are logged and the message dropped; messages Celery can read
    but our task cannot (bad arguments, bad spec) are rejected by the task itself.
    """

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Raised before the message reached Celery: it is off the list, nothing to ack.
            log.error("rejected malformed message (not a kombu JSON envelope): %s: %s",
                      type(exc).__name__, exc)
            return True  # consumed; the poller issues the next BRPOP

    def _receive_one(self, c):
        # A pubsub read (remote control, broadcast) that fails must reach Celery, which then
        # reconnects the whole consumer. redis-py would retry it in place: reconnect,
        # resubscribe and read again, and that second read blocks with no timeout
        # (PubSub.parse_response(block=True)) on a socket nothing said was readable, so the
        # event loop stops for good and the worker takes no more jobs. Seen when Redis
        # restarted while the worker was stopped: on waking, the old socket reads EOF and the
        # new server already answers (tests/test_queue_crash.py).
        if c.connection is not None:
            c.connection.retry = NO_RETRY
        return super()._receive_one(c)

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        connection_errors = self.connection.connection_errors + self.connection.channel_errors

        def guarded(message):
            try:
                return callback(message)
            except connection_errors:
                raise  # Celery reconnects; the message stays unacked for redelivery
            except Exception as exc:
                log.error("rejected malformed message %s: %s: %s",
                          message.headers.get("id") if isinstance(message.headers, dict)
                          else "?", type(exc).__name__, exc)
                if not message.acknowledged:
                    message.reject(requeue=False)

        return super().basic_consume(queue, no_ack, guarded, consumer_tag, **kwargs)


class GuardedRedisTransport(kombu_redis.Transport):
    Channel = GuardedRedisChannel


#: URL schemes the guarded transport serves: plain Redis and Redis over TLS are one kombu
#: transport (TLS is its ``broker_use_ssl``). Sentinel URLs keep kombu's own.
GUARDED_SCHEMES = ("redis", "rediss")


def make_app(redis_url: str | None = None) -> Celery:
    """The app for ``redis_url`` (default: ``LABCTL_REDIS_URL``)."""
    target = redis_target(redis_url or get_settings().redis_url)
    app = Celery("labctl", broker=target.url, backend=target.url,
                 include=["labctl.worker.tasks"])
    if urlsplit(target.url).scheme in GUARDED_SCHEMES:
        app.conf.broker_transport = "labctl.worker.app:GuardedRedisTransport"
    app.conf.update(celery_settings(), **tls_settings(target))
    return app


app = make_app()


def drop_reject_traceback(record: logging.LogRecord) -> bool:
    """A logging filter: Celery logs every Reject with the traceback of the task's frame, but
    ours are expected and say all in their message ("Redis unavailable: ...", "worker
    shutting down; ..."): one line each."""
    data = getattr(record, "data", None)
    if isinstance(data, dict) and data.get("description") == "rejected":
        record.exc_info, record.exc_text = None, None
    return True


@signals.celeryd_after_setup.connect
def _prepare_worker(sender=None, **_kwargs) -> None:
    """Runs once in the worker process, after logging is set up and before it takes jobs."""
    settings = get_settings()
    # Celery warns on every reconnect that worker_cancel_long_running_tasks_on_connection_loss
    # will default to True in 6.0. We set it explicitly, so the warning is noise. (Installed
    # here: Celery's logging setup turns its pending-deprecation warnings back on.)
    warnings.filterwarnings("ignore", category=CPendingDeprecationWarning,
                            module=r"celery\.worker\.consumer\.consumer")
    # Our task logs how each job ended, in one line; Celery's own "Task ... succeeded in
    # 0.4s: {'state': 'failed'}" for a job that failed says the opposite. Its warnings and
    # errors (a task that raised) still show.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    logging.getLogger("celery.app.trace").addFilter(drop_reject_traceback)
    log.info("labctl worker: broker %s, artifacts %s, data %s",
             redact_url(settings.redis_url), settings.artifacts_dir, settings.data_dir)
    if settings.heartbeat_timeout_seconds < 2 * settings.heartbeat_seconds:
        log.warning("LABCTL_HEARTBEAT_TIMEOUT_SECONDS (%s) should be at least twice "
                    "LABCTL_HEARTBEAT_SECONDS (%s), or healthy jobs get requeued",
                    settings.heartbeat_timeout_seconds, settings.heartbeat_seconds)
    start_metrics_if_configured(settings.metrics_port, settings.redis_url)
    # Pay for importing torch and the engines now rather than inside the first job. Importing
    # torch does not initialise CUDA, and no pool forks after this anyway.
    threading.Thread(target=_preload_engines, name="labctl-preload", daemon=True).start()


@signals.worker_ready.connect
def _install_stop_signals(sender=None, **_kwargs) -> None:
    """After Celery's own handlers, which worker_ready follows (see worker/stop_signals.py)."""
    from labctl.worker.stop_signals import install_stop_signals

    install_stop_signals(getattr(sender, "hostname", None) or "worker")


@signals.worker_ready.connect
def _start_reaper(sender=None, **_kwargs) -> None:
    from labctl.worker.reaper import start_reaper

    start_reaper(app, worker=getattr(sender, "hostname", None),
                 queues=tuple(app.amqp.queues.consume_from or ()))


@signals.worker_shutting_down.connect
def _hand_back_running_job(sig=None, how=None, exitcode=None, **_kwargs) -> None:
    """Warm shutdown (SIGTERM, e.g. ``docker stop``): instead of making the caller wait for
    a job that may take hours, stop it at the next batch and requeue it at once; it resumes
    from its last epoch checkpoint on the next free worker.

    Sent from Celery's signal handler, in the main thread; the job trains in the pool's
    thread, where no signal handler runs, and learns of it from the event this sets (checked
    before every batch). Celery's warm shutdown then waits for that thread, so the hand-back
    and the ack of the old message happen before the connection closes."""
    from labctl.worker.queue_reporter import request_handback

    request_handback(f"worker shutting down ({sig})")


def start_metrics_if_configured(port: int | None, redis_url: str) -> None:
    """The one hook that starts /metrics."""
    if port is None:
        return
    from labctl.worker.metrics import start_metrics_server

    try:
        start_metrics_server(port, redis_url)
    except OSError as exc:  # the worker still trains; only its metrics are missing
        log.error("cannot serve metrics on port %s: %s", port, exc)


def _preload_engines() -> None:
    try:
        import torch  # noqa: F401

        import labctl.worker.numpy_engine  # noqa: F401
        import labctl.worker.plots  # noqa: F401  (matplotlib: a second on a small machine)
    except Exception:  # a broken import shows up, with its traceback, in the first job
        log.debug("preloading the engines failed", exc_info=True)


__all__ = ["QUEUES", "SOCKET_TIMEOUT", "TASK_NAME", "app", "make_app"]
