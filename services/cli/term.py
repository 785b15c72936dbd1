"""What every ``cbroker`` command prints: tables that fit the terminal, JSON for scripts,
one-line errors with documented exit codes (docs/cli.md), and progress on stderr.

Tables never cut a value: an id or a price is only useful whole. When the columns fit the
width with every word whole they are printed as a table; otherwise each row is stacked as
``field  value`` lines, which stays readable at any width.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
import httpx
import msgspec
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from services.broker.ready_wait import RequestNotReady
from services.common.client_errors import ApiError

# Exit codes (docs/cli.md). click itself exits 2 on a usage error and 1 on its own errors.
OK, REFUSED, USAGE, UNREACHABLE, SERVICE_FAILED, LOCAL, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 5, 70, 130
PIPED_WIDTH = 200  # stdout not a terminal and no $COLUMNS: wide, so that `grep` sees whole rows


class Refused(click.ClickException):
    """The service answered no (a 4xx) or the check failed."""
    exit_code = REFUSED


class Unreachable(click.ClickException):
    """Nothing answered at the address, or not within the time allowed."""
    exit_code = UNREACHABLE


class ServiceFailed(click.ClickException):
    """The service answered with a 5xx (overloaded, starting, broken)."""
    exit_code = SERVICE_FAILED


class LocalError(click.ClickException):
    """Something on this machine: a port in use, a file that cannot be read."""
    exit_code = LOCAL


def as_click_error(exc: BaseException) -> click.ClickException | None:
    """The one-line error and exit code (docs/cli.md) for what a command can meet."""
    if isinstance(exc, ApiError):
        text = f"{exc.status}: {exc.problem.get('detail') or exc.problem.get('title') or ''}".strip()
        if exc.reasons:
            text += " — " + "; ".join(exc.reasons)
        return (ServiceFailed if exc.status >= 500 else Refused)(text)
    if isinstance(exc, RequestNotReady):  # ended failed/rejected/cancelled, or not ready in time
        return Refused(str(exc))
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return click.UsageError(f"bad URL: {exc}")
    if isinstance(exc, httpx.TransportError):
        return Unreachable(f"cannot reach {_where(exc)}: {str(exc) or type(exc).__name__}")
    if isinstance(exc, (msgspec.ValidationError, msgspec.DecodeError)):
        return click.UsageError(str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return LocalError(f"a port is already in use: {exc.strerror or exc}")
    if isinstance(exc, ConnectionError | TimeoutError):
        return Unreachable(str(exc) or type(exc).__name__)
    return None


def _where(exc: httpx.TransportError) -> str:
    try:
        return str(exc.request.url.copy_with(query=None))
    except RuntimeError:  # no request attached
        return "the service"


def handled(f: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose known failures end as one line and their exit code under any click
    group (the ``cbroker`` group also catches the rest)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted into the documented exit codes
            known = as_click_error(exc)
            if known is None:
                raise
            raise known from None

    return wrapper


def _width(stream: Any) -> int | None:
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    return None if stream.isatty() else PIPED_WIDTH


_consoles: dict[tuple[int, int | None], tuple[Any, Console]] = {}


def _console(stream: Any) -> Console:
    """One console per stream and width, so that a spinner and the lines printed while it
    spins share it (rich keeps them apart); looked up at each call so that a test runner's
    stream is the one written."""
    width = _width(stream)
    held = _consoles.get((id(stream), width))
    if held is None or held[0] is not stream:
        held = _consoles[(id(stream), width)] = (stream, Console(file=stream, width=width, highlight=False))
    return held[1]


def out() -> Console:
    """The console for results (stdout)."""
    return _console(sys.stdout)


def err() -> Console:
    """The console for progress, warnings and errors (stderr)."""
    return _console(sys.stderr)


def print_json(value: Any) -> None:
    """One JSON document on stdout (msgspec structs, dicts, lists)."""
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def waiting(message: str) -> Iterator[None]:
    """A spinner on stderr while a call is outstanding, when stderr is a terminal."""
    console = err()
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield


def note(message: str) -> None:
    """A progress line or a warning, on stderr (never mixed into a result or JSON)."""
    err().print(message)


# --- tables -------------------------------------------------------------------------------
def _plain(text: str) -> str:
    return Text.from_markup(text).plain


def _longest_word(text: str) -> int:
    return max((len(w) for w in _plain(text).split()), default=0)


def fit_widths(columns: Sequence[str], rows: Sequence[Sequence[str]], width: int) -> list[int] | None:
    """Column widths that show every word of every cell whole within ``width`` (rich's
    default box: one space either side of a cell and a rule between columns), or None when
    the columns cannot fit."""
    need = [max([_longest_word(c)] + [_longest_word(r[i]) for r in rows]) for i, c in enumerate(columns)]
    want = [max([len(c)] + [len(_plain(r[i])) for r in rows]) for i, c in enumerate(columns)]
    frame = 3 * len(columns) + 1
    spare = width - frame - sum(need)
    if spare < 0:
        return None
    widths = list(need)
    short = sum(w - n for w, n in zip(want, need, strict=True))  # what wrapping costs in all
    if short:
        for i, (w, n) in enumerate(zip(want, need, strict=True)):
            widths[i] += min(w - n, (w - n) * spare // short)
    return widths


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, width: int,
          right: Sequence[str] = ()) -> RenderableType:
    """A table that fits ``width``, or the rows stacked as ``field  value`` lines."""
    widths = fit_widths(columns, rows, width)
    if widths is not None:
        t = Table(title=title, title_justify="left")
        for col, w in zip(columns, widths, strict=True):
            t.add_column(col, width=w, justify="right" if col in right else "left", overflow="fold")
        for row in rows:
            t.add_row(*row)
        return t
    label = max(len(c) for c in columns)
    parts: list[RenderableType] = [Text(title, style="italic")]
    for n, row in enumerate(rows, 1):
        grid = Table.grid(padding=(0, 2))
        grid.add_column(width=label, style="dim")
        grid.add_column(overflow="fold")
        for col, value in zip(columns, row, strict=True):
            grid.add_row(col, value)
        parts += [Text(f"— {n} of {len(rows)}", style="dim"), grid]
    return Group(*parts)


def show(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[str] = ()) -> None:
    console = out()
    console.print(table(title, columns, rows, width=console.width, right=right))
