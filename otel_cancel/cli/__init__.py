"""``otel-cancel``: cancel a run by its root, see who stopped, check the set-up.

Commands::

    otel-cancel cancel ROOT [ROOT...] [--reason TEXT] [--wait SECONDS] [--expect N] [--json]
    otel-cancel cancel --all [--service NAME] [--label KEY=VALUE]... [--yes] [--reason TEXT] [--wait SECONDS]
    otel-cancel ps [--service NAME] [--label KEY=VALUE]... [--json]
    otel-cancel status ROOT [--json]
    (``--thread THREAD_ID`` or ``--run RUN_ID`` instead of ROOT: a LangGraph Server run's root)
    otel-cancel list [--json]
    otel-cancel watch [--json]
    otel-cancel doctor [--json]
    otel-cancel demo [--a2a | --langgraph-server] [--json]
    otel-cancel completion {bash,zsh}
    otel-cancel --version

Configuration comes from the ``OTEL_CANCEL_*`` environment; the global flags
(``--endpoints``, ``--prefix``, ...) win over it. Exit codes: 0 on
success (cancelling an already cancelled root included), 2 on bad input (a root
that is not 32 lowercase hex digits, an invalid setting), 1 with a one-line reason
when etcd cannot be reached or refuses the call, 3 when ``cancel --wait`` wrote
the flag but could not read the receipts (the cancel stands; only its
confirmation is missing).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from .._core.settings import Settings
from ..exceptions import ConfigurationError, StoreError

# Imports here are the ones every command needs. The rest is imported by the command
# that uses it (the IO loop, the store and OpenTelemetry by the commands that talk to
# etcd; the demo and doctor by themselves).
from . import fleet as _cli_fleet
from .arguments import root_argument
from .completion import SHELLS, completion_script
from .langgraph import UnknownLangGraphIdError, add_langgraph_id_options, check_one_target, resolve_root
from .options import VersionAction, environment_with_flags, global_options_parser, settings_from
from .render import format_age, iso, receipt_row, request_dict
from .table import format_table as format_table

if TYPE_CHECKING:
    from ..store import CancelStore

EXIT_OK = 0
EXIT_STORE = 1
EXIT_USAGE = 2
EXIT_UNCONFIRMED = _cli_fleet.EXIT_UNCONFIRMED
"""``cancel --wait``: the flag is written, reading the receipts failed."""

_RECEIPT_COLUMNS = ("service", "instance", "depth", "interrupted", "latency_ms")


def _one_line(text: str) -> str:
    """``text`` with control characters and line breaks escaped: an error is one line, whatever was typed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _fail(message: str, code: int) -> int:
    print(f"otel-cancel: {_one_line(message)}", file=sys.stderr)
    return code


# -- commands -------------------------------------------------------------------------------


async def _status(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    flag = await store.get_flag(args.root)
    receipts = sorted(await store.list_receipts(args.root), key=lambda r: (r.depth, r.stopped_at))
    if args.json:
        print(
            json.dumps(
                {
                    "root": args.root,
                    "cancelled": flag is not None,
                    "flag": request_dict(flag) if flag else None,
                    "receipts": [receipt_row(r) for r in receipts],
                }
            )
        )
        return EXIT_OK
    if flag is None:
        print(f"{args.root} is not cancelled")
        return EXIT_OK
    if flag.requested_at:
        age = format_age(time.time_ns() - flag.requested_at)
        when = f"{iso(flag.requested_at)} ({age} ago)"
        print(f"{flag.root} cancelled at {when} by {flag.requested_by} (reason: {flag.reason})")
    else:  # a flag whose value did not decode tells neither when nor by whom
        print(f"{flag.root} cancelled (reason: {flag.reason})")
    if receipts:
        print(format_table([receipt_row(r) for r in receipts], _RECEIPT_COLUMNS))
        print(_cli_fleet.receipts_summary(receipts))
        from .timeline import render_timeline

        print()
        print(render_timeline(flag, receipts))
    else:
        print("no process has reported stopped work yet")
    return EXIT_OK


async def _list(store: CancelStore, settings: Settings, args: argparse.Namespace) -> int:
    from .flags import list_command

    return await list_command(store, settings, args)


_STORE_COMMANDS = {
    "cancel": _cli_fleet.cancel_command,
    "ps": _cli_fleet.ps_command,
    "status": _status,
    "list": _list,
}


async def _run_store_command(settings: Settings, args: argparse.Namespace) -> int:
    store = settings.create_store()
    try:
        if args.command in ("cancel", "status"):
            try:
                await resolve_root(store, args)  # --thread / --run: a LangGraph Server run's root
            except UnknownLangGraphIdError as error:
                return _fail(str(error), EXIT_STORE)
        return await _STORE_COMMANDS[args.command](store, settings, args)
    finally:
        await store.close()


# -- argument parsing ------------------------------------------------------------------------


def _terminal_columns() -> int:
    """The terminal's width as :func:`shutil.get_terminal_size` finds it (``COLUMNS``, then the tty, else 80)."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, told the width: left to itself it imports shutil (and
    with it zlib, bz2, lzma) to find it, for every command, as each argument is added."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        # One line, exit 2 (argparse would print the whole usage first).
        print(f"otel-cancel: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


_ROOT_HELP = "the run's root: its trace id, 32 lowercase hex digits (the otel-cancel-root response header)"
_JSON_HELP = "print JSON (one object per line) instead of text"


def build_parser() -> argparse.ArgumentParser:
    """The ``otel-cancel`` argument parser (global flags, then one sub-parser per command)."""
    options = global_options_parser(_Parser)
    parser = _Parser(
        prog="otel-cancel",
        description="Cancel a run everywhere by its root id.",
        parents=[options],
        epilog="Every connection flag can also be given after the command. "
        "Shell completion: source <(otel-cancel completion bash).",
    )
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[options])

    cancel = command("cancel", "cancel every piece of work of ROOT(s), or of every run --all selects")
    _cli_fleet.add_cancel_arguments(cancel)
    add_langgraph_id_options(cancel)

    ps = command("ps", "show every root with live work, where it runs")
    _cli_fleet.add_ps_arguments(ps)

    status = command("status", "show whether ROOT is cancelled and who stopped")
    status.add_argument("root", type=root_argument, metavar="ROOT", nargs="?", help=_ROOT_HELP)
    add_langgraph_id_options(status)
    status.add_argument("--json", action="store_true", help=_JSON_HELP)

    listing = command("list", "list cancelled roots")
    listing.add_argument("--json", action="store_true", help=_JSON_HELP)

    watch = command("watch", "print cancels as they happen")
    watch.add_argument("--json", action="store_true", help=_JSON_HELP)

    doctor = command("doctor", "check etcd, propagators and instrumentation")
    doctor.add_argument("--json", action="store_true", help=_JSON_HELP)

    demo = command("demo", "run the example chain on an embedded etcd and cancel it")
    demo.add_argument("--json", action="store_true", help=_JSON_HELP)
    demo.add_argument(
        "--a2a", action="store_true", help="run the chain speaking A2A and cancel with cancel-task on another replica"
    )
    demo.add_argument(
        "--langgraph-server",
        action="store_true",
        help="run the agents as LangGraph Server deployments and cancel three ways (root, runs.cancel, disconnect)",
    )

    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    return parser


def console_main() -> int:
    """The ``otel-cancel`` console script (and ``python -m otel_cancel``): :func:`main`, then a quick exit."""
    code = main()
    # The process ends next. The interpreter's last garbage collection would walk every
    # object the imports made, about a tenth of a plain cancel's run, to free memory the
    # OS frees anyway; frozen objects are left out of it.
    gc.freeze()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``otel-cancel`` command with ``argv`` (default: the process's arguments); its exit code."""
    # gRPC's core logs failed connections (a TLS handshake refused, say) to stderr
    # at info level, before our one-line reason; keep its errors only, unless asked.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        print(completion_script(build_parser(), args.shell), end="")
        return EXIT_OK
    if args.command in ("cancel", "status"):
        check_one_target(parser, args)
    if args.command == "cancel" and args.expect and not args.wait:
        parser.error("cancel: --expect N counts receipts while it waits; add --wait SECONDS")
    provider = None
    if args.command == "cancel":
        from .telemetry import export_if_configured

        provider = export_if_configured()
    try:
        return _main(args, exporting=provider is not None)
    finally:
        if provider is not None:
            provider.shutdown()  # flush the request span before exiting


def _on_io_loop(command: Coroutine[Any, Any, int]) -> int:
    """Run a store command on the process's IO loop and wait for its exit code.

    Not on a loop of its own (``asyncio.run``): that loop would close with gRPC
    completions still in flight (the ones closing the channel), and gRPC would
    hand them to whichever other loop of the process polls next; there they raise
    "Event loop is closed". It matters when ``main()`` runs inside a program (or a
    test); every other etcd call otel-cancel makes runs on the IO loop already.
    """
    from .._core.io_loop import io_loop

    future = io_loop().submit(command)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()  # cancels the command on the IO loop (the store closes)
        raise


def _main(args: argparse.Namespace, *, exporting: bool = False) -> int:
    endpoints = os.environ.get("OTEL_CANCEL_ETCD_ENDPOINTS", "127.0.0.1:2379")
    try:
        if args.command == "demo" and args.langgraph_server:
            from ..demo.langgraph_server import run_langgraph_server_demo

            return run_langgraph_server_demo(as_json=args.json)
        if args.command == "demo":
            from ..demo import run_demo

            # The demo's processes read the environment (the flags reach them through it); without
            # an etcd there it starts one of its own, under a prefix of its own.
            os.environ.update(environment_with_flags(args))
            return run_demo(as_json=args.json, a2a=args.a2a)
        settings = settings_from(args)
        endpoints = ",".join(settings.endpoints)
        if args.command == "doctor":
            from .doctor import run_doctor

            return run_doctor(settings, as_json=args.json)
        if args.command == "watch":
            from .flags import watch_command

            return watch_command(settings, as_json=args.json)
        if args.command == "cancel":
            # A cancel that only writes flags goes through etcd's HTTP gateway: no gRPC,
            # no asyncio to import (see gateway_cancel); else, or when the gateway
            # cannot serve, through the store like every other command.
            from .gateway_cancel import cancel_through_gateway, takes_gateway

            if takes_gateway(args, settings, exporting=exporting):
                code = cancel_through_gateway(settings, args)
                if code is not None:
                    return code
        return _on_io_loop(_run_store_command(settings, args))
    except ConfigurationError as error:
        return _fail(str(error), EXIT_USAGE)
    except StoreError as error:
        return _fail(f"{error} (endpoints: {endpoints})", EXIT_STORE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
