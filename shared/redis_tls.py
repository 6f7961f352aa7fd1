"""Redis over TLS: one set of TLS options for every client labctl opens.

A ``rediss://`` URL is reached by three libraries, each with its own idea of TLS: kombu (the
broker), Celery's result backend and redis-py (job records, the reaper, ``/metrics``). Given
the same URL they disagree: kombu falls back to an unverified connection when the URL has no
``ssl_*`` parameters, Celery's backend refuses such a URL, and kombu replaces (rather than
merges) its TLS options with the URL's. So labctl resolves the options once, here, from the
``LABCTL_REDIS_TLS_*`` settings and the URL's ``ssl_*`` parameters (the URL wins), strips
those parameters from the URL, and hands the same dict to all three
(``broker_use_ssl``, ``redis_backend_use_ssl``, ``redis.Redis(**options)``).

Verification is on unless the URL says ``ssl_cert_reqs=none``: the server's certificate must
be signed by ``LABCTL_REDIS_TLS_CA`` (or, unset, a CA the system trusts) and name the host in
the URL. :func:`tls_failure` turns a refused handshake into one line for the CLI and
``labctl worker``.

Nothing here imports redis, kombu or Celery.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from labctl.shared.settings import Settings, SettingsError, get_settings

#: URL query parameters that configure TLS (redis-py's keyword names), and the setting that
#: supplies each when the URL does not.
TLS_URL_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                  "ssl_check_hostname")
_FROM_SETTINGS = {"ssl_ca_certs": "redis_tls_ca", "ssl_certfile": "redis_tls_cert",
                  "ssl_keyfile": "redis_tls_key"}
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "cert_required": ssl.CERT_REQUIRED,
              "optional": ssl.CERT_OPTIONAL, "cert_optional": ssl.CERT_OPTIONAL,
              "none": ssl.CERT_NONE, "cert_none": ssl.CERT_NONE}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect: ``url`` without its TLS parameters, and the TLS options
    (redis-py's ``SSLConnection`` keywords) for a ``rediss://`` URL, else ``None``."""

    url: str
    tls: dict[str, Any] | None

    def client_options(self) -> dict[str, Any]:
        """Keywords for ``redis.Redis.from_url(self.url, **...)``."""
        return dict(self.tls or {})


def redis_target(url: str, settings: Settings | None = None) -> RedisTarget:
    """Resolve ``url`` (``LABCTL_REDIS_URL``) with the TLS settings.

    Raises :class:`SettingsError` (one line, no password) when TLS is asked for on a plain
    ``redis://`` URL, or a certificate or key file cannot be loaded.
    """
    settings = settings or get_settings()
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    from_url = {key: value for key, value in query if key in TLS_URL_PARAMS}
    rest = [(key, value) for key, value in query if key not in TLS_URL_PARAMS]
    from_env = {key: getattr(settings, field) for key, field in _FROM_SETTINGS.items()
                if getattr(settings, field)}
    if parts.scheme != "rediss":
        asked = [f"LABCTL_{_FROM_SETTINGS[key].upper()}" for key in from_env]
        asked += [f"{key}= in LABCTL_REDIS_URL" for key in from_url]
        if asked:
            raise SettingsError(f"{asked[0]} asks for TLS, but LABCTL_REDIS_URL is "
                                f"{parts.scheme}://, not rediss://: the connection would "
                                "not be encrypted")
        return RedisTarget(url, None)

    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED, **from_env}
    for key, value in from_url.items():
        if key == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise SettingsError("LABCTL_REDIS_URL: ssl_cert_reqs must be required, "
                                    f"optional or none (got {value!r})")
            options[key] = _CERT_REQS[value.lower()]
        elif key == "ssl_check_hostname":
            if value.lower() not in _BOOLS:
                raise SettingsError("LABCTL_REDIS_URL: ssl_check_hostname must be true or "
                                    f"false (got {value!r})")
            options[key] = _BOOLS[value.lower()]
        elif value:
            options[key] = value
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise SettingsError("LABCTL_REDIS_TLS_KEY is set without LABCTL_REDIS_TLS_CERT: a "
                            "client key needs its certificate")
    _check_files(options.get("ssl_ca_certs"), options.get("ssl_certfile"),
                 options.get("ssl_keyfile"), *_stamps(options),
                 names=tuple(_source(key, from_url) for key in _FROM_SETTINGS))
    bare = urlunsplit(parts._replace(query=urlencode(rest)))
    return RedisTarget(bare, options)


def _source(key: str, from_url: dict[str, str]) -> str:
    return f"LABCTL_REDIS_URL's {key}" if key in from_url else \
        f"LABCTL_{_FROM_SETTINGS[key].upper()}"


def _stamps(options: dict[str, Any]) -> tuple[float | None, ...]:
    """Modification times, so a file replaced on disk is checked again."""
    stamps = []
    for key in _FROM_SETTINGS:
        try:
            stamps.append(os.stat(options[key]).st_mtime if key in options else None)
        except OSError:
            stamps.append(None)
    return tuple(stamps)


@lru_cache(maxsize=16)
def _check_files(ca: str | None, cert: str | None, key: str | None, *_stamps: float | None,
                 names: tuple[str, str, str]) -> None:
    """Load the files as the connection will, so a wrong path or a file that is not PEM is
    one line naming its setting (exit 2) rather than a failed handshake later."""
    ca_name, cert_name, _ = names
    context = ssl.create_default_context()
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"{ca_name}: cannot load {ca} as CA certificates: "
                                f"{_why(exc)}") from None
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            what = f"{cert} and {key}" if key else cert
            raise SettingsError(f"{cert_name}: cannot load {what} as a client certificate "
                                f"and key: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).replace("_", " ").lower()
    return exc.strerror or str(exc)


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def tls_failure(exc: BaseException) -> str | None:
    """One line saying why a TLS handshake failed, if that is what ``exc`` (a redis or kombu
    error, or anything wrapping one) comes from; ``None`` for any other failure.

    The wording completes "Redis at host:port ...". A handshake that times out is left to
    the caller: it looks like an unreachable host, and may be one.
    """
    for error in _chain(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            reason = (error.verify_message or error.reason or "").rstrip(".")
            if "mismatch" in reason.lower():
                return (f"sent a TLS certificate that does not name this host ({reason}); "
                        "use a host name the certificate lists in LABCTL_REDIS_URL")
            return (f"sent a TLS certificate that was refused ({reason}); is "
                    "LABCTL_REDIS_TLS_CA the CA that signed it?")
        if isinstance(error, ssl.SSLEOFError) or (
                isinstance(error, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(error)):
            return ("closed the TLS connection during the handshake; does it require a client "
                    "certificate (LABCTL_REDIS_TLS_CERT and LABCTL_REDIS_TLS_KEY)?")
        if isinstance(error, ssl.SSLError):
            return f"refused the TLS handshake ({_why(error)})"
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:  # the chain was lost on the way (kombu rewraps)
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0]
        return (f"sent a TLS certificate that was refused ({reason.strip().rstrip('.')}); "
                "is LABCTL_REDIS_TLS_CA the CA that signed it?")
    return None


def tls_mismatch_hint(exc: BaseException, url: str) -> str | None:
    """When a failure looks like one side speaking TLS and the other not, say so (the rest
    of "Redis at host:port ..."): a ``redis://`` URL to a TLS-only Redis is reset as soon
    as it writes, a ``rediss://`` URL to a plain Redis waits for a handshake that never
    comes. ``None`` otherwise; these stay "unreachable", so ``labctl worker`` waits."""
    scheme = urlsplit(url).scheme
    errors = list(_chain(exc))
    if scheme == "redis" and any(isinstance(e, ConnectionResetError) for e in errors):
        return ("closed the connection; if it speaks TLS only, LABCTL_REDIS_URL must "
                "start with rediss://")
    if scheme == "rediss" and any("handshake operation timed out" in str(e) for e in errors):
        return ("did not answer the TLS handshake; does it speak TLS on this port, and is "
                "it reachable?")
    return None
