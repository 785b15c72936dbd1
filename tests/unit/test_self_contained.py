"""A clone with nothing beside it runs both README commands: no test and no README may
reach outside the repository for data or docs (the team's shared folder sits beside the
clone in the team's layout only). Benchmarks (bench/) may read it; tests never."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = "sha" + "red"  # spelt in two so that this file does not match itself
PATTERNS = [  # the relative path, the folder above the root joined with it, and its data folder
    re.compile(r"\.\./" + OUTSIDE + r"\b"),
    re.compile(r"parents?\[?\d*\]?\.parent\s*/\s*[\"']" + OUTSIDE),
    re.compile(r"[\"']" + OUTSIDE + r"[\"']\s*/\s*[\"']data[\"']"),
]


def _offending_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [f"{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if any(p.search(line) for p in PATTERNS)]


def _offences(paths: list[Path]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}" for path in paths for line in _offending_lines(path)]


def test_no_test_reads_outside_the_repository() -> None:
    files = [p for p in (ROOT / "tests").rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".toml", ".cfg"}]
    assert len(files) > 50
    assert _offences(files) == []


def test_readme_and_ci_stay_inside_the_repository() -> None:
    assert _offences([ROOT / "README.md", ROOT / ".ci" / "run", ROOT / "pyproject.toml"]) == []


def test_the_guard_catches_each_form(tmp_path: Path) -> None:
    bad = tmp_path / "t.py"
    for line in (f"open('../{OUTSIDE}/data/x.csv')", f"Path(__file__).parents[2].parent / '{OUTSIDE}' / 'data'",
                 f"ROOT / \"{OUTSIDE}\" / \"data\" / \"x\"", f"see ../{OUTSIDE}/DESIGN.md"):
        bad.write_text(line + "\n")
        assert _offending_lines(bad) == [f"1: {line}"]


def test_readme_links_resolve_inside_the_repository() -> None:
    """Every relative link of the README names a file of the clone (the design is docs/design.md)."""
    text = (ROOT / "README.md").read_text()
    links = [m for m in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in m]
    assert "docs/design.md" in links
    missing = [m for m in links if not (ROOT / m).exists() or not (ROOT / m).resolve().is_relative_to(ROOT)]
    assert missing == []


def test_the_tests_data_carries_its_source_and_terms() -> None:
    readme = (ROOT / "tests" / "data" / "alibaba-gpu-v2023" / "README.md").read_text()
    assert "https://github.com/alibaba/clusterdata" in readme and "research or study" in readme
    for name in ("openb_node_list_gpu_node_excerpt.csv", "openb_pod_list_default_excerpt.csv"):
        assert name in readme and (ROOT / "tests" / "data" / "alibaba-gpu-v2023" / name).is_file()
