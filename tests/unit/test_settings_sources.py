"""Configuration on pydantic-settings: the environment over cmi.toml, and every refusal
names the setting, where its value came from (the variable, or the key in the file), and
why."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from cmi_sdk import ConfigurationError
from cmi_sdk.config import CONFIG_FILE, Settings


def test_the_settings_are_pydantic_settings() -> None:
    assert issubclass(Settings, BaseSettings)
    assert Settings.model_config["env_prefix"] == "CMI_"


def test_a_bad_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={"CMI_DELIVERY_CONCURRENCY": "0"}, directory=tmp_path)
    message = str(info.value)
    assert "setting delivery_concurrency (CMI_DELIVERY_CONCURRENCY)" in message
    assert "greater than or equal to 1" in message


def test_a_bad_key_in_the_file_is_named_with_the_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("http_timeout = -3\n")
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ={}, directory=tmp_path)
    assert f"setting http_timeout (http_timeout in {tmp_path / CONFIG_FILE})" in str(info.value)


def test_every_bad_setting_is_told_at_once(tmp_path: Path) -> None:
    environ = {"CMI_LEASE_SECONDS": "soon", "CMI_ALLOW_PRIVATE": "maybe"}
    with pytest.raises(ConfigurationError) as info:
        Settings.load(environ=environ, directory=tmp_path)
    assert "CMI_LEASE_SECONDS" in str(info.value)
    assert "CMI_ALLOW_PRIVATE" in str(info.value)


def test_a_policy_error_names_the_field_inside_it(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text('[policy]\ntimings = ["sometimes"]\n')
    with pytest.raises(ConfigurationError, match=r"setting policy \(policy in .*\): timings"):
        Settings.load(environ={}, directory=tmp_path)


def test_the_environment_wins_and_lists_are_comma_separated(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text('firm = "file.example"\nretry_schedule = [1, 2]\n')
    environ = {
        "CMI_FIRM": "env.example",
        "CMI_RETRY_SCHEDULE": "5, 300,1800",
        "CMI_TRANSACTION_KINDS": "flight,loan",
        "cmi_allow_loopback": "yes",  # names are matched without regard to case
    }
    settings = Settings.load(environ=environ, directory=tmp_path)
    assert settings.firm == "env.example"
    assert settings.retry_schedule == (5.0, 300.0, 1800.0)
    assert settings.transaction_kinds == ("flight", "loan")
    assert settings.allow_loopback is True


def test_constructed_settings_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMI_FIRM", "env.example")
    assert Settings().firm == "firm.example"
    assert Settings(firm="given.example").firm == "given.example"


def test_the_policy_is_never_read_from_the_environment(tmp_path: Path) -> None:
    settings = Settings.load(environ={"CMI_POLICY": "strict"}, directory=tmp_path)
    assert settings.policy == Settings().policy
