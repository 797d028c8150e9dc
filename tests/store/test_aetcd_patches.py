"""The aetcd patches fit the installed aetcd, and say clearly when they no longer do."""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import sys
import tomllib
import types
from pathlib import Path

import aetcd
import pytest
from packaging.specifiers import SpecifierSet

from otel_cancel.exceptions import ConfigurationError
from otel_cancel.store import _aetcd_patches
from otel_cancel.store._aetcd_patches import (
    AETCD_NAMES_USED,
    NAMES_ADDED,
    SUPPORTED_AETCD,
    PatchedEtcdClient,
    RefusalAwareWatcher,
    aetcd_problems,
    check_aetcd,
)


def test_every_patched_name_exists_in_the_installed_aetcd_with_the_shape_relied_on():
    """Each name of AETCD_NAMES_USED resolves in the installed aetcd, with its shape and parameters."""
    assert aetcd_problems() == []


def test_the_installed_aetcd_is_in_the_supported_range():
    """The patches were checked against SUPPORTED_AETCD, and that is what is installed."""
    assert importlib.metadata.version("aetcd") in SpecifierSet(SUPPORTED_AETCD)


def test_pyproject_pins_aetcd_to_the_supported_range():
    """The requirement users install is the range the patches were checked against."""
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    pins = [r.replace(" ", "") for r in project["dependencies"] if r.startswith("aetcd")]
    assert len(pins) == 1
    assert SpecifierSet(pins[0][len("aetcd") :]) == SpecifierSet(SUPPORTED_AETCD)


def test_every_method_the_patches_override_is_in_the_list():
    """An override the check does not know about could drift unseen: each one is listed."""
    listed = {name.path for name in AETCD_NAMES_USED}
    for patched, base, base_path in (
        (PatchedEtcdClient, aetcd.Client, "aetcd.Client"),
        (RefusalAwareWatcher, aetcd.watcher.Watcher, "aetcd.watcher.Watcher"),
    ):
        overridden = {name for name in vars(patched) if name in dir(base) and not name.startswith("__")}
        assert {f"{base_path}.{name}" for name in overridden} <= listed


def test_the_module_docstring_names_every_patched_name():
    """The docstring is the reader's list of what is patched: it names each entry of the checked list."""
    doc = inspect.getdoc(_aetcd_patches) or ""
    for name in AETCD_NAMES_USED:
        assert name.path.rsplit(".", 1)[-1] in doc, name.path


def _stand_in(replace: tuple[str, str, object] | None = None) -> types.SimpleNamespace:
    """A stand-in for the aetcd package: the real modules, with one name of a subclass replaced."""
    watcher_module = types.SimpleNamespace(
        Watcher=type("Watcher", (aetcd.watcher.Watcher,), {}),
        WatcherCallback=aetcd.watcher.WatcherCallback,
    )
    root = types.SimpleNamespace(
        Client=type("Client", (aetcd.Client,), {}),
        watcher=watcher_module,
        exceptions=aetcd.exceptions,
        rpc=aetcd.rpc,
    )
    if replace is not None:
        owner, name, value = replace
        setattr({"Client": root.Client, "Watcher": watcher_module.Watcher}[owner], name, value)
    return root


def test_a_missing_method_is_reported_by_name():
    """aetcd without Watcher._handle_response: the check names it."""
    root = _stand_in()
    root.watcher.Watcher = type("Watcher", (), {"__init__": aetcd.watcher.Watcher.__init__})
    problems = aetcd_problems(root)
    assert "aetcd.watcher.Watcher._handle_response (missing)" in problems


def test_a_missing_instance_attribute_is_reported_by_name():
    """aetcd.Client no longer sets _is_connecting in __init__: the check names it."""

    @functools.wraps(aetcd.Client.__init__)
    def init_without_is_connecting(self: aetcd.Client, *args: object, **kwargs: object) -> None:
        aetcd.Client.__init__(self, *args, **kwargs)
        del self._is_connecting

    root = _stand_in(replace=("Client", "__init__", init_without_is_connecting))
    assert aetcd_problems(root) == ["aetcd.Client._is_connecting (missing)"]


def test_a_changed_shape_is_reported():
    """_handle_response that is no longer a coroutine function, or takes other parameters, is reported."""

    def handle(self: object, message: object) -> None:
        return None

    root = _stand_in(replace=("Watcher", "_handle_response", handle))
    problems = aetcd_problems(root)
    assert "aetcd.watcher.Watcher._handle_response (not a coroutine function)" in problems
    assert "aetcd.watcher.Watcher._handle_response (no parameter 'response')" in problems


def test_a_name_aetcd_now_defines_that_the_patch_adds_is_reported():
    """aetcd growing renew_token would be overridden unseen by the patch: the check says so."""
    root = _stand_in(replace=("Client", "renew_token", lambda self: None))
    assert aetcd_problems(root) == ["aetcd.Client.renew_token (now defined by aetcd; the patch would override it)"]
    assert "aetcd.Client.renew_token" in NAMES_ADDED


def test_check_raises_a_configuration_error_naming_the_names_and_the_supported_range():
    """The error names every missing name, the installed version and the range to install."""
    root = _stand_in()
    root.rpc = types.SimpleNamespace(**{k: v for k, v in vars(aetcd.rpc).items() if k != "RangeRequest"})
    with pytest.raises(ConfigurationError) as raised:
        check_aetcd(root)
    message = str(raised.value)
    assert "aetcd.rpc.RangeRequest (missing)" in message
    assert SUPPORTED_AETCD in message and importlib.metadata.version("aetcd") in message


def test_importing_the_store_against_an_incompatible_aetcd_fails_with_the_clear_error(monkeypatch):
    """The check runs at import: the store module does not load against an aetcd that lacks a name."""
    monkeypatch.delattr(aetcd.watcher.Watcher, "_handle_response")
    for module in ("otel_cancel.store._aetcd_patches", "otel_cancel.store._grpc_errors", "otel_cancel.store.etcd"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ConfigurationError, match=r"aetcd\.watcher\.Watcher\._handle_response \(missing\)"):
        import otel_cancel.store.etcd  # noqa: F401
