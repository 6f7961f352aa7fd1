"""Process settings, read from ``LABCTL_*`` environment variables (and ``.env``)."""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LABCTL_", env_file=".env", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0",
                           description="Broker, results and job records.")
    artifacts_dir: str = Field("./artifacts", description="Root of every job's artefact folder.")
    data_dir: str | None = Field(None, description="Default data_root; the worker's data jail.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a running job says alive.")
    heartbeat_timeout_seconds: float = Field(30.0, gt=0, description="Silence before requeue.")
    keep_checkpoint: bool = Field(
        False, description="Keep a succeeded job's resumable checkpoint (to train it further "
                           "with run --resume --epochs N); by default only model.* stays.")
    distributed_timeout_seconds: float = Field(
        300.0, gt=0, description="How long a data-parallel rank waits on its peers in one "
        "collective before it fails (a hung peer must not hang the job).")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Worker /metrics port.")
    data_cache_max_gb: float = Field(
        32.0, gt=0, description="Decoded photos a data_path=auto job keeps in memory (and on "
        "disk) at most; a larger dataset streams from its JPEGs instead.")
    # TLS, for rediss:// URLs only (shared/redis_tls.py). The URL's ssl_* parameters win.
    redis_tls_ca: str | None = Field(None, description="CA file that signed Redis' certificate.")
    redis_tls_cert: str | None = Field(None, description="Client certificate (mutual TLS).")
    redis_tls_key: str | None = Field(None, description="The client certificate's key.")

    @field_validator("redis_tls_ca", "redis_tls_cert", "redis_tls_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `VAR: ${X:-}` as an empty string when X is not set.
        return None if isinstance(value, str) and not value.strip() else value


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


#: Query parameters whose value is a secret (``?password=`` works in redis-py URLs); paths
#: such as ``ssl_keyfile`` are not secrets and stay readable.
_SECRET_PARAMS = ("pass", "pwd", "secret", "token", "credential", "auth")


def redact_url(url: str) -> str:
    """``rediss://:secret@host:6379/0`` -> ``rediss://:***@host:6379/0``; safe to print and
    log. Any scheme; secret query parameters (``password=``, ``ssl_password=``) are masked
    too. Never raises, even on a URL nothing can parse (its port, say)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host: show nothing of it
        return "<unparsable URL>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret(key) for key, _ in pairs):
            query = urlencode([(key, "***" if _is_secret(key) else value)
                               for key, value in pairs], safe="*/")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _is_secret(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_PARAMS)


def url_host(url: str) -> str:
    """``host:port`` of a URL, for error messages."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    try:
        port = parts.port or 6379
    except ValueError:  # not a number: say so rather than fail while reporting a failure
        port = "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
