"""Settings from the environment: every OTEL_CANCEL_* value is valid or refused at start-up, clearly."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_cancel import environment_variables as env
from otel_cancel._core.settings import Settings
from otel_cancel.exceptions import ConfigurationError

NAMES = [getattr(env, name) for name in dir(env) if name.startswith("OTEL_CANCEL_")] + ["OTEL_SERVICE_NAME"]
env_value = st.one_of(
    st.text(max_size=30),
    # What POSIX hands over for bytes that are not UTF-8 (lone surrogates), and worse.
    st.binary(max_size=20).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
    st.sampled_from(["\udc80", "caf\udce9", "\ud800", "h\u00f6st:2379", "host :2379", "h:\u00b2", "h:\u0663"]),
    st.sampled_from(["", " ", "0", "-1", "nan", "inf", "1e400", "true", "FALSE", "yes", "2", ",", "a:b", "[::1]:2379"]),
    st.sampled_from(["/", "/otel/", "/../", "127.0.0.1:2379", "http://h:1", "memory", "continue", "/dev/null"]),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(environ=st.dictionaries(st.sampled_from(NAMES), env_value, max_size=len(NAMES)))
def test_settings_from_any_environment_are_valid_or_refused_with_configuration_error(environ):
    """Settings.from_environment (and building the store) succeed or raise ConfigurationError, nothing else."""
    try:
        configured = Settings.from_environment(environ)
        store = configured.create_store()
    except ConfigurationError as error:
        assert str(error)
        return
    assert store.prefix == configured.prefix


@pytest.mark.parametrize("prefix", ["/a/../b/", "relative/", "/no-slash", "/tab\there/", "/" + "x" * 300 + "/", "/./"])
def test_a_prefix_that_could_escape_is_refused_at_start_up(prefix):
    """OTEL_CANCEL_PREFIX that is not a plain absolute path fails fast with ConfigurationError."""
    with pytest.raises(ConfigurationError):
        Settings.from_environment({"OTEL_CANCEL_PREFIX": prefix})


def test_label_headers_setting_is_parsed_and_bad_pairs_fail_at_start_up():
    """OTEL_CANCEL_LABEL_HEADERS is header=label pairs; a malformed one is a ConfigurationError."""
    parsed = Settings.from_environment({"OTEL_CANCEL_LABEL_HEADERS": "X-Tenant-Id=tenant, x-user=user_id"})
    assert parsed.label_headers == (("x-tenant-id", "tenant"), ("x-user", "user_id"))
    for bad in ("x-tenant-id", "x-tenant-id=1bad", "=tenant"):
        with pytest.raises(ConfigurationError, match="OTEL_CANCEL_LABEL_HEADERS"):
            Settings.from_environment({"OTEL_CANCEL_LABEL_HEADERS": bad})
