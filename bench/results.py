"""Where the benchmarks put what they measured: printed as they go, and with ``--write``
a section appended to docs/benchmarks-log.md (the heading names the date and the command)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-log.md"


class Lines(list[str]):
    """The lines a run prints, kept for the report: ``say = Lines(); say("...")``."""

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.append(line)


def command(script: str, ap: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> str:
    """``python bench/<script>`` with the options of ``names`` that differ from their defaults."""
    out = f"python bench/{script}"
    for name in names:
        value = getattr(args, name)
        if value == ap.get_default(name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out += f" {flag}"
        else:
            out += f" {flag} {int(value) if isinstance(value, float) and value.is_integer() else value}"
    return out


def bullets(lines: Sequence[str]) -> str:
    return "".join(f"- {line}\n" for line in lines)


def append_section(title: str, command_line: str, body: str) -> Path:
    with BENCHMARKS.open("a", encoding="utf-8") as f:
        f.write(f"\n### {title} — {time.strftime('%Y-%m-%d %H:%M')} — `{command_line}`\n\n{body}")
    return BENCHMARKS
