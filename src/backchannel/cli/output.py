"""Shared printing for the CLI: JSON for machines, rich tables for people."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

F = TypeVar("F", bound=Callable[..., Any])

json_option: Callable[[F], F] = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON (the admin API's shapes) instead of a table.",
)


def print_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _console() -> Console:
    # Made per call so it writes to the sys.stdout in force now (CliRunner swaps it).
    return Console(highlight=False)


def cell(value: Any) -> Text:
    """A table cell as plain text: names are user input and must not be read as rich markup."""
    if value is None:
        return Text("-", style="dim")
    if isinstance(value, bool):
        return Text("yes" if value else "no")
    if isinstance(value, list | tuple):
        return Text(", ".join(str(v) for v in value) if value else "-")
    if isinstance(value, float) and value.is_integer():
        return Text(f"{value:g}")
    return Text(str(value))


def timestamp(value: float | None, timespec: str = "seconds") -> str:
    """A Unix time as a local ISO date and time (to the ``timespec`` unit)."""
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value).isoformat(sep=" ", timespec=timespec)


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    title: str | None = None,
    no_wrap: Collection[int] = (0,),
) -> None:
    """Print rows as a rich table; values fold instead of being cut off."""
    # ``no_wrap`` columns (ids, dates) stay on one line so they can be read and copied whole.
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, overflow="fold", no_wrap=i in no_wrap)
    for row in rows:
        table.add_row(*(v if isinstance(v, Text) else cell(v) for v in row))
    _console().print(table)


def print_fields(pairs: Sequence[tuple[str, Any]], *, title: str | None = None) -> None:
    """Print one record as a two-column table of names and values."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in pairs:
        table.add_row(Text(name), value if isinstance(value, Text) else cell(value))
    _console().print(table)


def print_note(message: str) -> None:
    """Print a hint for people on stderr, so stdout stays clean for pipes."""
    click.echo(message, err=True)


def print_once(label: str, value: str, what: str) -> None:
    """Print a newly created secret or key, plainly so it can be copied, with a warning.

    This is the only place the CLI prints a credential: the server keeps only its hash.
    """
    click.echo(f"{label}: {value}")
    click.echo(
        f"The {what} is shown only this once and cannot be recovered: store it now.", err=True
    )
