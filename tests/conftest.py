"""Fixtures shared across the suite. Process helpers live in ``labctl.shared.testing``.

Integration fixtures start a private ``redis-server`` on a free port (never the shared one
on 6379) and skip the test when ``redis-server`` is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from labctl.shared.settings import get_settings
from labctl.shared.testing import RedisServer, redis_server_available


@pytest.fixture(autouse=True)
def _reset_labctl_environment(monkeypatch: pytest.MonkeyPatch,
                              tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test starts from no ``LABCTL_*`` variable and no ``.env`` (settings read ``.env``
    from the working directory, so the test runs in an empty one), like Flask's
    ``_reset_os_environ``: a developer's own settings can neither break nor pass a test."""
    for key in [key for key in os.environ if key.startswith("LABCTL_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _start_redis(directory: Path, **options) -> RedisServer:
    if not redis_server_available():
        pytest.skip("redis-server is not installed")
    return RedisServer(directory, **options).start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (append-only, in tmp_path) for one test."""
    server = _start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server shared by one test module (e.g. with long-lived workers)."""
    server = _start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def labctl_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Point this process' labctl settings somewhere: ``labctl_env(redis_url=..., ...)``.

    Sets ``LABCTL_<NAME>`` for each keyword, defaults the artefact and data dirs into
    tmp_path, and clears the cached settings before and after the test.
    """

    def configure(**values: object) -> dict[str, str]:
        env = {"LABCTL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
               "LABCTL_DATA_DIR": str(tmp_path / "data")}
        env.update({f"LABCTL_{key.upper()}": str(value) for key, value in values.items()})
        Path(env["LABCTL_DATA_DIR"]).mkdir(parents=True, exist_ok=True)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        return env

    get_settings.cache_clear()
    yield configure
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run a module's torch work on one thread. On a shared 2-core runner two OpenMP threads
    that wait on each other are slowed many times over by any neighbour; one thread is
    steady, and results are only bitwise reproducible for a fixed thread count anyway."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
