"""The CLI's tables: every value whole at any width, as a table when the words fit and
stacked as ``field  value`` lines when they do not."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from services.cli.term import fit_widths, table

COLUMNS = ("lease", "pool", "region", "model", "units", "billing", "price", "expires")
ROW = ("lease_1a24bc8d5080d6b938fb050", "acme-cn-yrd-a100-sxm-80gb-pool-0", "cn-yrd", "nvidia-a100-sxm-80gb", "3",
       "on_demand", "2.10 USD/unit-h", "2026-12-06T14:41:22+00:00")


def render(width: int, rows=(ROW,), columns=COLUMNS) -> str:  # noqa: ANN001
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table("active leases", columns, rows, width=width))
    return console.file.getvalue()


def test_wide_terminal_gets_one_row_per_item() -> None:
    text = render(200)
    [row] = [line for line in text.splitlines() if ROW[0] in line]
    assert all(value in row for value in ROW)


def test_80_columns_stacks_with_every_value_whole() -> None:
    text = render(80)
    assert max(len(line) for line in text.splitlines()) <= 80
    for col, value in zip(COLUMNS, ROW, strict=True):
        assert any(line.rstrip().split(None, 1) == [col, value] for line in text.splitlines()), (col, value, text)


def test_words_wrap_but_never_break_when_the_table_fits() -> None:
    columns, row = ("id", "reasons"), ("r1", "no pool of this model has free units in any region right now")
    widths = fit_widths(columns, [row], 40)
    assert widths is not None and sum(widths) + 3 * 2 + 1 <= 40
    text = render(40, rows=[row], columns=columns)
    assert all(word in text for word in row[1].split())
    assert max(len(line) for line in text.splitlines()) <= 40


def test_fit_widths_refuses_when_a_word_cannot_fit() -> None:
    assert fit_widths(COLUMNS, [ROW], 80) is None
    assert fit_widths(COLUMNS, [ROW], 170) is not None


words = st.text(alphabet="abcdefghij-._/0123456789", min_size=1, max_size=24)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(words, min_size=4, max_size=4), min_size=1, max_size=4),
       width=st.integers(min_value=40, max_value=160))
def test_every_value_is_shown_whole_at_any_width(rows: list[list[str]], width: int) -> None:
    columns = ("a", "bb", "ccc", "dddd")
    text = render(width, rows=rows, columns=columns)
    assert max(len(line) for line in text.splitlines()) <= width
    for row in rows:
        for value in row:
            assert value in text


def test_audit_report_fits_80_columns() -> None:
    from services.cli.audit import print_report
    from services.cli.audit_checks import CheckResult, Report, Violation

    report = Report([CheckResult("no overbooking", 1, 12_345, [Violation("pool-a", "leased 9 > capacity 8")],
                                 ["3 pools pending their first heartbeat after a rebuild"]),
                     CheckResult("every 201 durable", 2, 678)])
    console = Console(file=io.StringIO(), width=80, color_system=None)
    print_report(report, console)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for value in ("no overbooking", "12,345", "every 201 durable", "678", "pool-a", "1 violation(s)",
                  "3 pools pending their first heartbeat after a rebuild"):
        assert all(word in text for word in value.split()), value  # words wrap in a cell, never break
