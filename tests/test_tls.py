"""Redis over TLS keeps every guarantee of plain Redis: a real redis-server that speaks TLS
only (no plain port) and wants a password, certificates from a CA this module makes with
``openssl``, a real ``labctl worker`` and the real ``labctl`` command in subprocesses (their
stderr is what a user sees). Jobs are tiny numpy-cnn runs on the bundled digits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from labctl.shared.jobstate import TERMINAL_STATES
from labctl.shared.queue import submit_job
from labctl.shared.records import JobRecords
from labctl.shared.spec import build_spec
from labctl.shared.testing import (
    CertificateAuthority,
    RedisServer,
    RedisTLS,
    WorkerProcess,
    openssl_available,
    redis_server_available,
    wait_for,
)
from labctl.worker.app import make_app

pytestmark = pytest.mark.integration

PASSWORD = "tls-test-secret-2718"
TINY = {"model": "numpy-cnn", "dataset": "digits", "epochs": 2, "batch_size": 64,
        "limit_train": 256, "limit_test": 128, "num_workers": 0}
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


@dataclass
class TlsStack:
    server: RedisServer
    ca: CertificateAuthority
    worker: WorkerProcess
    records: JobRecords
    app: Any
    tmp: Path
    job_env: dict[str, str]
    #: Everything any labctl process printed in this module, for the password check.
    outputs: list[str] = field(default_factory=list)

    def labctl(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        """``labctl ARGS`` in a subprocess with the deployment's settings (the URL without
        parameters, ``LABCTL_REDIS_TLS_CA``), overridden by ``env``."""
        return run_labctl(args, {**self.job_env, **self.server.tls_env(), **env},
                          self.tmp, self.outputs)

    def wait_end(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        wait_for(lambda: self.records.state(job_id) in TERMINAL_STATES, timeout,
                 what=f"job {job_id} to end", interval=0.1)
        return self.records.get(job_id)


def run_labctl(args, env: dict[str, str], cwd: Path, outputs: list[str]):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LABCTL_")}
    done = subprocess.run([sys.executable, "-m", "labctl.cli.main", *args],
                          env={**clean, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    outputs += [done.stdout, done.stderr]
    return done


def needs_tls_tools() -> None:
    if not redis_server_available():
        pytest.skip("redis-server is not installed")
    if not openssl_available():
        pytest.skip("openssl is not installed")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[TlsStack]:
    needs_tls_tools()
    tmp = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority(tmp / "ca")
    # The certificate names 127.0.0.1 only, so "localhost" is a host name it does not list.
    tls = RedisTLS.issued_by(ca, hosts=("127.0.0.1",))
    (tmp / "data").mkdir()
    job_env = {"LABCTL_ARTIFACTS_DIR": str(tmp / "artifacts"),
               "LABCTL_DATA_DIR": str(tmp / "data"),
               "LABCTL_HEARTBEAT_SECONDS": "0.5", "LABCTL_HEARTBEAT_TIMEOUT_SECONDS": "5"}
    with RedisServer(tmp / "redis", password=PASSWORD, tls=tls) as server:
        # As deployed: the URL has no parameters, the CA comes from LABCTL_REDIS_TLS_CA.
        worker = WorkerProcess(server.bare_url, tmp / "w1.log", queues="cpu",
                               env={**job_env, **server.tls_env()})
        try:
            worker.start().wait_ready()
            # In-process clients name the CA in the URL's parameters instead.
            yield TlsStack(server, ca, worker, JobRecords.from_url(server.url),
                           make_app(server.url), tmp, job_env)
        finally:
            worker.stop()


def test_the_server_speaks_tls_only(stack):
    plain = RedisServer(stack.tmp / "unused", port=stack.server.port, password=PASSWORD)
    with pytest.raises(Exception, match="(?i)connection|closed|reset"):
        plain.client(socket_timeout=2, socket_connect_timeout=2).ping()
    assert stack.server.client().ping()


def test_a_job_submitted_over_tls_trains_on_the_worker_and_succeeds(stack):
    done = stack.labctl("submit", *TINY_FLAGS, "--follow")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.splitlines()[0]
    assert "epoch 2/2" in done.stderr and "succeeded" in done.stderr
    record = stack.records.get(job_id)
    assert record["state"] == "succeeded" and record["worker"] == stack.worker.hostname
    status = stack.labctl("status", job_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "succeeded"
    listed = stack.labctl("list", "--json")
    assert listed.returncode == 0 and job_id in {job["id"] for job in json.loads(listed.stdout)}


def test_a_malformed_message_is_dropped_and_the_next_job_succeeds(stack):
    client = stack.server.client()
    raw = ["this is not json", "[1, 2, 3]", json.dumps({"foo": "bar"})]
    for message in raw:
        client.lpush("cpu", message)
    job_id = submit_job(build_spec(TINY), records=stack.records, app=stack.app)
    record = stack.wait_end(job_id)
    assert record["state"] == "succeeded", record["error"]
    assert stack.worker.alive(), stack.worker.log_text()[-3000:]
    log = stack.worker.log_text()
    assert log.count("rejected malformed message") >= len(raw)
    assert "Unrecoverable error" not in log
    wait_for(lambda: client.llen("cpu") == 0 and client.hlen("unacked") == 0, 30,
             what="every message to be acknowledged or dropped")


def test_the_ca_can_be_named_in_the_url_instead(stack):
    # ?ssl_ca_certs=... in LABCTL_REDIS_URL, no LABCTL_REDIS_TLS_CA.
    done = run_labctl(["list"], {**stack.job_env, "LABCTL_REDIS_URL": stack.server.url},
                      stack.tmp, stack.outputs)
    assert done.returncode == 0, done.stderr


def no_folders(stack: TlsStack) -> dict[str, str]:
    """An artefact root with no job folders: with some, ``list`` prints the same one line
    and then shows them (exit 0) instead of exiting 69."""
    return {"LABCTL_ARTIFACTS_DIR": str(stack.tmp / "no-folders")}


def one_line_refusal(done: subprocess.CompletedProcess, start: str) -> None:
    assert done.returncode == 69, (done.returncode, done.stderr)
    assert done.stderr.startswith(start), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert PASSWORD not in done.stdout + done.stderr


def test_a_client_with_the_wrong_ca_exits_69_with_one_line(stack):
    other = CertificateAuthority(stack.tmp / "other-ca", name="someone else's CA")
    host = f"127.0.0.1:{stack.server.port}"
    for args in (["list"], ["status", "20260101-000000-abcdef"], ["submit", *TINY_FLAGS],
                 ["cancel", "20260101-000000-abcdef"]):
        done = stack.labctl(*args, LABCTL_REDIS_TLS_CA=str(other.cert), **no_folders(stack))
        one_line_refusal(done, f"labctl: Redis at {host} sent a TLS certificate that was "
                               "refused (")
        assert "LABCTL_REDIS_TLS_CA" in done.stderr
    # With job folders on this host, list says the same line and shows the folders.
    done = stack.labctl("list", LABCTL_REDIS_TLS_CA=str(other.cert))
    assert done.returncode == 0 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"labctl: Redis at {host} sent a TLS certificate that was "
                                  "refused (")
    assert done.stderr.rstrip().endswith("showing the job folders only")


def test_a_host_name_the_certificate_does_not_list_exits_69_with_one_line(stack):
    url = stack.server.bare_url.replace("127.0.0.1", "localhost")
    done = stack.labctl("list", LABCTL_REDIS_URL=url, **no_folders(stack))
    one_line_refusal(done, f"labctl: Redis at localhost:{stack.server.port} sent a TLS "
                           "certificate that does not name this host (")


def test_a_plain_url_to_the_tls_port_says_to_use_rediss(stack):
    done = stack.labctl("list", LABCTL_REDIS_URL=stack.server.bare_url.replace("rediss:",
                                                                              "redis:"),
                        LABCTL_REDIS_TLS_CA="", **no_folders(stack))
    one_line_refusal(done, f"labctl: Redis at 127.0.0.1:{stack.server.port} closed the "
                           "connection; if it speaks TLS only, LABCTL_REDIS_URL must start "
                           "with rediss://")


def test_a_tls_url_to_a_plain_redis_says_it_did_not_answer_the_handshake(stack):
    with RedisServer(stack.tmp / "plain", password=PASSWORD, appendonly=False) as plain:
        done = stack.labctl("list", LABCTL_REDIS_URL=plain.url.replace("redis:", "rediss:"),
                            **no_folders(stack))
    one_line_refusal(done, f"labctl: Redis at 127.0.0.1:{plain.port} did not answer the TLS "
                           "handshake")


def test_a_worker_whose_certificate_check_fails_exits_69_with_one_line(stack):
    other = CertificateAuthority(stack.tmp / "other-ca-2", name="someone else's CA")
    worker = WorkerProcess(stack.server.bare_url, stack.tmp / "refused.log", name="refused",
                           queues="cpu", env={**stack.job_env, **stack.server.tls_env(),
                                              "LABCTL_REDIS_TLS_CA": str(other.cert)})
    try:
        worker.start()
        assert worker.process.wait(120) == 69
    finally:
        worker.stop()
    log = worker.log_text()
    stack.outputs.append(log)
    assert log.startswith(f"labctl: Redis at 127.0.0.1:{stack.server.port} sent a TLS "
                          "certificate that was refused (")
    assert log.count("\n") == 1 and "Traceback" not in log


def test_a_worker_whose_password_is_refused_exits_69_with_one_line(stack):
    env = {**stack.job_env, **stack.server.tls_env(),
           "LABCTL_REDIS_URL": stack.server.bare_url.replace(PASSWORD, "not-the-password")}
    worker = WorkerProcess(env["LABCTL_REDIS_URL"], stack.tmp / "wrong-pw.log",
                           name="wrongpw", queues="cpu", env=env)
    try:
        worker.start()
        assert worker.process.wait(120) == 69
    finally:
        worker.stop()
    log = worker.log_text()
    assert log.startswith(f"labctl: Redis at 127.0.0.1:{stack.server.port} refused the "
                          "credentials in LABCTL_REDIS_URL")
    assert log.count("\n") == 1 and "not-the-password" not in log


def test_a_worker_started_before_its_tls_redis_waits_for_it(stack):
    # Unreachable is not refused: the worker keeps trying until Redis is there.
    tmp = stack.tmp / "late"
    tls = RedisTLS.issued_by(CertificateAuthority(tmp / "ca"))
    server = RedisServer(tmp / "redis", password=PASSWORD, tls=tls)
    worker = WorkerProcess(server.bare_url, tmp / "w.log", name="late", queues="cpu",
                           env={**stack.job_env, **server.tls_env()})
    try:
        worker.start()
        wait_for(lambda: f":**@127.0.0.1:{server.port}/0: Error 111" in worker.log_text(), 90,
                 interval=0.2, what="the worker to try and fail to connect")
        assert worker.alive()
        server.start()
        worker.wait_ready(120)
    finally:
        worker.stop()
        server.stop()
    stack.outputs.append(worker.log_text())


def test_mutual_tls_a_worker_and_the_cli_present_client_certificates(stack):
    tmp = stack.tmp / "mtls"
    tls = RedisTLS.issued_by(CertificateAuthority(tmp / "ca"), auth_clients="yes")
    with RedisServer(tmp / "redis", password=PASSWORD, tls=tls) as server:
        env = {**stack.job_env, **server.tls_env()}  # LABCTL_REDIS_TLS_CA, _CERT, _KEY
        worker = WorkerProcess(server.bare_url, tmp / "w.log", name="mtls", queues="cpu",
                               env=env)
        try:
            worker.start().wait_ready()
            done = run_labctl(["submit", *TINY_FLAGS, "--wait"], env, stack.tmp,
                              stack.outputs)
            assert done.returncode == 0, done.stderr
            job_id = done.stdout.splitlines()[0]
            assert JobRecords.from_url(server.url).get(job_id)["worker"] == worker.hostname
            # Without a client certificate Redis closes the connection: one line again.
            bare = {k: v for k, v in env.items() if k not in ("LABCTL_REDIS_TLS_CERT",
                                                               "LABCTL_REDIS_TLS_KEY")}
            refused = run_labctl(["list"], {**bare, **no_folders(stack)}, stack.tmp,
                                 stack.outputs)
            one_line_refusal(refused, f"labctl: Redis at 127.0.0.1:{server.port} closed the "
                                      "TLS connection during the handshake")
            assert "LABCTL_REDIS_TLS_CERT" in refused.stderr
        finally:
            worker.stop()
        stack.outputs.append(worker.log_text())


def test_the_password_appears_in_no_output(stack):
    """Last: it also checks what the tests above printed."""
    done = stack.labctl("submit", *TINY_FLAGS, "--wait")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.splitlines()[0]
    logs = stack.labctl("logs", job_id)
    assert logs.returncode == 0 and "epoch 2/2" in logs.stdout
    refused = stack.labctl("list", LABCTL_REDIS_TLS_CA=str(stack.tmp / "missing.crt"))
    assert refused.returncode == 2 and "LABCTL_REDIS_TLS_CA" in refused.stderr
    worker_log = stack.worker.log_text()
    assert "rediss://:***@127.0.0.1" in worker_log  # labctl's start-up line, masked
    assert "rediss://:**@127.0.0.1" in worker_log  # Celery's banner, masked
    places = [*stack.outputs, worker_log, json.dumps(stack.records.get(job_id)),
              "\n".join(stack.records.read_log(job_id))]
    for text in places:
        assert PASSWORD not in text


# --- the recipe in docs/deploy.md --------------------------------------------------------

DEPLOY_MD = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def doc_shell_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in docs/deploy.md."""
    text = DEPLOY_MD.read_text()
    after = text[text.index(heading):]
    return after.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_openssl_recipe_in_the_deploy_guide_makes_certificates_redis_and_labctl_take(
        tmp_path):
    needs_tls_tools()
    tls_dir = tmp_path / "deploy" / "tls"  # the first block makes it and works in it
    for heading, cwd in (("### Make a CA and the Redis certificate with openssl", tmp_path),
                         ("### Mutual TLS (optional)", tls_dir)):  # where the CA is
        done = subprocess.run(["sh", "-ec", doc_shell_block(heading)], cwd=cwd,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    tls = RedisTLS(tls_dir / "ca.crt", tls_dir / "redis.crt", tls_dir / "redis.key",
                   auth_clients="yes", client_cert=tls_dir / "worker.crt",
                   client_key=tls_dir / "worker.key")
    with RedisServer(tmp_path / "redis", password=PASSWORD, tls=tls) as server:
        outputs: list[str] = []
        listed = run_labctl(["list"], {**server.tls_env(),
                                       "LABCTL_ARTIFACTS_DIR": str(tmp_path / "art")},
                            tmp_path, outputs)
        assert listed.returncode == 0, listed.stderr
        # The compose healthcheck: redis-cli presents the server's own certificate.
        if shutil.which("redis-cli"):
            ping = subprocess.run(
                ["redis-cli", "--tls", "--cacert", str(tls.ca), "--cert", str(tls.cert),
                 "--key", str(tls.key), "-p", str(server.port), "ping"],
                env={**os.environ, "REDISCLI_AUTH": PASSWORD}, capture_output=True,
                text=True, timeout=30)
            assert ping.stdout.strip() == "PONG", ping.stdout + ping.stderr
