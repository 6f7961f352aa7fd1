"""Real processes for integration tests and benchmarks: a private ``redis-server`` and labctl
workers. Shipped in the package (as ``flask.testing`` is) so benchmarks need not reach into
``tests/``.

Every test server listens on a free port with its files in a temp dir, so tests never touch
a Redis someone else is using (the shared one on 6379 included). Reused by the queue,
metrics and Prometheus tests::

    from labctl.shared.testing import RedisServer, WorkerProcess, free_port

    with RedisServer(tmp_path / "redis") as server:
        worker = WorkerProcess(server.url, tmp_path / "w1.log", env=job_env).start()
        worker.wait_ready()

A TLS-only server (no plain port) takes certificates from a throwaway CA made with the
``openssl`` command::

    ca = CertificateAuthority(tmp_path / "ca")
    tls = RedisTLS.issued_by(ca)
    with RedisServer(tmp_path / "redis", tls=tls, password="pw") as server:
        server.url        # rediss://:pw@127.0.0.1:PORT/0?ssl_ca_certs=...: works anywhere
        server.tls_env()  # LABCTL_REDIS_URL without the parameters, LABCTL_REDIS_TLS_*
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


class CertificateAuthority:
    """A CA for tests, made with the ``openssl`` command in ``directory`` (EC keys, valid two
    days): ``issue()`` signs server and client certificates with it."""

    def __init__(self, directory: Path, name: str = "labctl test CA"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = self.directory / "ca.crt", self.directory / "ca.key"
        self._openssl("req", "-x509", "-new", *self._ec_key(self.key), "-days", "2",
                      "-subj", f"/CN={name}", "-out", str(self.cert),
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
              client: bool = False) -> tuple[Path, Path]:
        """``(certificate, key)`` for ``name``: a server certificate naming ``hosts`` (IP
        addresses and DNS names), or with ``client`` a client certificate."""
        cert, key = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        csr, ext = self.directory / f"{name}.csr", self.directory / f"{name}.ext"
        self._openssl("req", "-new", *self._ec_key(key), "-subj", f"/CN={name}",
                      "-out", str(csr))
        lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
        if client:
            lines.append("extendedKeyUsage=clientAuth")
        else:
            names = [f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}"
                     for h in hosts]
            lines += ["extendedKeyUsage=serverAuth", f"subjectAltName={','.join(names)}"]
        ext.write_text("\n".join(lines) + "\n")
        self._openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert),
                      "-CAkey", str(self.key), "-CAcreateserial", "-days", "2",
                      "-extfile", str(ext), "-out", str(cert))
        return cert, key

    @staticmethod
    def _ec_key(path: Path) -> list[str]:
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(path)]

    def _openssl(self, *args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=self.directory, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class RedisTLS:
    """How a :class:`RedisServer` serves TLS: its certificate and key, the CA its clients
    verify it with (and it verifies client certificates with), whether clients must present
    one (``auth_clients``: ``no``, ``optional``, ``yes``), and the client certificate this
    helper's own clients present."""

    ca: Path
    cert: Path
    key: Path
    auth_clients: str = "no"
    client_cert: Path | None = None
    client_key: Path | None = None

    @classmethod
    def issued_by(cls, ca: CertificateAuthority, *, auth_clients: str = "no",
                  hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> RedisTLS:
        cert, key = ca.issue("redis-server", hosts=hosts)
        client_cert = client_key = None
        if auth_clients != "no":
            client_cert, client_key = ca.issue("labctl-client", client=True)
        return cls(ca.cert, cert, key, auth_clients, client_cert, client_key)

    def url_params(self) -> dict[str, str]:
        params = {"ssl_ca_certs": str(self.ca)}
        if self.client_cert:
            params.update(ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key))
        return params

    def env(self) -> dict[str, str]:
        env = {"LABCTL_REDIS_TLS_CA": str(self.ca)}
        if self.client_cert:
            env.update(LABCTL_REDIS_TLS_CERT=str(self.client_cert),
                       LABCTL_REDIS_TLS_KEY=str(self.client_key))
        return env


def spawned_children(parent_pid: int) -> list[int]:
    """Pids of the processes ``parent_pid`` started with multiprocessing's spawn (the ranks
    of a data-parallel job), from /proc (Linux); its resource tracker is left out."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces and parentheses: the ppid follows the last ")".
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == parent_pid and "spawn_main" in command:
            pids.append(int(entry.name))
    return sorted(pids)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_all(workers: list[WorkerProcess]) -> None:
    """Stop several workers at once: their warm shutdowns overlap instead of adding up."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.stop()


class RedisServer:
    """A ``redis-server`` on a free port, data in ``directory``; ``restart()`` keeps the port
    and (with ``appendonly``) the data, like a crashed or redeployed Redis.

    With ``tls`` it speaks TLS only, on ``port`` (no plain port at all)."""

    def __init__(self, directory: Path, *, port: int | None = None, appendonly: bool = True,
                 password: str | None = None, tls: RedisTLS | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen | None = None

    @property
    def bare_url(self) -> str:
        """The URL without TLS parameters (a TLS client then needs ``LABCTL_REDIS_TLS_*``)."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    @property
    def url(self) -> str:
        """A URL any client can use as it is: over TLS, it names the CA (and client
        certificate) in its ``ssl_*`` parameters."""
        if self.tls is None:
            return self.bare_url
        return f"{self.bare_url}?{urlencode(self.tls.url_params(), safe='/')}"

    def tls_env(self) -> dict[str, str]:
        """``LABCTL_REDIS_URL`` and the ``LABCTL_REDIS_TLS_*`` settings, as a deployment sets
        them (for a plain server: the URL alone)."""
        return {"LABCTL_REDIS_URL": self.bare_url, **(self.tls.env() if self.tls else {})}

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, **options)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always" if self.appendonly else "no",
                "--protected-mode", "no", "--loglevel", "warning",
                "--logfile", str(self.directory / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            # TLS only: --port 0 closes the plain port, the TLS one takes its number.
            args[args.index("--port") + 1] = "0"
            args += ["--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", self.tls.auth_clients]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(self._pings, timeout, what=f"redis-server on port {self.port}")
        return self

    def _pings(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: "
                               f"{self.log_text()[-2000:]}")
        try:
            return bool(self.client(socket_timeout=0.5, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: Redis flushes its append-only file first)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()

    def log_text(self) -> str:
        try:
            return (self.directory / "redis.log").read_text()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess:
    """``labctl worker`` in a subprocess (the job runs in a thread of this very process, so
    ``kill()`` is a SIGKILL of the job too). Output goes to ``log_path``."""

    def __init__(self, redis_url: str, log_path: Path, *, name: str = "w1",
                 queues: str = "cpu,gpu", env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None):
        self.redis_url, self.log_path = redis_url, Path(log_path)
        self.name, self.queues = name, queues
        self.env = env or {}
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    @property
    def hostname(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def start(self) -> WorkerProcess:
        env = {**os.environ, "LABCTL_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1",
               # two workers on two cores: one BLAS thread each, no oversubscription
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               **self.env}
        args = [sys.executable, "-m", "labctl.cli.main", "worker", "--queues", self.queues,
                "--hostname", f"{self.name}@%h", "--loglevel", "info", *self.extra_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(args, cwd=self.log_path.parent, env=env, stdout=log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"worker {self.name} exited:\n{self.log_text()[-3000:]}")
            return " ready." in self.log_text()

        wait_for(ready, timeout, interval=0.1, what=f"worker {self.name} to be ready")
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no handback, exactly like an OOM kill or a lost machine."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()

    def terminate(self) -> None:
        """Send SIGTERM (warm shutdown: a running job is handed back) without waiting."""
        if self.alive():
            self.process.terminate()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL of the whole group if it lingers."""
        if self.process is None:
            return
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group we created, and only it
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> WorkerProcess:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:  # __exit__ does not run when __enter__ raises
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
