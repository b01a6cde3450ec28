"""Configuration: documented defaults, environment and flags, and one-line errors."""

from __future__ import annotations

import pytest

from ghostcloak_relay.config import OPTIONS, ConfigError, Settings, load_settings

DOCUMENTED_DEFAULTS = {
    "port": 8443,
    "node": ("ws://127.0.0.1:9944",),
    "host": "0.0.0.0",
    "max_sessions_per_connection": 16,
    "session_max_age": 3600,
    "cleanup_interval": 600,
    "log_interval": 60,
    "shutdown_timeout": 10,
    "log_level": "info",
    "tls_cert": None,
    "tls_key": None,
}

SECONDS_ENVS = {
    "RELAY_SESSION_MAX_AGE": "session_max_age",
    "RELAY_CLEANUP_INTERVAL": "cleanup_interval",
    "RELAY_LOG_INTERVAL": "log_interval",
    "RELAY_SHUTDOWN_TIMEOUT": "shutdown_timeout",
    "RELAY_UPSTREAM_CONNECT_TIMEOUT": "upstream_connect_timeout",
}
POSITIVE_INT_ENVS = {
    "RELAY_MAX_SESSIONS_PER_CONNECTION": "max_sessions_per_connection",
    "RELAY_MAX_QUEUED_MESSAGES": "max_queued_messages",
    "RELAY_MAX_MESSAGE_BYTES": "max_message_bytes",
}


def config_error(environ: dict[str, str], flags: dict[str, str | None] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(environ, flags)
    return str(info.value)


# -- defaults -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), sorted(DOCUMENTED_DEFAULTS.items()))
def test_defaults_from_empty_environment_are_the_documented_ones(name: str, expected: object):
    assert getattr(load_settings({}), name) == expected


@pytest.mark.parametrize(("name", "expected"), sorted(DOCUMENTED_DEFAULTS.items()))
def test_settings_dataclass_defaults_are_the_documented_ones(name: str, expected: object):
    assert getattr(Settings(), name) == expected


def test_empty_environment_gives_exactly_the_settings_defaults():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.tls_enabled is False


def test_every_option_has_a_distinct_env_variable_and_flag():
    envs = [opt.env for opt in OPTIONS]
    flags = [opt.flag for opt in OPTIONS]
    assert len(set(envs)) == len(envs)
    assert len(set(flags)) == len(flags)
    assert {"PORT", "MIDNIGHT_NODE"} <= set(envs)
    assert all(env.startswith("RELAY_") for env in envs if env not in ("PORT", "MIDNIGHT_NODE"))


def test_unrelated_environment_variables_are_ignored():
    assert load_settings({"HOME": "/root", "RELAY": "x", "port": "1"}) == Settings()


# -- environment parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "raw", "name", "expected"),
    [
        ("PORT", "9000", "port", 9000),
        ("PORT", "0", "port", 0),  # 0 picks a free port
        ("PORT", "65535", "port", 65535),
        ("PORT", " 8080 ", "port", 8080),
        ("RELAY_HOST", "127.0.0.1", "host", "127.0.0.1"),
        ("RELAY_HOST", "::1", "host", "::1"),
        ("MIDNIGHT_NODE", "wss://node.example:443/ws", "node", ("wss://node.example:443/ws",)),
        ("RELAY_MAX_SESSIONS_PER_CONNECTION", "3", "max_sessions_per_connection", 3),
        ("RELAY_MAX_QUEUED_MESSAGES", "5", "max_queued_messages", 5),
        ("RELAY_MAX_MESSAGE_BYTES", "1024", "max_message_bytes", 1024),
        ("RELAY_SESSION_MAX_AGE", "120", "session_max_age", 120.0),
        ("RELAY_CLEANUP_INTERVAL", "30", "cleanup_interval", 30.0),
        ("RELAY_LOG_INTERVAL", "5", "log_interval", 5.0),
        ("RELAY_SHUTDOWN_TIMEOUT", "2", "shutdown_timeout", 2.0),
        ("RELAY_UPSTREAM_CONNECT_TIMEOUT", "3", "upstream_connect_timeout", 3.0),
        ("RELAY_LOG_LEVEL", "debug", "log_level", "debug"),
        ("RELAY_LOG_LEVEL", "WARNING", "log_level", "warning"),
        ("RELAY_LOG_LEVEL", "error", "log_level", "error"),
    ],
)
def test_environment_value_is_parsed(env: str, raw: str, name: str, expected: object):
    settings = load_settings({env: raw})
    assert getattr(settings, name) == expected
    assert type(getattr(settings, name)) is type(expected)


def test_environment_changes_only_the_named_option():
    settings = load_settings({"PORT": "9000"})
    assert settings.port == 9000
    assert settings == Settings(port=9000)


@pytest.mark.parametrize("env", sorted(SECONDS_ENVS))
@pytest.mark.parametrize(("raw", "expected"), [("0.5", 0.5), ("1", 1.0), ("0.001", 0.001)])
def test_fractional_and_whole_durations_are_accepted(env: str, raw: str, expected: float):
    assert getattr(load_settings({env: raw}), SECONDS_ENVS[env]) == expected


def test_tls_cert_and_key_together_enable_tls():
    settings = load_settings(
        {"RELAY_TLS_CERT": "/etc/relay/cert.pem", "RELAY_TLS_KEY": "/etc/relay/key.pem"}
    )
    assert settings.tls_cert == "/etc/relay/cert.pem"
    assert settings.tls_key == "/etc/relay/key.pem"
    assert settings.tls_enabled is True


# -- node list ----------------------------------------------------------------------------


def test_comma_separated_node_list_becomes_a_tuple_in_order():
    settings = load_settings(
        {"MIDNIGHT_NODE": "ws://10.0.0.1:9944, wss://node.example/rpc ,ws://[::1]:9944"}
    )
    assert settings.node == ("ws://10.0.0.1:9944", "wss://node.example/rpc", "ws://[::1]:9944")
    assert isinstance(settings.node, tuple)


def test_empty_entries_in_node_list_are_dropped():
    settings = load_settings({"MIDNIGHT_NODE": "ws://a.example:1,,ws://b.example:2,"})
    assert settings.node == ("ws://a.example:1", "ws://b.example:2")


def test_single_node_is_a_one_element_tuple():
    assert load_settings({"MIDNIGHT_NODE": "ws://node:9944"}).node == ("ws://node:9944",)


# -- flags --------------------------------------------------------------------------------


def test_flag_wins_over_environment():
    settings = load_settings(
        {"PORT": "8000", "RELAY_LOG_LEVEL": "debug", "MIDNIGHT_NODE": "ws://env:1"},
        {"port": "9000", "log_level": "error", "node": "ws://flag:2,ws://flag:3"},
    )
    assert settings.port == 9000
    assert settings.log_level == "error"
    assert settings.node == ("ws://flag:2", "ws://flag:3")


def test_flag_given_as_none_falls_back_to_environment_then_default():
    settings = load_settings({"PORT": "8000"}, {"port": None, "host": None})
    assert settings.port == 8000
    assert settings.host == "0.0.0.0"


def test_flag_without_environment_is_used():
    assert load_settings({}, {"session_max_age": "0.25"}).session_max_age == 0.25


def test_valid_flag_overrides_invalid_environment_value():
    assert load_settings({"PORT": "abc"}, {"port": "9000"}).port == 9000


def test_invalid_flag_error_names_variable_flag_and_value():
    message = config_error({"PORT": "8000"}, {"port": "99999"})
    assert "\n" not in message
    assert "PORT" in message
    assert "--port" in message
    assert "99999" in message
    assert "65535" in message


# -- errors -------------------------------------------------------------------------------

INVALID = (
    [
        # (env, raw value, a fragment of what is allowed)
        ("PORT", "70000", "0-65535"),
        ("PORT", "65536", "0-65535"),
        ("PORT", "-1", "0-65535"),
        ("PORT", "abc", "0-65535"),
        ("PORT", "80.5", "0-65535"),
        ("PORT", "", "0-65535"),
        ("RELAY_HOST", "", "address"),
        ("RELAY_HOST", "   ", "address"),
        ("MIDNIGHT_NODE", "http://127.0.0.1:9944", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "https://node.example", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "127.0.0.1:9944", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "ws://", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "ws://node:notaport", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "ws://node:99999", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "ws://good:1,http://bad:2", "ws:// or wss://"),
        ("MIDNIGHT_NODE", "", "ws:// or wss://"),
        ("MIDNIGHT_NODE", " , ,", "ws:// or wss://"),
        ("RELAY_LOG_LEVEL", "verbose", "debug, info, warning, error"),
        ("RELAY_LOG_LEVEL", "trace", "debug, info, warning, error"),
        ("RELAY_LOG_LEVEL", "", "debug, info, warning, error"),
        ("RELAY_TLS_CERT", "", "path"),
    ]
    + [
        (env, raw, "above zero")
        for env in sorted(POSITIVE_INT_ENVS)
        for raw in ("0", "-1", "abc", "1.5", "")
    ]
    + [
        (env, raw, "above zero")
        for env in sorted(SECONDS_ENVS)
        for raw in ("0", "0.0", "-1", "-0.5", "abc", "nan", "NaN", "inf", "-inf", "infinity", "")
    ]
)


@pytest.mark.parametrize(("env", "raw", "allowed"), INVALID)
def test_invalid_value_raises_one_line_error_naming_variable_value_and_rule(
    env: str, raw: str, allowed: str
):
    message = config_error({env: raw})
    assert "\n" not in message
    assert "\r" not in message
    assert env in message
    assert repr(raw) in message
    assert allowed in message


def test_error_value_with_newline_still_gives_one_line():
    message = config_error({"PORT": "8443\ninjected"})
    assert "\n" not in message
    assert "PORT" in message
    assert "injected" in message


def test_error_for_huge_value_stays_bounded():
    message = config_error({"RELAY_LOG_LEVEL": "x" * 100_000})
    assert "\n" not in message
    assert "RELAY_LOG_LEVEL" in message
    assert len(message) < 1000


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError, match="PORT"):
        load_settings({"PORT": "abc"})


@pytest.mark.parametrize(
    ("environ", "bad_value"),
    [
        ({"RELAY_TLS_CERT": "/etc/relay/cert.pem"}, "/etc/relay/cert.pem"),
        ({"RELAY_TLS_KEY": "/etc/relay/key.pem"}, "/etc/relay/key.pem"),
    ],
)
def test_tls_cert_without_key_and_key_without_cert_are_one_line_errors(
    environ: dict[str, str], bad_value: str
):
    message = config_error(environ)
    assert "\n" not in message
    assert "RELAY_TLS_CERT" in message
    assert "RELAY_TLS_KEY" in message
    assert "both" in message  # the rule: both set or neither
    assert bad_value in message  # the value that was given
