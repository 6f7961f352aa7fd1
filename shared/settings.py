"""Process settings, read from ``LABCTL_*`` environment variables (and ``.env``)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABCTL_", env_file=".env", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           description="Broker, results and job records.")
    artifacts_dir: str = Field("./artifacts", description="Root of every job's artefact folder.")
    data_dir: str | None = Field(None, description="Default data_root; the worker's data jail.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a running job says alive.")
    heartbeat_timeout_seconds: float = Field(30.0, gt=0, description="Silence before requeue.")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Worker /metrics port.")


class SettingsError(Exception):
    """A ``LABCTL_*`` setting (environment or ``.env``) is unusable. Not a ValueError, so no
    caller mistakes it for a problem with whatever value it was parsing."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors()[0]  # its message never echoes the value: it may be a password
        name = f"LABCTL_{str(error['loc'][0]).upper()}" if error["loc"] else "LABCTL_*"
        raise SettingsError(f"{name}: {error['msg']}") from None
    except (UnicodeDecodeError, OSError) as exc:  # e.g. a binary or unreadable .env file
        raise SettingsError(f"cannot read the settings file .env: {exc}") from None


def redact_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0``; safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def url_host(url: str) -> str:
    """``host:port`` of a URL, for error messages."""
    parts = urlsplit(url)
    return f"{parts.hostname or '?'}:{parts.port or 6379}"
