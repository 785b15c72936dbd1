"""How much of a public GPU catalogue ``cbroker import`` registers, per cloud.

Reads a directory of SkyPilot catalogues laid out as in skypilot-org/skypilot-catalog
(``<dir>/<cloud>/vms.csv``, e.g. ``catalogs/v9``) and classifies every row with the same
pure function the import uses (:func:`parse_skypilot`; no registry needed: a row the
classifier accepts is what the import registers, since the registry applies no further
rule to it). Offers are rows with an accelerator; "registered" are offers that resolve to
a catalogue model with a memory-per-GPU reading, a per-GPU-hour price and a located
region. Everything else is counted by reason.

    python bench/catalogue_coverage.py path/to/skypilot-catalog/catalogs/v9 [--markdown]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from services.registry.domain.importers import FileError, parse_skypilot, read_catalogue_text, reason_kind


def coverage(path: Path, cloud: str) -> tuple[int, int, Counter[str], Counter[str]]:
    """(offers, registered, reasons for the rest, models registered) of one vms.csv."""
    text = read_catalogue_text(path.read_bytes(), "SkyPilot vms.csv")
    provider = "".join(c if c.isalnum() else "-" for c in cloud.lower()).strip("-") or "cloud"
    result = parse_skypilot(text, provider, set(), cloud=provider)
    offers = [o for o in result.outcomes if o.status != "skipped"]
    ready = [o for o in offers if o.status == "ready" and o.pool_id]
    reasons = Counter(reason_kind(o.reason) for o in offers if not (o.status == "ready" and o.pool_id))
    for o in offers:
        if o.status == "ready" and not o.pool_id:
            reasons["duplicate offer"] += 1
    return len(offers), len(ready), reasons, Counter(o.model for o in ready)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("catalogue_dir", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    files = sorted(args.catalogue_dir.glob("*/vms.csv"))
    if not files:
        print(f"no <cloud>/vms.csv under {args.catalogue_dir}", file=sys.stderr)
        return 2
    rows = []
    total_offers = total_ok = 0
    for path in files:
        cloud = path.parent.name
        try:
            offers, ok, reasons, _models = coverage(path, cloud)
        except FileError as exc:
            rows.append((cloud, 0, 0, f"file refused: {exc}"))
            continue
        total_offers += offers
        total_ok += ok
        why = "; ".join(f"{r} ×{n}" for r, n in reasons.most_common(3))
        rows.append((cloud, offers, ok, why))
    rows.append(("all", total_offers, total_ok, ""))
    if args.markdown:
        print("| cloud | GPU offers | registered | % | main reasons for the rest |")
        print("| --- | ---: | ---: | ---: | --- |")
    for cloud, offers, ok, why in rows:
        pct = f"{100 * ok / offers:.1f}" if offers else "—"
        if args.markdown:
            print(f"| {cloud} | {offers} | {ok} | {pct} | {why} |")
        else:
            print(f"{cloud:<16} {offers:>7} {ok:>7} {pct:>6}%  {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
