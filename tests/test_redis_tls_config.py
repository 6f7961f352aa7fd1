"""How a ``rediss://`` URL and the ``LABCTL_REDIS_TLS_*`` settings become one set of TLS
options for every client, and how URLs are shown. No server: the real handshakes are in
test_tls.py."""

from __future__ import annotations

import ssl

import pytest
import redis

from labctl.shared.celery_config import sender_app
from labctl.shared.redis_tls import redis_target, tls_failure
from labctl.shared.settings import Settings, SettingsError, redact_url
from labctl.shared.testing import CertificateAuthority, openssl_available
from labctl.worker.app import make_app

needs_openssl = pytest.mark.skipif(not openssl_available(), reason="openssl not installed")


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CertificateAuthority:
    if not openssl_available():
        pytest.skip("openssl not installed")
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize(("url", "shown"), [
    ("rediss://:s3cret@redis.lab:6380/0", "rediss://:***@redis.lab:6380/0"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("rediss://worker:s3cret@[::1]:6380/1", "rediss://worker:***@[::1]:6380/1"),
    ("rediss://:s3cret@h:6380/0?ssl_ca_certs=/certs/ca.crt&ssl_keyfile=/certs/w.key",
     "rediss://:***@h:6380/0?ssl_ca_certs=/certs/ca.crt&ssl_keyfile=/certs/w.key"),
    ("rediss://h:6380/0?password=s3cret&ssl_password=s3cret&db=1",
     "rediss://h:6380/0?password=***&ssl_password=***&db=1"),
    ("redis://:s3cret@127.0.0.1:63x79/0", "redis://:***@127.0.0.1:63x79/0"),  # bad port
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_redact_url_hides_passwords_in_any_scheme_and_query(url, shown):
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_a_plain_url_has_no_tls_and_stays_as_it_is():
    target = redis_target("redis://:pw@h:6379/0?socket_timeout=3", Settings())
    assert target.tls is None and target.url == "redis://:pw@h:6379/0?socket_timeout=3"
    assert target.client_options() == {}


def test_rediss_verifies_the_certificate_by_default():
    # kombu alone would connect without checking anything (CERT_NONE) for this URL.
    target = redis_target("rediss://:pw@redis.lab:6380/0", Settings())
    assert target.tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert target.url == "rediss://:pw@redis.lab:6380/0"


def test_settings_supply_the_files_and_url_parameters_win_and_are_stripped(ca, tmp_path):
    client_cert, client_key = ca.issue("worker", client=True)
    other = CertificateAuthority(tmp_path / "other")
    settings = Settings(redis_tls_ca=str(ca.cert), redis_tls_cert=str(client_cert),
                        redis_tls_key=str(client_key))
    target = redis_target("rediss://:pw@h:6380/0", settings)
    assert target.tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca.cert),
                          "ssl_certfile": str(client_cert), "ssl_keyfile": str(client_key)}
    url = (f"rediss://:pw@h:6380/0?ssl_ca_certs={other.cert}&db=2&ssl_check_hostname=false"
           "&ssl_cert_reqs=required")
    target = redis_target(url, settings)
    assert target.tls["ssl_ca_certs"] == str(other.cert)  # the URL's, not the setting's
    assert target.tls["ssl_certfile"] == str(client_cert)  # merged, not replaced
    assert target.tls["ssl_check_hostname"] is False
    assert target.url == "rediss://:pw@h:6380/0?db=2"


def test_ssl_cert_reqs_none_is_honoured_when_asked_for():
    target = redis_target("rediss://h:6380/0?ssl_cert_reqs=none", Settings())
    assert target.tls["ssl_cert_reqs"] == ssl.CERT_NONE


@pytest.mark.parametrize(("url", "settings", "message"), [
    ("redis://h:6379/0", {"redis_tls_ca": "/certs/ca.crt"},
     "LABCTL_REDIS_TLS_CA asks for TLS, but LABCTL_REDIS_URL is redis://, not rediss://"),
    ("redis://h:6379/0?ssl_ca_certs=/certs/ca.crt", {},
     "ssl_ca_certs= in LABCTL_REDIS_URL asks for TLS, but LABCTL_REDIS_URL is redis://"),
    ("rediss://h:6380/0?ssl_cert_reqs=maybe", {},
     "LABCTL_REDIS_URL: ssl_cert_reqs must be required, optional or none"),
    ("rediss://h:6380/0", {"redis_tls_key": "/certs/w.key"},
     "LABCTL_REDIS_TLS_KEY is set without LABCTL_REDIS_TLS_CERT"),
    ("rediss://h:6380/0", {"redis_tls_ca": "/nonexistent/ca.crt"},
     "LABCTL_REDIS_TLS_CA: cannot load /nonexistent/ca.crt as CA certificates: No such file"),
    ("rediss://h:6380/0?ssl_ca_certs=/nonexistent/ca.crt", {},
     "LABCTL_REDIS_URL's ssl_ca_certs: cannot load /nonexistent/ca.crt"),
])
def test_tls_settings_that_cannot_work_are_one_line(url, settings, message):
    with pytest.raises(SettingsError) as raised:
        redis_target(url, Settings(**settings))
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


@needs_openssl
def test_a_file_that_is_not_pem_names_its_setting(ca, tmp_path):
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match=r"^LABCTL_REDIS_TLS_CA: cannot load .*junk.crt"):
        redis_target("rediss://h:6380/0", Settings(redis_tls_ca=str(junk)))
    _, server_key = ca.issue("server-x")
    with pytest.raises(SettingsError, match=r"^LABCTL_REDIS_TLS_CERT: cannot load"):
        redis_target("rediss://h:6380/0", Settings(redis_tls_cert=str(ca.cert),
                                                   redis_tls_key=str(server_key)))


def test_an_empty_tls_variable_is_unset(monkeypatch):
    # Compose passes an unset variable through as "" (`LABCTL_REDIS_TLS_CA: ${X:-}`).
    monkeypatch.setenv("LABCTL_REDIS_TLS_CA", "")
    assert Settings().redis_tls_ca is None
    assert redis_target("redis://h:6379/0", Settings()).tls is None


def test_broker_backend_and_records_get_the_same_tls_options(ca, monkeypatch):
    from labctl.shared.settings import get_settings

    monkeypatch.setenv("LABCTL_REDIS_TLS_CA", str(ca.cert))
    get_settings.cache_clear()
    url = "rediss://:pw@redis.lab:6380/0"
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca.cert)}
    worker = make_app(url).conf
    # The worker's transport is the guarded one for rediss:// as for redis://.
    assert worker.broker_transport == "labctl.worker.app:GuardedRedisTransport"
    assert worker.broker_use_ssl == expected and worker.redis_backend_use_ssl == expected
    sender = sender_app(url).conf
    assert sender.broker_use_ssl == expected and sender.redis_backend_use_ssl == expected
    # The timeouts and retries of the plain path apply unchanged.
    assert worker.broker_transport_options["socket_timeout"] == 10.0
    assert worker.broker_transport_options["retry_on_timeout"] is True
    from labctl.shared.records import connect

    pool = connect(url).connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca.cert)
    assert pool.connection_kwargs["socket_timeout"] == 5.0


def test_plain_redis_keeps_the_guarded_transport_and_no_tls():
    conf = make_app("redis://127.0.0.1:1/0").conf
    assert conf.broker_transport == "labctl.worker.app:GuardedRedisTransport"
    assert not conf.broker_use_ssl and not conf.redis_backend_use_ssl


def test_a_tls_setting_on_a_plain_url_is_one_line_and_exit_2(monkeypatch, capsys):
    from labctl.cli.main import main
    from labctl.shared.settings import get_settings

    monkeypatch.setenv("LABCTL_REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")
    monkeypatch.setenv("LABCTL_REDIS_TLS_CA", "/certs/ca.crt")
    monkeypatch.setattr("sys.argv", ["labctl", "list"])
    get_settings.cache_clear()
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("labctl: LABCTL_REDIS_TLS_CA asks for TLS") and err.count("\n") == 1
    assert "s3cret" not in err


def test_tls_failure_reads_a_reason_kombu_kept_only_as_text():
    from kombu.exceptions import OperationalError

    text = ("Error 1 connecting to h:6380. [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
            "verify failed: self-signed certificate in certificate chain (_ssl.c:1006).")
    assert tls_failure(OperationalError(text)) == (
        "sent a TLS certificate that was refused (self-signed certificate in certificate "
        "chain); is LABCTL_REDIS_TLS_CA the CA that signed it?")
    assert tls_failure(redis.ConnectionError("Error 111 connecting to h:6380.")) is None


def test_the_tls_settings_are_documented_where_settings_are():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme, env_example = (root / "README.md").read_text(), (root / ".env.example").read_text()
    deploy = (root / "docs" / "deploy.md").read_text()
    for field in ("redis_tls_ca", "redis_tls_cert", "redis_tls_key"):
        assert field in Settings.model_fields
        name = f"LABCTL_{field.upper()}"
        assert f"`{name}`" in readme and name in env_example and f"`{name}`" in deploy
