"""The Celery app's contract, read from its configuration (the queue tests exercise it)."""

from __future__ import annotations

from labctl.worker.app import TASK_NAME, make_app


def test_json_only_one_message_at_a_time_acked_after_the_job_on_one_thread():
    conf = make_app("redis://127.0.0.1:1/0").conf  # never connects: configuration only
    # JSON only: a message must never make a worker unpickle attacker-chosen bytes.
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    # One job per process, none hoarded behind it, the message kept until the job ends.
    assert conf.worker_pool == "labctl.worker.thread_pool:TaskPool"  # Celery's threads pool
    assert conf.worker_concurrency == 1
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_disable_prefetch
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"}
    assert not conf.task_create_missing_queues
    assert TASK_NAME == "labctl.run_job"
