"""Job records in Redis: the queue's source of truth, shared by the CLI and the worker.

One Redis hash per job, ``labctl:job:<id>``; every field value is JSON, so numbers, None and
the metrics dict keep their types. Updating a field is one ``HSET``: the heartbeat, the
reporter and ``labctl cancel`` touch different fields and never lose each other's writes.
Every state change that two processes could race on (claim, heartbeat, finish, requeue,
cancel) is a Lua script, so Redis runs it atomically.

Other keys:

- ``labctl:jobs``               sorted set: job id -> creation time (``labctl list``)
- ``labctl:jobs:running``       set of ids in state running (what the reaper scans)
- ``labctl:job:<id>:lease``     the owner's liveness lease; it expires ``heartbeat_timeout``
                                after the last heartbeat, measured by Redis' clock alone
- ``labctl:job:<id>:log``       list of epoch lines (``labctl logs``, no shared volume needed)
- ``labctl:worker:<name>``      a live worker's queues and devices (expires unless renewed)

This module is the storage: how each step is made atomic. When a step is taken, and what
follows from it in the job folder, is decided by ``shared.lifecycle``, the only caller of
the methods that write (``tests/test_lifecycle.py`` checks it).

This module never imports torch or Celery: the CLI reads records without paying for either.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from labctl.shared.artifacts import utc_now, validate_job_id
from labctl.shared.jobstate import TERMINAL_STATES, JobRecord
from labctl.shared.redis_tls import redis_target
from labctl.shared.spec import JobSpec

#: A job whose worker died this many times is failed instead of requeued again: a job that
#: kills its worker (the kernel's OOM killer, a driver crash) must not take the fleet down.
#: Hand-backs at a graceful shutdown do not count.
MAX_WORKER_LOSSES = 3
#: ``labctl logs`` keeps the last lines only; a 1000-epoch job stays well under it.
MAX_LOG_LINES = 10_000

INDEX_KEY = "labctl:jobs"
RUNNING_KEY = "labctl:jobs:running"
#: Fields a reader never needs: the lease token is an implementation detail.
INTERNAL_FIELDS = ("owner",)


#: ``labctl:worker:<name>``: a live worker's queues, expiring unless it renews them.
WORKER_KEY_PREFIX = "labctl:worker:"


def job_key(job_id: str) -> str:
    return f"labctl:job:{validate_job_id(job_id)}"


def lease_key(job_id: str) -> str:
    return f"{job_key(job_id)}:lease"


def logged_epochs_key(job_id: str) -> str:
    return f"{job_key(job_id)}:log:epochs"


def log_key(job_id: str) -> str:
    return f"{job_key(job_id)}:log"


def parse_iso(stamp: str | None) -> float | None:
    return datetime.fromisoformat(stamp).timestamp() if stamp else None


def connect(url: str, *, timeout: float = 5.0, retries: int = 3) -> redis.Redis:
    """A client whose calls fail within about ``timeout`` seconds per try.

    The worker keeps the default retries, which ride over a Redis restart; the CLI passes
    ``retries=0`` and a short timeout so an unreachable broker is reported at once. A
    ``rediss://`` URL gets the TLS options the broker uses (``shared/redis_tls.py``).
    """
    target = redis_target(url)
    return redis.Redis.from_url(
        target.url, socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), retries),
        health_check_interval=30, decode_responses=True, **target.client_options(),
    )


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in fields.items()}


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:  # a field someone set by hand: show it as it is
            out[key] = value
    return out


def _public(raw: dict[str, str]) -> JobRecord:
    record = _decode(raw)
    for field in INTERNAL_FIELDS:
        record.pop(field, None)
    return cast(JobRecord, record)


def _flat(fields: dict[str, Any]) -> list[str]:
    """``{a: 1}`` -> ``["a", "1"]``: field/value pairs for HSET inside a script."""
    return [item for pair in _encode(fields).items() for item in pair]


# Values as stored (JSON), for comparisons inside the scripts.
_RUNNING, _QUEUED, _TRUE = json.dumps("running"), json.dumps("queued"), json.dumps(True)
_TERMINAL_LUA = " or ".join(f"state == '{json.dumps(s)}'" for s in sorted(TERMINAL_STATES))

# KEYS: record, lease, running set. ARGV: job id, attempt, owner (JSON), lease ms, now
# (JSON), fields to set on a claim (pairs...). A message is run only if its attempt is the
# record's current one and the job is still queued: a redelivered or duplicated message is
# a no-op. ``started_at`` keeps the first attempt's start; ``attempt_started_at`` the latest.
_CLAIM = f"""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if {_TERMINAL_LUA} then return 'terminal' end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
if tonumber(ARGV[2]) ~= attempts then return 'stale' end
if state ~= '{_QUEUED}' then return 'busy' end
local started = redis.call('HGET', KEYS[1], 'started_at')
if not started or started == 'null' then redis.call('HSET', KEYS[1], 'started_at', ARGV[5]) end
redis.call('HSET', KEYS[1], 'state', '{_RUNNING}', 'owner', ARGV[3],
           'attempt_started_at', ARGV[5], 'heartbeat_at', ARGV[5], unpack(ARGV, 6))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[1])
return 'claimed'
"""

# KEYS: record, lease. ARGV: owner, lease ms, heartbeat fields (pairs...).
# Returns 0 if the job is no longer ours (requeued while we were stalled), 1 alive,
# 2 alive but the user asked to cancel, 3 no record at all (Redis lost it).
_HEARTBEAT = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 3 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'state') ~= '{_RUNNING}' then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if redis.call('HGET', KEYS[1], 'cancel_requested') == '{_TRUE}' then return 2 end
return 1
"""

# KEYS: record, lease, running set. ARGV: job id, owner, fields (pairs...).
# Writes only if we still own the job: a worker that lost its lease must not overwrite the
# record of the attempt that replaced it.
_UPDATE_OWNED = f"""
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]
   or redis.call('HGET', KEYS[1], 'state') ~= '{_RUNNING}' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= '{_RUNNING}' then
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[1])
end
return 1
"""

# KEYS: record, lease, running set. ARGV: job id, max losses, now (JSON), owner (JSON) or '',
# what the owner lost (JSON) or ''.
# With an owner: that worker hands its job back (graceful shutdown, or a process of the job
# was killed: ARGV[5] says which, and that counts as a loss). Without: the reaper requeues a
# running job whose lease expired (a lost worker). Either way the job is queued again with
# attempts + 1, exactly once however many reapers race, and the caller sends the message;
# or it fails once its losses reach the maximum.
_REQUEUE = f"""
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= '{_RUNNING}' then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {{'not-running'}}
end
if ARGV[4] ~= '' then
  if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4] then return {{'not-owner'}} end
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  return {{'alive'}}
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '{_TRUE}' then
  redis.call('HSET', KEYS[1], 'state', '{json.dumps("cancelled")}', 'finished_at', ARGV[3],
             'error', '{json.dumps("cancelled by the user")}', 'owner', 'null')
  return {{'cancelled'}}
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '1')
if ARGV[4] == '' or ARGV[5] ~= '' then
  local lost = tonumber(redis.call('HGET', KEYS[1], 'workers_lost') or '0') + 1
  redis.call('HSET', KEYS[1], 'workers_lost', tostring(lost))
  if lost >= tonumber(ARGV[2]) then
    local why = '"worker lost ' .. lost .. ' times; not retrying"'
    if ARGV[5] ~= '' then
      why = cjson.encode('lost a process of the job ' .. lost .. ' times (last: ' ..
                         cjson.decode(ARGV[5]) .. '); not retrying')
    end
    redis.call('HSET', KEYS[1], 'state', '{json.dumps("failed")}', 'finished_at', ARGV[3],
               'error', why, 'owner', 'null')
    return {{'failed'}}
  end
end
redis.call('HSET', KEYS[1], 'state', '{_QUEUED}', 'attempts', tostring(attempts + 1),
           'requeued_at', ARGV[3], 'owner', 'null')
return {{'requeued', attempts + 1}}
"""

# KEYS: record, lease, running set. ARGV: job id, now (JSON). Queued -> cancelled at once
# (the task will skip it); running -> a flag the worker polls each batch, or cancelled at once
# when its lease has expired (its worker is dead: nobody would see the flag until a reaper
# ran). Returns the state found, or 'lost' for that last case.
_CANCEL = f"""
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == '{_QUEUED}' then
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0') or 0
  local why = 'cancelled by the user before it started'
  if epoch > 0 then why = 'cancelled by the user after ' .. epoch .. ' epochs' end
  redis.call('HSET', KEYS[1], 'state', '{json.dumps("cancelled")}', 'finished_at', ARGV[2],
             'error', cjson.encode(why), 'cancel_requested', '{_TRUE}')
elseif state == '{_RUNNING}' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '{_TRUE}')
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('HSET', KEYS[1], 'state', '{json.dumps("cancelled")}', 'finished_at', ARGV[2],
               'error', '{json.dumps("cancelled by the user after its worker was lost")}',
               'owner', 'null')
    redis.call('SREM', KEYS[3], ARGV[1])
    return 'lost'
  end
end
return cjson.decode(state)
"""


# KEYS: record, lease, running set, index, log. ARGV: job id, owner (JSON),
# lease ms, created (score), running (1/0), n fields, fields (pairs...), log lines...
# Recreates a record Redis lost, only if it is still missing: the heartbeat thread and the
# final write may both try.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 7, 6 + 2 * n))
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
if ARGV[5] == '1' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[1])
end
if #ARGV > 6 + 2 * n then
  redis.call('DEL', KEYS[5])
  redis.call('RPUSH', KEYS[5], unpack(ARGV, 7 + 2 * n))
end
return 1
"""


# KEYS: the worker's key. ARGV: its entry (JSON), ttl ms, the dead holder's entry or ''.
# Returns nothing if the name is now ours, else the entry of the worker that holds it.
_RESERVE_WORKER = """
local held = redis.call('GET', KEYS[1])
if held and (ARGV[3] == '' or cjson.decode(held).pid ~= cjson.decode(ARGV[3]).pid
             or cjson.decode(held).host ~= cjson.decode(ARGV[3]).host) then
  return held
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""


def _worker_entry(name: str, queues: Iterable[str],
                  capacity: dict[str, int] | None = None) -> str:
    """A worker's presence: its name, queues, and where it runs (host and pid), so a
    worker starting under a taken name can tell a live holder from a dead one; with
    ``capacity``, what it can give one job (``gpus``, ``cpus``)."""
    return json.dumps({"name": name, "queues": sorted(queues), "seen_at": utc_now(),
                       "host": socket.gethostname(), "pid": os.getpid(), **(capacity or {})})


def initial_record(job_id: str, spec: JobSpec, queue: str) -> JobRecord:
    """A job's record before its first attempt."""
    return {
        "id": job_id, "state": "queued", "queue": queue, "attempts": 1,
        "created_at": utc_now(), "started_at": None, "finished_at": None,
        "epoch": 0, "epochs": spec.epochs, "metrics": None, "error": None,
        "worker": None, "artifacts": None, "cancel_requested": False,
        "model": spec.model, "optimizer": spec.optimizer, "dataset": spec.dataset,
        "name": spec.name, "tags": list(spec.tags), "sweep_id": spec.sweep_id,
        "priority": spec.priority, "spec": spec.model_dump(mode="json"),
    }


class JobRecords:
    """Read and change job records. Thread-safe (redis-py clients are)."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._claim = client.register_script(_CLAIM)
        self._reserve_worker = client.register_script(_RESERVE_WORKER)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._update_owned = client.register_script(_UPDATE_OWNED)
        self._requeue = client.register_script(_REQUEUE)
        self._cancel = client.register_script(_CANCEL)
        self._restore = client.register_script(_RESTORE)

    @classmethod
    def from_url(cls, url: str, **connect_options: Any) -> JobRecords:
        return cls(connect(url, **connect_options))

    # --- creation and reading ------------------------------------------------------------

    def create(self, job_id: str, spec: JobSpec, queue: str) -> JobRecord:
        """The record of a job about to be sent to ``queue`` (attempt 1)."""
        created = time.time()
        record = initial_record(job_id, spec, queue)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=_encode(record))
        pipe.zadd(INDEX_KEY, {job_id: created})
        pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(job_key(job_id))
        if not raw:
            return None
        return _public(raw)

    def state(self, job_id: str) -> str | None:
        value = self.client.hget(job_key(job_id), "state")
        return json.loads(value) if value else None

    def list(self, state: str | None = None, limit: int = 20) -> list[JobRecord]:
        """Newest first; with ``state``, the newest ``limit`` jobs in that state."""
        found: list[JobRecord] = []
        page, start = max(limit, 50), 0
        while len(found) < limit:
            ids = self.client.zrevrange(INDEX_KEY, start, start + page - 1)
            if not ids:
                break
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            for raw in pipe.execute():
                if raw:
                    record = _public(raw)
                    if state is None or record.get("state") == state:
                        found.append(record)
            start += page
        return found[:limit]

    def running_ids(self) -> list[str]:
        return sorted(self.client.smembers(RUNNING_KEY))

    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(job_key(job_id), "cancel_requested") == _TRUE

    # --- the lifecycle (called by the worker) -------------------------------------------

    def claim(self, job_id: str, attempt: int, owner: str, lease_seconds: float,
              **fields: Any) -> str:
        """Try to start ``attempt`` of a queued job. Returns ``claimed``, or why not:
        ``missing``, ``terminal``, ``stale`` (an older attempt's message) or ``busy``."""
        return self._claim(
            keys=[job_key(job_id), lease_key(job_id), RUNNING_KEY],
            args=[job_id, attempt, json.dumps(owner), int(lease_seconds * 1000),
                  json.dumps(utc_now()), *_flat(fields)])

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float) -> int:
        """Renew the lease. 0: lost (no longer ours), 1: alive, 2: alive, cancel requested,
        3: the record is gone (Redis lost its data)."""
        return int(self._heartbeat(
            keys=[job_key(job_id), lease_key(job_id)],
            args=[json.dumps(owner), int(lease_seconds * 1000),
                  *_flat({"heartbeat_at": utc_now()})]))

    def update_owned(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Set fields if ``owner`` still runs the job; a terminal ``state`` also releases it."""
        return bool(self._update_owned(keys=[job_key(job_id), lease_key(job_id), RUNNING_KEY],
                                       args=[job_id, json.dumps(owner), *_flat(fields)]))

    def requeue_if_dead(self, job_id: str, max_losses: int = MAX_WORKER_LOSSES) -> tuple[str, int]:
        """The reaper's step for one running job: ``(outcome, new attempt)``, outcome one of
        requeued | alive | not-running | cancelled | failed."""
        return self._requeue_result(job_id, max_losses, owner="")

    def release(self, job_id: str, owner: str, loss: str | None = None,
                max_losses: int = MAX_WORKER_LOSSES) -> tuple[str, int]:
        """Hand a running job back to the queue: our worker is shutting down, or (``loss``
        says what) a process of the job was killed, which counts like a lost worker:
        outcome ``failed`` once the job's losses reach ``max_losses``."""
        return self._requeue_result(job_id, max_losses, owner=json.dumps(owner),
                                    loss=json.dumps(loss) if loss else "")

    def _requeue_result(self, job_id: str, max_losses: int, owner: str,
                        loss: str = "") -> tuple[str, int]:
        result = self._requeue(keys=[job_key(job_id), lease_key(job_id), RUNNING_KEY],
                               args=[job_id, max_losses, json.dumps(utc_now()), owner, loss])
        return str(result[0]), int(result[1]) if len(result) > 1 else 0

    def fail_unclaimed(self, job_id: str, error: str) -> None:
        """A queued job whose message can never run (e.g. it could not be sent)."""
        self.client.hset(job_key(job_id), mapping=_encode(
            {"state": "failed", "error": error, "finished_at": utc_now()}))

    def restore(self, job_id: str, owner: str | None, lease_seconds: float,
                fields: dict[str, Any], log_lines: list[str], created: float,
                logged_epochs: Iterable[int] = ()) -> bool:
        """Write back the record of a job Redis lost (held by ``owner`` if it is running),
        with its log lines. False if a record exists (someone restored it first)."""
        running = fields.get("state") == "running"
        fields = {**fields, "owner": owner if running else None}
        restored = bool(self._restore(
            keys=[job_key(job_id), lease_key(job_id), RUNNING_KEY, INDEX_KEY, log_key(job_id)],
            args=[job_id, json.dumps(owner), int(lease_seconds * 1000), created,
                  1 if running else 0, len(fields),
                  *_flat(fields),
                  *log_lines[-MAX_LOG_LINES:]]))
        if restored and (epochs := list(logged_epochs)):
            self.client.sadd(logged_epochs_key(job_id), *epochs)
        return restored

    # --- cancel --------------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> str:
        """Returns the state the job was in: ``missing``, ``queued`` (now cancelled),
        ``running`` (flagged; its worker stops it at the next batch), ``lost`` (it was
        running, but its worker's lease had expired: now cancelled) or a terminal state."""
        return str(self._cancel(keys=[job_key(job_id), lease_key(job_id), RUNNING_KEY],
                                args=[job_id, json.dumps(utc_now())]))

    # --- workers ------------------------------------------------------------------------

    def announce_worker(self, name: str, queues: Iterable[str], ttl_seconds: float,
                        capacity: dict[str, int] | None = None) -> None:
        """``name`` (this process) takes jobs from ``queues`` and can give a job ``capacity``
        (``gpus``, ``cpus``); it says so again before ``ttl_seconds``."""
        self.client.set(f"{WORKER_KEY_PREFIX}{name}", _worker_entry(name, queues, capacity),
                        px=int(ttl_seconds * 1000))

    def reserve_worker_name(self, name: str, queues: Iterable[str], ttl_seconds: float, *,
                            replacing: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Take ``name`` for this process, atomically: None if it is ours now, else the
        live worker that holds it. ``replacing``: a holder known to be dead, whose entry
        may be overwritten (and only that entry: a worker starting meanwhile keeps its)."""
        held = self._reserve_worker(
            keys=[f"{WORKER_KEY_PREFIX}{name}"],
            args=[_worker_entry(name, queues), int(ttl_seconds * 1000),
                  json.dumps(replacing) if replacing is not None else ""])
        return json.loads(held) if held else None

    def live_workers(self) -> list[dict[str, Any]]:
        """The workers that announced themselves within their ttl."""
        keys = list(self.client.scan_iter(match=f"{WORKER_KEY_PREFIX}*", count=100))
        values = self.client.mget(keys) if keys else []
        return [json.loads(value) for value in values if value]

    # --- logs ----------------------------------------------------------------------------

    def append_log(self, job_id: str, *lines: str, epochs: Iterable[int] = ()) -> None:
        """Append ``lines``; ``epochs`` are the epochs whose lines are among them."""
        if not lines:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(log_key(job_id), *lines)
        pipe.ltrim(log_key(job_id), -MAX_LOG_LINES, -1)
        if epochs := list(epochs):
            pipe.sadd(logged_epochs_key(job_id), *epochs)
        pipe.execute()

    def logged_epochs(self, job_id: str) -> set[int]:
        """The epochs whose line reached the log."""
        return {int(epoch) for epoch in self.client.smembers(logged_epochs_key(job_id))}

    def read_log(self, job_id: str, start: int = 0) -> list[str]:
        return self.client.lrange(log_key(job_id), start, -1)
