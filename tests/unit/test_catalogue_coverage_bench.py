"""The coverage bench (bench/catalogue_coverage.py) on the shipped AWS excerpt: it counts
an offer as registered exactly when the import registers it, so AWS's shares of one L4
(G6f/Gr6f, registered as sharing pools) count, and are counted apart."""

from __future__ import annotations

from pathlib import Path

from bench.catalogue_coverage import coverage, main

AWS_V9 = Path(__file__).parents[1] / "fixtures" / "catalogues" / "aws-v9" / "vms.csv"


def test_shares_of_one_gpu_count_as_registered_gpu_offers() -> None:
    cov = coverage(AWS_V9, "aws")
    # GPU offers: g6e, g7e x2, p5e x2, gr6 and the five fractional L4 rows; FPGA and Inf2 apart
    assert (cov.offers, cov.registered, cov.shares) == (11, 10, 5)
    assert cov.reasons == {"missing Price": 1}  # the p5e row with neither price
    assert cov.models["nvidia-l4"] == 6 and (cov.other_offers, cov.other_registered) == (2, 1)


def test_the_markdown_table_has_the_shares_column(tmp_path: Path, capsys) -> None:
    (tmp_path / "aws").mkdir()
    (tmp_path / "aws" / "vms.csv").write_bytes(AWS_V9.read_bytes())
    assert main([str(tmp_path), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| of them shares |" in lines[0]
    assert lines[2].startswith("| aws | 11 | 10 | 90.9 | 5 | missing Price ×1 |")
