"""What simpo-lite prints, and where.

- Results (tables, summaries, a chat's answers) go to stdout; progress and messages go to stderr, so
  `simpo-lite ... > out.txt` keeps the result and the terminal keeps the commentary.
- A table is a rich table on a terminal and plain tab-separated rows when piped: names a user must
  type (presets, paths, commands) are never cut to fit 80 columns.
- Lines from libraries (warnings, log records, progress bars) are not ours and mean nothing to a user:
  `quiet_libraries` turns them off before the heavy imports, unless `--verbose`.

Imports nothing heavy: the CLI calls this before torch or transformers are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from typing import Any, Sequence

# Environment switches the libraries read when they are imported. Critical, not error: libraries log an
# error and then raise it (datasets' "Failed to load JSON ..."), and the raised one is what we report,
# in our own words.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "critical",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "critical",
    "HF_HUB_VERBOSITY": "critical",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",      # also transformers' own bars ("Loading weights")
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",                       # any other tqdm bar
    "BITSANDBYTES_NOWELCOME": "1",
}
# Loggers of libraries we load; bitsandbytes logs through the standard library with no handler of its
# own, so its warnings reach stderr through logging's last-resort handler.
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "bitsandbytes", "accelerate", "peft", "torch",
                   "gguf", "urllib3", "httpx", "filelock", "fsspec", "jax", "absl")


def quiet_libraries(verbose: bool) -> None:
    """Silence third-party warnings, log lines and progress bars; `verbose` leaves them all on.

    Our own warnings (module simpo_lite) still show. A variable the user set keeps its value.
    """
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"simpo_lite(\.|$)")
    logging.getLogger().setLevel(logging.CRITICAL)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _quiet_imported()


def _quiet_imported() -> None:
    """Libraries imported before us read their environment already: tell them directly."""
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity(logging.CRITICAL)
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].utils.logging.set_verbosity(logging.CRITICAL)
        sys.modules["datasets"].disable_progress_bars()


# ---- messages (stderr) ---------------------------------------------------------------------------

def info(message: str) -> None:
    """A 'simpo-lite: ...' line on stderr, never wrapped (a command in it stays on one line)."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True, soft_wrap=True).print(Text.assemble(("simpo-lite", "bold cyan"), ": ", message))


# ---- results (stdout) ----------------------------------------------------------------------------

def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def result_line(text: str) -> None:
    """A line of the result on stdout, unwrapped and as written: it holds paths and commands a user types,
    and a path may hold [brackets] that markup would eat."""
    print(text, flush=True)


def _plain(cell: Any, markup: bool = True) -> str:
    from rich.text import Text

    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain if markup and "[" in str(cell) else str(cell)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None,
                as_json: bool = False, markup: bool = True, show_lines: bool = False, names_first: bool = False) -> None:
    """A result table on stdout: rich on a terminal; tab-separated rows (header first) when piped;
    with `as_json` a JSON list of {column: cell}. Cells hold rich markup unless `markup` is False
    (text from a model or a file, which may contain [brackets]). `names_first`: the first column holds
    short names a user types (presets): kept whole on a terminal, up to a third of its width."""
    if as_json:
        records = [{name: cell if isinstance(cell, (int, float)) else _plain(cell, markup)  # numbers stay numbers
                    for name, cell in zip(columns, row)} for row in rows]
        print(json.dumps(records, indent=2), flush=True)
        return
    if not stdout_is_terminal():
        if title:
            print(f"# {_plain(title)}")
        for row in [columns, *rows]:
            print("\t".join(_plain(cell, markup).replace("\t", " ").replace("\n", "; ") for cell in row))
        sys.stdout.flush()
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=show_lines)
    console = Console(highlight=False)
    for i, column in enumerate(columns):  # a long path folds onto the next line instead of ending in "..."
        whole = names_first and i == 0 and rows
        width = min(max(Text.from_markup(_plain(row[0], markup)).cell_len for row in rows), console.width // 3) if whole else None
        table.add_column(column, overflow="fold", no_wrap=bool(whole), min_width=width)
    for row in rows:
        table.add_row(*[cell if isinstance(cell, Text) else str(cell) if markup else Text(str(cell)) for cell in row])
    console.print(table)
