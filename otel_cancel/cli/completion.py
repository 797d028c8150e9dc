"""Shell completion scripts for ``otel-cancel``, generated from its argument parser.

``otel-cancel completion bash`` (or ``zsh``) prints a script that completes the
commands and each command's flags; source it from the shell's start-up file. The
script is built from the parser itself, so it never drifts from the CLI.
"""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh")


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each command's name and the option strings it accepts."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {
                name: sorted(option for a in sub._actions for option in a.option_strings)
                for name, sub in action.choices.items()
            }
    return {}


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of ``parser`` for ``shell`` (``bash`` or ``zsh``)."""
    if shell not in SHELLS:
        raise ValueError(f"unsupported shell {shell!r}; choose one of {', '.join(SHELLS)}")
    program = parser.prog
    function = "_" + program.replace("-", "_")
    commands = _commands(parser)
    top_options = sorted(
        o for a in parser._actions if not isinstance(a, argparse._SubParsersAction) for o in a.option_strings
    )
    cases = "\n".join(f'        {name}) opts="{" ".join(options)}" ;;' for name, options in commands.items())
    body = f"""{function}() {{
    local cur command word
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    command=""
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$word" in -*) ;; *) command="$word"; break ;; esac
    done
    local opts
    case "$command" in
{cases}
        *) opts="{" ".join(top_options)} {" ".join(commands)}" ;;
    esac
    COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
}}
"""
    if shell == "bash":
        return f"# bash completion for {program}; source it from ~/.bashrc\n{body}complete -F {function} {program}\n"
    return (
        f"# zsh completion for {program}; source it from ~/.zshrc\n"
        "autoload -U +X bashcompinit && bashcompinit\n"
        f"{body}complete -F {function} {program}\n"
    )
