"""How much of a public GPU catalogue ``cbroker import`` registers, per cloud.

Reads a directory of SkyPilot catalogues laid out as in skypilot-org/skypilot-catalog
(``<dir>/<cloud>/vms.csv``, e.g. ``catalogs/v9``) and classifies every row with the same
pure function the import uses (:func:`parse_skypilot`; no registry needed: a row the
classifier accepts is what the import registers, since the registry applies no further
rule to it). Offers are rows with an accelerator; "registered" are offers that resolve to
a catalogue model with a memory-per-GPU reading, a per-GPU-hour price and a region (a
located one, or the cloud's region of unknown location for codes that name no place; a
spot-only row is registered as an interruptible-only pool or prices its on-demand twin). Everything
else is counted by reason. A row repeated verbatim (GCP lists some TPU slices twice) is
one offer: the repeats are counted in their own column, not as offers.

The target counts GPU offers. Rows whose accelerator is not a GPU -- TPU slices, AWS
Inferentia/Trainium, Intel Gaudi, FPGAs -- are counted in their own column (offers and
registered), never silently dropped: an accelerator is "not a GPU" when the catalogue
model it resolves to has a non-GPU software stack (xla, neuron, synapseai, cann,
neuware, xpu), or, unresolved, when its name says TPU or FPGA. Fractional shares of a GPU
(AWS G6f/Gr6f: AcceleratorCount 0.125-0.5 of one L4) are GPU offers; the import registers
them as sharing pools (docs/sharing.md, "Listed shares"), so they count as registered, and
the ``shares`` column says how many of the registered offers they are.

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
from typing import NamedTuple

from services.cli.importer import load_region_map
from services.common.messages import Region
from services.registry.domain.catalogue import resolve
from services.registry.domain.importers import FileError, parse_skypilot, read_catalogue_text, reason_kind

# Software stacks of accelerators that are not GPUs (TPU, Inferentia/Trainium, Gaudi, NPUs).
_NON_GPU_STACKS = frozenset({"xla", "neuron", "synapseai", "cann", "neuware", "xpu"})
_NON_GPU_WORDS = ("tpu", "fpga", "virtex", "ultrascale", "alveo")


def is_gpu(name: str) -> bool:
    """Whether a catalogue's accelerator name is a GPU (see the module docstring)."""
    acc = resolve(name)
    if acc is not None:
        return acc.stack not in _NON_GPU_STACKS
    return not any(word in name.lower() for word in _NON_GPU_WORDS)


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


class Coverage(NamedTuple):
    offers: int  # GPU offers
    registered: int  # GPU offers registered
    shares: int  # of them, offers of a share of one GPU, registered as sharing pools
    repeated: int  # rows repeating an earlier row verbatim (any accelerator)
    reasons: Counter[str]  # why the other GPU offers were not registered
    models: Counter[str]  # models of the registered GPU offers
    other_offers: int  # offers of accelerators that are not GPUs
    other_registered: int
    other_reasons: Counter[str]


def coverage(path: Path, cloud: str, region_map: dict[str, Region | str] | None = None) -> Coverage:
    """GPU offers, registered, reasons; the same for non-GPU accelerators, of one vms.csv."""
    text = read_catalogue_text(path.read_bytes(), "SkyPilot vms.csv")
    provider = "".join(c if c.isalnum() else "-" for c in cloud.lower()).strip("-") or "cloud"
    result = parse_skypilot(text, provider, set(), cloud=provider, region_map=region_map)
    repeats = _repeated_rows(text)
    names = {n: row.get("AcceleratorName", "") for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=1)}
    offers = [o for o in result.outcomes if o.status != "skipped" and o.row not in repeats]
    repeated = sum(1 for o in result.outcomes if o.status != "skipped" and o.row in repeats)
    gpu = [o for o in offers if is_gpu(names.get(o.row, ""))]
    other = [o for o in offers if not is_gpu(names.get(o.row, ""))]

    def registered(outcomes: list) -> list:
        return [o for o in outcomes if o.status == "ready" and o.pool_id]

    sharing = {pool_id for pool_id, spec in result.pools if spec.sharing.mode != "none"}

    def why(outcomes: list) -> Counter[str]:
        return Counter(reason_kind(o.reason) for o in outcomes if not (o.status == "ready" and o.pool_id))

    return Coverage(len(gpu), len(registered(gpu)), sum(1 for o in registered(gpu) if o.pool_id in sharing),
                    repeated, why(gpu), Counter(o.model for o in registered(gpu)),
                    len(other), len(registered(other)), why(other))


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
    totals = [0, 0, 0, 0, 0, 0]
    for path in files:
        cloud = path.parent.name
        try:
            cov = coverage(path, cloud, region_map)
        except FileError as exc:
            rows.append((cloud, 0, 0, 0, 0, 0, 0, f"file refused: {exc}", ""))
            continue
        counts = (cov.offers, cov.registered, cov.shares, cov.other_offers, cov.other_registered, cov.repeated)
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
        why = "; ".join(f"{r} ×{n}" for r, n in cov.reasons.most_common(4))
        other_why = "; ".join(f"{r} ×{n}" for r, n in cov.other_reasons.most_common(2))
        rows.append((cloud, *counts, why, other_why))
    rows.append(("all", *totals, "", ""))
    if args.markdown:
        print("| cloud | GPU offers | registered | % | of them shares | main reasons for the rest "
              "| other accelerators: offers | registered | their reasons | rows repeated verbatim |")
        print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: |")
    for cloud, offers, ok, shares, other, other_ok, repeats, why, other_why in rows:
        pct = f"{100 * ok / offers:.1f}" if offers else "—"
        if args.markdown:
            print(f"| {cloud} | {offers} | {ok} | {pct} | {shares} | {why} | {other} | {other_ok} | {other_why} "
                  f"| {repeats} |")
        else:
            print(f"{cloud:<16} {offers:>7} {ok:>7} {pct:>6}% shares {shares:>5} | other {other:>5} {other_ok:>5} | "
                  f"repeats {repeats:>4}  {why}  {other_why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
