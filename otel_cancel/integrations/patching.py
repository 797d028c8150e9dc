"""Wrapping other libraries' functions through wrapt, and undoing exactly that.

Every function otel-cancel wraps in a library it instruments (Starlette's middleware
stack, LangGraph's runs and node runner, LangGraph Server's run creation and worker) goes
through :func:`wrap` and comes back with
:func:`unwrap`, which puts the original back only when the outermost wrapper is ours,
so it never strips a wrapper another instrumentation added on top.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import wrapt

_log = logging.getLogger("otel_cancel.instrumentation")

Wrapper = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]
"""A wrapt wrapper: ``wrapper(wrapped, instance, args, kwargs)``."""


def _wrapper_of(value: Any) -> Any:
    # wrapt keeps the wrapper of a FunctionWrapper as _self_wrapper (wrapt 1.x and 2.x).
    return getattr(value, "_self_wrapper", None) if isinstance(value, wrapt.FunctionWrapper) else None


def _attribute(owner: Any, name: str) -> Any:
    # The stored attribute, not what attribute access makes of it: on a class, getattr
    # would hand back a bound wrapper rather than the FunctionWrapper we set.
    return inspect.getattr_static(owner, name)


def is_wrapped_by(owner: Any, name: str, wrapper: Wrapper) -> bool:
    """Whether ``wrapper`` wraps ``owner.name``, outermost or under other wrappers."""
    value = _attribute(owner, name)
    while isinstance(value, wrapt.FunctionWrapper):
        if _wrapper_of(value) is wrapper:
            return True
        value = value.__wrapped__
    return False


def wrap(owner: Any, name: str, wrapper: Wrapper) -> None:
    """Wrap ``owner.name`` (a module or class attribute) with ``wrapper``, once.

    Args:
        owner: The module or class that holds the function.
        name: The attribute's name.
        wrapper: The wrapt wrapper; wrapping again with the same wrapper does nothing.
    """
    if not is_wrapped_by(owner, name, wrapper):
        wrapt.wrap_function_wrapper(owner, name, wrapper)


def unwrap(owner: Any, name: str, wrapper: Wrapper) -> None:
    """Put back what ``owner.name`` was before :func:`wrap` wrapped it with ``wrapper``.

    When another instrumentation has wrapped the function after us, removing our layer
    would remove theirs too: ours stays, with one warning.
    """
    value = _attribute(owner, name)
    if _wrapper_of(value) is wrapper:
        setattr(owner, name, value.__wrapped__)
    elif is_wrapped_by(owner, name, wrapper):
        _log.warning(
            "otel-cancel: %s.%s was wrapped by another instrumentation after otel-cancel; "
            "otel-cancel's wrapper stays under it",
            getattr(owner, "__name__", owner),
            name,
        )
