"""The CLI's global options: flags that mirror the ``OTEL_CANCEL_*`` environment.

Each flag, given on the command line (before or after the command), wins over its
variable, as etcdctl's flags win over ``ETCDCTL_*``. The settings are then read
once, from the environment with the flags laid over it, so a flag is validated
exactly like its variable and an error names the flag that was given.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
from collections.abc import Mapping
from typing import TypeVar

from .. import environment_variables as env
from .._core.settings import Settings
from ..exceptions import ConfigurationError

_P = TypeVar("_P", bound=argparse.ArgumentParser)

# flag -> (variable, metavar, help). The password has no flag: a command line is
# visible to every user of the machine (ps), so it stays in the environment.
GLOBAL_FLAGS: dict[str, tuple[str, str, str]] = {
    "--endpoints": (env.OTEL_CANCEL_ETCD_ENDPOINTS, "HOST:PORT[,...]", "etcd endpoints (default 127.0.0.1:2379)"),
    "--prefix": (env.OTEL_CANCEL_PREFIX, "PREFIX", "key prefix in etcd (default /otel-cancel/)"),
    "--timeout": (env.OTEL_CANCEL_ETCD_TIMEOUT_SECONDS, "SECONDS", "deadline of each etcd call (default 2)"),
    "--user": (env.OTEL_CANCEL_ETCD_USERNAME, "NAME", "etcd user; the password comes from OTEL_CANCEL_ETCD_PASSWORD"),
    "--cacert": (env.OTEL_CANCEL_ETCD_CA_CERT, "FILE", "CA bundle (PEM) of etcd's certificate; turns TLS on"),
    "--cert": (env.OTEL_CANCEL_ETCD_CERT, "FILE", "client certificate (PEM) for mutual TLS"),
    "--key": (env.OTEL_CANCEL_ETCD_KEY, "FILE", "key (PEM) of --cert"),
    "--ttl": (env.OTEL_CANCEL_TTL_SECONDS, "SECONDS", "lifetime of the flags this command writes (default 3600)"),
}


def package_version() -> str:
    """The installed otel-cancel version (``unknown`` when run from a tree that is not installed)."""
    # Imported here: importlib.metadata costs every command start-up time, and only
    # --version needs it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("otel-cancel")
    except PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """``--version``: print the installed version and exit (looked up only when asked for)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def global_options_parser(parser_class: type[_P]) -> _P:
    """A parent parser holding the global flags, shared by the main parser and every command.

    Defaults are suppressed so a flag given before the command is not reset by the
    command's own (absent) copy of it.
    """
    parent = parser_class(add_help=False)
    group = parent.add_argument_group("connection (each flag wins over its environment variable)")
    for flag, (variable, metavar, help_text) in GLOBAL_FLAGS.items():
        group.add_argument(
            flag,
            dest=_dest(flag),
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=f"{help_text} [{variable}]",
        )
    return parent


def _dest(flag: str) -> str:
    return "global_" + flag.removeprefix("--")


def environment_with_flags(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment with every global flag given in ``args`` laid over its variable."""
    merged = dict(os.environ if environ is None else environ)
    for flag, (variable, _, _) in GLOBAL_FLAGS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            merged[variable] = value
    return merged


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings for this command: environment plus flags.

    Raises:
        ConfigurationError: a value is invalid; the message names the flag when it was given.
    """
    try:
        return Settings.from_environment(environment_with_flags(args))
    except ConfigurationError as error:
        message = str(error)
        for flag, (variable, _, _) in GLOBAL_FLAGS.items():
            if getattr(args, _dest(flag), None) is not None and variable in message:
                message = message.replace(variable, flag)
        raise ConfigurationError(message) from None


def requester() -> str:
    """Who is cancelling, for the flag's ``requested_by``: ``cli:{user}@{host}``.

    The user comes from the login environment or, when that is unset (a container,
    a cron job), from the process's uid in the password database.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login variable and the uid has no passwd entry
        user = f"uid{os.getuid()}"
    return f"cli:{user}@{socket.gethostname()}"
