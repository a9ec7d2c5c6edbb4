"""The command line before click reads it: --debug and --verbose anywhere on the line, a bare --resume,
and --switch=true / --switch=false for every on/off flag."""

from __future__ import annotations

import os

import typer
import typer.main

from simpo_lite.errors import UserError

GLOBAL_FLAGS = ("--debug", "--verbose")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def switch_names(app: typer.Typer) -> set[str]:
    """Long names of every on/off flag of every command (click builds the tree without running anything)."""
    command = typer.main.get_command(app)
    names, todo = set(), [command]
    while todo:
        current = todo.pop()
        todo += list(getattr(current, "commands", {}).values())
        names |= {opt for p in current.params if getattr(p, "is_flag", False) for opt in p.opts if opt.startswith("--")}
    return names


def normalise_argv(argv: list[str], app: typer.Typer) -> tuple[list[str], dict[str, bool]]:
    """Pull out --debug, --verbose (and --version) wherever they are; let a bare --resume mean 'latest';
    accept --switch=true / --switch=false for every on/off flag."""
    flags = {"debug": "--debug" in argv or os.environ.get("SIMPO_LITE_DEBUG") == "1",
             "verbose": "--verbose" in argv or os.environ.get("SIMPO_LITE_VERBOSE") == "1"}
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    if "--version" in argv and "--" not in argv[:argv.index("--version")]:
        argv = ["--version"]
    switches = switch_names(app) if any(a.startswith("--") and "=" in a for a in argv) else set()
    out = []
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in switches and value:
            if value.lower() in TRUE:
                out.append(name)
            elif value.lower() not in FALSE:
                raise UserError(f"{arg}: {name} is a switch; give it alone, or {name}=true / {name}=false")
            continue
        out.append(arg)
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("latest")
    return out, flags
