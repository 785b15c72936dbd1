"""How much of a public GPU catalogue ``cbroker import`` registers, per cloud.

Reads a directory of SkyPilot catalogues laid out as in skypilot-org/skypilot-catalog
(``<dir>/<cloud>/vms.csv``, e.g. ``catalogs/v9``) and classifies every row with the same
pure function the import uses (:func:`parse_skypilot`; no registry needed: a row the
classifier accepts is what the import registers, since the registry applies no further
rule to it). Offers are rows with an accelerator; "registered" are offers that resolve to
a catalogue model with a memory-per-GPU reading, a per-GPU-hour price and a located
region (a spot-only row that prices its on-demand twin counts as registered). Everything
else is counted by reason. A row repeated verbatim (GCP lists some TPU slices twice) is
one offer: the repeats are counted in their own column, not as offers.

    python bench/catalogue_coverage.py path/to/skypilot-catalog/catalogs/v9 [--markdown]
        [--region-map FILE]   # the import's --region-map, for codes that name no place
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path

from services.cli.importer import load_region_map
from services.common.messages import Region
from services.registry.domain.importers import FileError, parse_skypilot, read_catalogue_text, reason_kind


def _repeated_rows(text: str) -> set[int]:
    """Data rows (numbered from 1) that repeat an earlier row verbatim."""
    seen: set[tuple[str, ...]] = set()
    repeats: set[int] = set()
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=0):
        if n == 0:
            continue
        key = tuple(row)
        if key in seen:
            repeats.add(n)
        seen.add(key)
    return repeats


def coverage(path: Path, cloud: str, region_map: dict[str, Region | str] | None = None
             ) -> tuple[int, int, int, Counter[str], Counter[str]]:
    """(offers, registered, verbatim repeats, reasons for the rest, models registered) of one vms.csv."""
    text = read_catalogue_text(path.read_bytes(), "SkyPilot vms.csv")
    provider = "".join(c if c.isalnum() else "-" for c in cloud.lower()).strip("-") or "cloud"
    result = parse_skypilot(text, provider, set(), cloud=provider, region_map=region_map)
    repeats = _repeated_rows(text)
    offers = [o for o in result.outcomes if o.status != "skipped" and o.row not in repeats]
    repeated = sum(1 for o in result.outcomes if o.status != "skipped" and o.row in repeats)
    ready = [o for o in offers if o.status == "ready" and o.pool_id]
    reasons = Counter(reason_kind(o.reason) for o in offers if not (o.status == "ready" and o.pool_id))
    return len(offers), len(ready), repeated, reasons, Counter(o.model for o in ready)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("catalogue_dir", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--region-map", type=Path, help="the import's --region-map (JSON or CSV), for every cloud")
    args = ap.parse_args(argv)
    region_map = load_region_map(args.region_map) if args.region_map else None
    files = sorted(args.catalogue_dir.glob("*/vms.csv"))
    if not files:
        print(f"no <cloud>/vms.csv under {args.catalogue_dir}", file=sys.stderr)
        return 2
    rows = []
    total_offers = total_ok = total_repeats = 0
    for path in files:
        cloud = path.parent.name
        try:
            offers, ok, repeats, reasons, _models = coverage(path, cloud, region_map)
        except FileError as exc:
            rows.append((cloud, 0, 0, 0, f"file refused: {exc}"))
            continue
        total_offers += offers
        total_ok += ok
        total_repeats += repeats
        why = "; ".join(f"{r} ×{n}" for r, n in reasons.most_common(3))
        rows.append((cloud, offers, ok, repeats, why))
    rows.append(("all", total_offers, total_ok, total_repeats, ""))
    if args.markdown:
        print("| cloud | GPU offers | registered | % | rows repeated verbatim | main reasons for the rest |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
    for cloud, offers, ok, repeats, why in rows:
        pct = f"{100 * ok / offers:.1f}" if offers else "—"
        if args.markdown:
            print(f"| {cloud} | {offers} | {ok} | {pct} | {repeats} | {why} |")
        else:
            print(f"{cloud:<16} {offers:>7} {ok:>7} {pct:>6}% {repeats:>5}  {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
