"""The queue's contract with Celery, shared by the side that sends jobs and the workers.

The task name, the queue names and the Celery configuration live here, in ``shared``, so
``labctl submit`` can send a task without importing the worker; ``labctl.worker.app``
builds the workers' app from the same configuration (plus the task module and the guarded
transport that only a consumer needs).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from labctl.shared.redis_tls import RedisTarget, redis_target

TASK_NAME = "labctl.run_job"
#: The Celery queues a job can be routed to (kombu keeps each in a Redis list of that name).
QUEUES = ("cpu", "gpu")
#: ``JobSpec.priority`` as kombu's Redis priority (0 is served first). Kombu keeps one list
#: per step (0, 3, 6, 9) for each queue and a worker pops the lowest step first.
PRIORITIES = {"high": 0, "normal": 3, "low": 9}
PRIORITY_STEPS = [0, 3, 6, 9]
#: kombu.transport.redis.Channel.sep: between a queue's name and its priority step.
PRIORITY_SEP = "\x06\x16"


def priority_list(queue: str, priority: str = "normal") -> str:
    """The Redis list kombu keeps ``queue``'s messages of ``priority`` in."""
    step = PRIORITIES[priority]
    return f"{queue}{PRIORITY_SEP}{step}" if step else queue

#: Fast socket timeouts: a dead Redis is noticed in seconds, and then retried.
SOCKET_TIMEOUT = 10.0


def celery_settings() -> dict[str, Any]:
    """The configuration every labctl Celery app uses, sender or worker."""
    return dict(
        # JSON only: a message can never make a worker unpickle attacker-chosen bytes.
        accept_content=["json"], result_accept_content=["json"],
        task_serializer="json", result_serializer="json",
        # Each queue its own exchange and routing key: without them kombu fills in the
        # default queue's, and a message sent to "gpu" would land on "cpu".
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name)
                     for name in QUEUES],
        task_default_queue="cpu", task_default_exchange="cpu", task_default_routing_key="cpu",
        task_create_missing_queues=False,
        # A message sent without a priority (by hand, or by an older labctl) is normal, not
        # kombu's default 0, which would make it overtake every queued job.
        task_default_priority=PRIORITIES["normal"],
        # Ack after the job, so a worker that dies mid-job has not consumed the message;
        # recovery itself is the reaper's job (heartbeats), see worker/reaper.py.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        # Task events, so Flower (and `celery events`) see each job received, started and
        # ended; without them it sees the workers (heartbeats) but none of their jobs. The
        # sent event shows a job from the moment it is queued.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Never prefork (docs/queue.md, "One job per process"), and not solo either: on the
        # threads pool the job trains in the pool's one thread while the main thread answers
        # remote control and Flower. Ours (worker/thread_pool.py) turns Celery's terminate
        # into labctl's cancel. A plain `celery -A labctl.worker.app worker` gets the same
        # pool as `labctl worker`. (A name, not an import: senders never load the worker.)
        worker_pool="labctl.worker.thread_pool:TaskPool",
        # One job per process on any pool: `--pool threads` alone would start a thread per
        # core, each taking a job.
        worker_concurrency=1,
        # One job at a time per worker process: never hoard a second message behind a
        # two-hour job while another worker sits idle.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        # Our own lease decides whether a job is alive; a broker hiccup must not kill it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # a worker waits for Redis forever
        broker_channel_error_retry=True,
        broker_transport_options={
            # kombu re-delivers unacked messages after this long whether or not the job is
            # still running; the task's claim check makes such a redelivery a no-op.
            "visibility_timeout": 3600,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": SOCKET_TIMEOUT,
            "retry_on_timeout": True,
            "health_check_interval": 30,
        },
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        result_backend_max_sleep_between_retries_ms=2000,
        redis_socket_timeout=SOCKET_TIMEOUT,
        redis_socket_connect_timeout=SOCKET_TIMEOUT,
        redis_retry_on_timeout=True,
        result_expires=7 * 24 * 3600,
        task_publish_retry_policy={"max_retries": 5, "interval_start": 0,
                                   "interval_step": 0.5, "interval_max": 2},
    )


def tls_settings(target: RedisTarget) -> dict[str, Any]:
    """The broker's and the result backend's TLS options: the ones every other client of
    ``target`` uses (``shared/redis_tls.py``); none for a plain ``redis://`` URL."""
    if target.tls is None:
        return {}
    return dict(broker_use_ssl=dict(target.tls), redis_backend_use_ssl=dict(target.tls))


def sender_app(redis_url: str) -> Celery:
    """An app that sends labctl tasks to ``redis_url`` (it runs none)."""
    target = redis_target(redis_url)
    app = Celery("labctl", broker=target.url, backend=target.url)
    app.conf.update(celery_settings(), **tls_settings(target))
    return app
