"""Settings from ``cmi.toml`` and ``CMI_*`` environment variables (``cmi_sdk.config``)."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from cmi_sdk import (
    Adapter,
    ConfigurationError,
    DestinationNotAllowedError,
    RetrySchedule,
    TermsPolicy,
)
from cmi_sdk._delivery import DEFAULT_CONCURRENCY
from cmi_sdk.config import CONFIG_FILE, Settings
from cmi_sdk.signing import DocumentSigner, generate_development_keys
from cmi_sdk.webhooks import public_key_for

LOOPBACK = "http://127.0.0.1:9/inbox"


def write_config(directory: Path, text: str) -> Path:
    path = directory / CONFIG_FILE
    path.write_text(text, encoding="utf-8")
    return path


# -- loading -----------------------------------------------------------------------------


def test_nothing_configured_gives_the_defaults(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, directory=tmp_path)
    assert settings == Settings()
    assert settings.database_url == "sqlite:///./cmi.db"
    assert settings.allow_loopback is False
    assert settings.allow_private is False
    assert settings.signing_key is None
    assert settings.signing_cert is None
    assert settings.firm == "firm.example"
    assert settings.webhook_ed25519_key is None
    assert settings.delivery_concurrency == DEFAULT_CONCURRENCY == 512
    assert settings.per_destination == 1
    assert settings.lease_seconds == 60.0
    assert settings.http_timeout == 10.0
    assert settings.retry_schedule == RetrySchedule().delays
    assert settings.policy == TermsPolicy()


def test_the_working_directory_is_read_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, 'firm = "delta.com"\n')
    monkeypatch.chdir(tmp_path)
    assert Settings.load(environ={}).firm == "delta.com"


def test_cmi_toml_is_read(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        f"""
database_url = "sqlite:///{tmp_path}/firm.db"
allow_loopback = true
firm = "delta.com"
retry_schedule = [1, 2]
delivery_concurrency = 8
lease_seconds = 30
http_timeout = 2.5
signing_key = "keys/key.pem"
signing_cert = "keys/cert.pem"

[policy]
purposes = ["records"]
max_digest_hours = 24
""",
    )
    settings = Settings.load(environ={}, directory=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path}/firm.db"
    assert settings.allow_loopback is True
    assert settings.firm == "delta.com"
    assert settings.retry_schedule == (1.0, 2.0)
    assert settings.delivery_concurrency == 8
    assert settings.lease_seconds == 30.0
    assert settings.http_timeout == 2.5
    assert settings.signing_key == Path("keys/key.pem")
    assert settings.signing_cert == Path("keys/cert.pem")
    assert isinstance(settings.policy, TermsPolicy)
    assert settings.policy.purposes == ("records",)
    assert settings.policy.max_digest_hours == 24
    assert settings.policy.min_digest_hours == 1


def test_environment_variables_win_over_the_file(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        'allow_loopback = true\nfirm = "delta.com"\nretry_schedule = [1, 2]\n'
        '[policy]\npurposes = ["records"]\n',
    )
    environ = {
        "CMI_ALLOW_LOOPBACK": "0",
        "CMI_FIRM": "united.com",
        "CMI_RETRY_SCHEDULE": "5, 300,1800",
        "CMI_DELIVERY_CONCURRENCY": "16",
        "CMI_PER_DESTINATION": "1",
        "CMI_LEASE_SECONDS": "90",
        "CMI_HTTP_TIMEOUT": "3",
        "CMI_ALLOW_PRIVATE": "yes",
        "CMI_DATABASE_URL": "sqlite:////srv/cmi.db",
        # Not a setting: ignored, as is CMI_POLICY (the policy lives in the file only).
        "CMI_COLOUR": "blue",
        "CMI_POLICY": "anything",
    }
    settings = Settings.load(environ=environ, directory=tmp_path)
    assert settings.allow_loopback is False
    assert settings.firm == "united.com"
    assert settings.retry_schedule == (5.0, 300.0, 1800.0)
    assert settings.delivery_concurrency == 16
    assert settings.per_destination == 1
    assert settings.lease_seconds == 90.0
    assert settings.http_timeout == 3.0
    assert settings.allow_private is True
    assert settings.database_url == "sqlite:////srv/cmi.db"
    assert settings.policy.purposes == ("records",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("Yes", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_booleans_in_the_environment(tmp_path: Path, text: str, *, expected: bool) -> None:
    settings = Settings.load(environ={"CMI_ALLOW_LOOPBACK": text}, directory=tmp_path)
    assert settings.allow_loopback is expected


def test_empty_optional_settings_in_the_environment_are_unset(tmp_path: Path) -> None:
    write_config(tmp_path, 'signing_key = "key.pem"\nwebhook_ed25519_key = "whsk_x"\n')
    environ = {"CMI_SIGNING_KEY": "", "CMI_WEBHOOK_ED25519_KEY": ""}
    settings = Settings.load(environ=environ, directory=tmp_path)
    assert settings.signing_key is None
    assert settings.webhook_ed25519_key is None


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CMI_DELIVERY_CONCURRENCY", "0"),
        ("CMI_DELIVERY_CONCURRENCY", "four"),
        ("CMI_DELIVERY_CONCURRENCY", "2.5"),
        ("CMI_PER_DESTINATION", "-1"),
        ("CMI_DELIVERY_CONNECTIONS", "0"),
        ("CMI_DELIVERY_CONNECTIONS", "many"),
        ("CMI_ALLOW_LOOPBACK", "maybe"),
        ("CMI_ALLOW_PRIVATE", "2"),
        ("CMI_LEASE_SECONDS", "0"),
        ("CMI_LEASE_SECONDS", "nan"),
        ("CMI_HTTP_TIMEOUT", "soon"),
        ("CMI_RETRY_SCHEDULE", "5,-1"),
        ("CMI_RETRY_SCHEDULE", "5,later"),
    ],
)
def test_a_bad_environment_value_names_the_setting(
    tmp_path: Path, variable: str, value: str
) -> None:
    setting = variable.removeprefix("CMI_").lower()
    with pytest.raises(ConfigurationError, match=setting):
        Settings.load(environ={variable: value}, directory=tmp_path)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("delivery_concurrency = 0\n", "delivery_concurrency"),
        ("delivery_connections = -5\n", "delivery_connections"),
        ('allow_loopback = "maybe"\n', "allow_loopback"),
        ("retry_schedule = 5\n", "retry_schedule"),
        ("retry_schedule = [5, -1]\n", "retry_schedule"),
        ("http_timeout = -3\n", "http_timeout"),
        ('policy = "strict"\n', "policy"),
        ("[policy]\nmin_digest_hours = 48\nmax_digest_hours = 24\n", "policy"),
        ('[policy]\ntimings = ["sometimes"]\n', "policy"),
        ('[policy]\ncolour = "blue"\n', "policy"),
        ("[policy]\ntimings = []\n", "policy"),
    ],
)
def test_a_bad_value_in_the_file_names_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    write_config(tmp_path, text)
    with pytest.raises(ConfigurationError, match=f"setting {setting}"):
        Settings.load(environ={}, directory=tmp_path)


def test_an_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'firm = "delta.com"\ncolour = "blue"\nzone = 1\n')
    with pytest.raises(ConfigurationError, match="unknown settings colour, zone") as caught:
        Settings.load(environ={}, directory=tmp_path)
    assert str(path) in str(caught.value)


def test_malformed_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "firm = delta.com\n")
    with pytest.raises(ConfigurationError) as caught:
        Settings.load(environ={}, directory=tmp_path)
    assert str(path) in str(caught.value)


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(b'firm = "\xff"\n')
    with pytest.raises(ConfigurationError, match=CONFIG_FILE):
        Settings.load(environ={}, directory=tmp_path)


def test_a_bad_environment_value_is_refused_even_when_the_file_is_fine(tmp_path: Path) -> None:
    write_config(tmp_path, "delivery_concurrency = 2\n")
    with pytest.raises(ConfigurationError, match="delivery_concurrency"):
        Settings.load(environ={"CMI_DELIVERY_CONCURRENCY": "0"}, directory=tmp_path)


# -- the signer --------------------------------------------------------------------------


def test_no_signing_key_means_no_signer() -> None:
    assert Settings().signer() is None


@pytest.mark.parametrize("which", ["key", "cert"])
def test_half_a_signing_key_is_refused(tmp_path: Path, which: str) -> None:
    key, cert = generate_development_keys(tmp_path)
    settings = Settings(signing_key=key) if which == "key" else Settings(signing_cert=cert)
    with pytest.raises(ConfigurationError, match="CMI_SIGNING_KEY and CMI_SIGNING_CERT"):
        settings.signer()
    with pytest.raises(ConfigurationError):
        settings.adapter()


def test_half_a_signing_key_from_the_environment_is_refused(tmp_path: Path) -> None:
    key, _ = generate_development_keys(tmp_path)
    settings = Settings.load(environ={"CMI_SIGNING_KEY": str(key)}, directory=tmp_path)
    with pytest.raises(ConfigurationError, match="CMI_SIGNING_CERT"):
        settings.adapter()


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    settings = Settings(signing_key=tmp_path / "key.pem", signing_cert=tmp_path / "cert.pem")
    with pytest.raises(ConfigurationError, match="cannot read"):
        settings.signer()


def test_a_key_file_that_is_not_a_key_is_refused(tmp_path: Path) -> None:
    _, cert = generate_development_keys(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="cannot load"):
        Settings(signing_key=junk, signing_cert=cert).signer()


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    key, _ = generate_development_keys(tmp_path / "one")
    _, other_cert = generate_development_keys(tmp_path / "two")
    with pytest.raises(ConfigurationError, match="not the signing key's"):
        Settings(signing_key=key, signing_cert=other_cert).signer()


# -- the adapter and the worker ----------------------------------------------------------


def test_settings_build_the_adapter(tmp_path: Path) -> None:
    key_path, cert_path = generate_development_keys(tmp_path / "keys")
    ed25519_key = "whsk_" + base64.b64encode(secrets.token_bytes(32)).decode()
    write_config(
        tmp_path,
        f"""
database_url = "sqlite:///{tmp_path}/store/cmi.db"
allow_loopback = true
firm = "delta.com"
signing_key = "{key_path}"
signing_cert = "{cert_path}"
webhook_ed25519_key = "{ed25519_key}"

[policy]
purposes = ["records"]
""",
    )
    settings = Settings.load(environ={}, directory=tmp_path)
    adapter = settings.adapter()
    assert isinstance(adapter, Adapter)
    assert adapter.firm == "delta.com"
    signer = adapter.signer
    assert isinstance(signer, DocumentSigner)
    assert signer.certificate.public_bytes(serialization.Encoding.PEM) == cert_path.read_bytes()
    assert adapter.egress.allow_loopback is True
    assert adapter.egress.check_url(LOOPBACK) == LOOPBACK
    assert adapter.policy.purposes == ("records",)
    assert adapter.webhook_ed25519_key == ed25519_key
    assert public_key_for(ed25519_key).startswith("whpk_")
    store = adapter.store
    try:
        assert store.path == tmp_path / "store" / "cmi.db"  # type: ignore[attr-defined]
        assert store.path.is_file()  # type: ignore[attr-defined]
    finally:
        store.close()  # type: ignore[attr-defined]


def test_the_default_adapter_refuses_loopback_and_opens_no_store(tmp_path: Path) -> None:
    adapter = Settings.load(environ={}, directory=tmp_path).adapter()
    assert adapter.signer is None
    assert adapter.database_url == "sqlite:///./cmi.db"
    with pytest.raises(DestinationNotAllowedError):
        adapter.egress.check_url(LOOPBACK)


def test_adapter_options_override_the_settings(tmp_path: Path) -> None:
    policy = TermsPolicy(timings=("pull",))
    adapter = Settings(firm="delta.com", allow_loopback=True).adapter(
        firm="united.com", policy=policy, database_url=f"sqlite:///{tmp_path}/other.db"
    )
    assert adapter.firm == "united.com"
    assert adapter.policy.timings == ("pull",)
    assert adapter.database_url == f"sqlite:///{tmp_path}/other.db"
    assert adapter.egress.allow_loopback is True


def test_worker_options_reflect_the_settings() -> None:
    settings = Settings(
        delivery_concurrency=8,
        delivery_connections=40,
        per_destination=3,
        lease_seconds=45.0,
        retry_schedule=(1.0, 2.0),
        http_timeout=2.0,
    )
    options = settings.worker_options()
    assert options["concurrency"] == 8
    assert options["max_connections"] == 40
    assert Settings().worker_options()["max_connections"] is None  # the descriptor limit's
    assert options["per_destination"] == 3
    assert options["lease_seconds"] == 45.0
    assert isinstance(options["schedule"], RetrySchedule)
    assert options["schedule"].delays == (1.0, 2.0)
    timeout = options["timeout"]
    assert timeout.read == timeout.write == timeout.pool == 2.0
    # The connect timeout is capped at 5 s, and never above the overall one.
    assert timeout.connect == 2.0
    assert Settings(http_timeout=30.0).worker_options()["timeout"].connect == 5.0


def test_worker_options_build_a_worker(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/cmi.db", delivery_concurrency=2)
    adapter = settings.adapter()
    try:
        worker = adapter.delivery_worker(**settings.worker_options())
        assert worker is not None
    finally:
        adapter.store.close()  # type: ignore[attr-defined]


# -- bugs --------------------------------------------------------------------------------


def test_a_signer_option_overrides_a_broken_signing_setting(tmp_path: Path) -> None:
    settings = Settings(signing_key=tmp_path / "missing.pem")
    adapter = settings.adapter(signer=None)
    assert adapter.signer is None


def test_a_nan_retry_delay_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="retry_schedule"):
        Settings.load(environ={"CMI_RETRY_SCHEDULE": "5,nan"}, directory=tmp_path)


def test_an_infinite_lease_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="lease_seconds"):
        Settings.load(environ={"CMI_LEASE_SECONDS": "inf"}, directory=tmp_path)


@pytest.mark.parametrize("value", ["2.5", "true"])
def test_a_count_in_the_file_must_be_an_integer(tmp_path: Path, value: str) -> None:
    write_config(tmp_path, f"delivery_concurrency = {value}\n")
    with pytest.raises(ConfigurationError, match="delivery_concurrency"):
        Settings.load(environ={}, directory=tmp_path)
