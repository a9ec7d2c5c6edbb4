"""`simpo-lite data inspect`: show what the pipeline makes of a dataset before any training."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from simpo_lite.console import print_table
from simpo_lite.data.batching import batch_indices, padding_fraction
from simpo_lite.data.pipeline import PreparedData, build_datasets
from simpo_lite.logprobs import IGNORE_INDEX
from simpo_lite.errors import UserError

MASKED = "dim"
TRAINED = "bold green"
SPECIAL = "magenta"


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it reads in the sequence. Decoding one token at a time would drop
    SentencePiece's leading spaces and split a character whose bytes span several tokens (Cyrillic, CJK,
    emoji) into replacement marks; here such a character goes whole to the token that completes it."""
    pieces, start, shown = [], 0, 0  # decode from `start`; ids[start:shown] are already on screen
    for end in range(1, len(ids) + 1):
        before = tokenizer.decode(ids[start:shown])
        text = tokenizer.decode(ids[start:end])
        if text.endswith("\ufffd") and end < len(ids) and end - shown < 8:  # a character still incomplete
            pieces.append("")
            continue
        pieces.append(text[len(before):])
        start, shown = shown, end
    return pieces


def render_sequence(tokenizer, ids: list[int], labels: list[int]) -> Text:
    """Masked tokens dim, trained tokens green, special tokens magenta, '│' at the prompt/response boundary.
    Newlines stay visible as a mark and still break the line, so the layout matches the template."""
    special = set(tokenizer.all_special_ids)
    text = Text()
    for position, (token, label, piece) in enumerate(zip(ids, labels, token_pieces(tokenizer, ids))):
        if label != IGNORE_INDEX and (position == 0 or labels[position - 1] == IGNORE_INDEX):
            text.append("│", style="bold red")
        style = TRAINED if label != IGNORE_INDEX else MASKED
        if token in special:
            style += f" {SPECIAL}"
        text.append(piece.replace("\n", "↵\n"), style=style)
    return text


def _print_example(console: Console, tokenizer, prepared: PreparedData, index: int) -> None:
    """Both sides of training pair `index`, whole: boxed and wrapped on a terminal; piped, plain lines
    (a box would cut them at 80 columns, and the colours are gone anyway)."""
    example = prepared.train[index]
    for side in ("chosen", "rejected"):
        ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
        trained = sum(label != IGNORE_INDEX for label in labels)
        title = (f"{side}: training pair {index} (source row {example['row']}): {len(ids) - trained} prompt tokens "
                 f"masked, {trained} response tokens trained")
        body = render_sequence(tokenizer, ids, labels)
        if console.is_terminal:
            console.print(Text(title, style="bold"))
            console.print(Panel(body), soft_wrap=False)
        else:
            console.print(f"== {title} ==", markup=False, soft_wrap=True)
            console.print(body, soft_wrap=True)
            console.print()


LENGTH_COLUMNS = ("split", "tokens", "min", "mean", "p50", "p95", "max")
DROP_COLUMNS = ("data", "rows read", "kept", "skipped by rule (first rows, counted from 0)")


def _length_rows(prepared: PreparedData) -> list[list[str]]:
    return [[split, name, *(f"{stats[k]:.0f}" if k != "mean" else f"{stats[k]:.1f}" for k in LENGTH_COLUMNS[2:])]
            for split, fields in prepared.report.lengths.items() for name, stats in fields.items() if stats]


def _drop_rows(prepared: PreparedData) -> list[list[str]]:
    rows = []
    for source in prepared.report.sources:
        rules = "\n".join(source.drop_lines()) or "none"
        rows.append([f"{source.role}: {source.name}", str(source.rows_read), str(source.rows_kept), rules])
    return rows


def _print_table(console: Optional[Console], columns, rows, title: str) -> None:
    """On the given console as a rich table; else a result table (plain rows when piped)."""
    if console is None:
        print_table(list(columns), rows, title=title, markup=False)
        return
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*map(Text, row))
    console.print(table)


def padding_line(prepared: PreparedData, batch_size: int, group_by_length: bool, seed: int) -> str:
    train = prepared.train
    chosen, rejected = train["chosen_length"], train["rejected_length"]
    lengths = train["length"]

    def share(grouped: bool) -> float:
        return padding_fraction(batch_indices(lengths, batch_size, seed=seed, group_by_length=grouped),
                                chosen, rejected)

    used, other = share(group_by_length), share(not group_by_length)
    mode = "with" if group_by_length else "without"
    return (f"Padding: {used:.1%} of the [2 x {batch_size}, L] batch slots {mode} length grouping "
            f"({other:.1%} {'without' if group_by_length else 'with'} it; data.group_by_length={group_by_length})")


def packed_line(prepared: PreparedData, rows: int, budget: int, seed: int) -> str:
    """Padding and pairs per micro-batch of one epoch's token-counted micro-batches (simpo.pack_tokens)."""
    from simpo_lite.data.packing import batch_slots, token_budget_batches
    from simpo_lite.run_setup import row_lengths

    lengths = row_lengths(prepared.train, pack_prompt=True)
    batches = token_budget_batches(lengths, rows, budget, seed=seed)
    slots = sum(batch_slots([lengths[i] for i in batch], budget) for batch in batches)
    return (f"Padding: {1 - sum(lengths) / slots:.1%} of the token slots of {len(batches)} micro-batches of "
            f"{rows} row{'s' if rows > 1 else ''} x up to {budget} tokens (simpo.pack_tokens), "
            f"{len(lengths) / len(batches):.1f} pairs each on average")


def _load_tokenizer(cfg):
    from simpo_lite.model import load_tokenizer

    return load_tokenizer(cfg.model)


def inspect_data(cfg, index: int = 0, tokenizer=None, console: Optional[Console] = None) -> PreparedData:
    """Render training pair `index` and report lengths, skipped rows and padding."""
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(cfg)
    # Rows over data.max_bad_fraction stop a run, but their report is what inspect is for: shown, and
    # the stop said at the end.
    prepared = build_datasets(replace(cfg.data, max_bad_fraction=1.0), tokenizer, cfg.train.seed)
    n = prepared.train.num_rows
    if not 0 <= index < n:
        raise UserError(f"--index {index} is out of range: the training split has {n} pairs (0 to {n - 1})")
    tables_on = console  # None: the tables are results on stdout (plain rows when piped)
    console = console or Console(soft_wrap=True)
    _print_example(console, tokenizer, prepared, index)
    colours = (" Prompt tokens are dim, trained ones green, special tokens magenta." if console.is_terminal else "")
    console.print(Text("│ marks where the response starts; tokens after it are what the loss trains; ↵ is a "
                       f"newline.{colours}", style="italic"))
    for source in prepared.report.sources:
        kinds = ", ".join(f"{kind} ({count} rows)" for kind, count in source.kinds.items()) or "no usable rows"
        console.print(escape(f"Format of {source.role} data {source.name}: {kinds}"))
    console.print(escape(f"Pairs: {prepared.report.train_pairs} train, {prepared.report.eval_pairs} eval "
                         f"({prepared.report.eval_origin})"))
    truncated = sum(source.truncated for source in prepared.report.sources)
    if truncated:
        console.print(f"Prompts cut to data.max_prompt_length={cfg.data.max_prompt_length} tokens "
                      f"(data.truncation_mode={cfg.data.truncation_mode}): {truncated}", markup=False)
    _print_table(tables_on, DROP_COLUMNS, _drop_rows(prepared), "Rows kept and skipped")
    _print_table(tables_on, LENGTH_COLUMNS, _length_rows(prepared), "Token lengths")
    if cfg.train.micro_batch_size == "auto":  # the micro-batch a run on this machine would choose
        from simpo_lite.autofit import fit

        cfg, _ = fit(cfg)
    if cfg.simpo.pack_tokens:  # config refuses pack_tokens without pack_prompt
        console.print(packed_line(prepared, cfg.train.micro_batch_size, cfg.simpo.pack_tokens, cfg.train.seed))
    else:
        console.print(padding_line(prepared, cfg.train.micro_batch_size, cfg.data.group_by_length, cfg.train.seed))
    for source in prepared.report.sources:
        stop = source.too_many_bad(cfg.data.max_bad_fraction)
        if stop:
            console.print(f"warning: training would stop here: {stop}", markup=False, style="yellow", soft_wrap=True)
    return prepared

