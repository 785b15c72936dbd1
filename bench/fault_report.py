"""Recovery times of the fault suite, as a table.

    python bench/fault_report.py            # run tests/faults/test_fault_suite.py, then print
    python bench/fault_report.py --no-run   # print what the last run wrote
    python bench/fault_report.py --write    # ... and append the table to docs/benchmarks-log.md

The suite writes its measurements to ``$CB_FAULT_REPORT`` (default
``.cbroker/fault-recovery.json``): for each fault, seconds from the fault until the
service did its work again (``back_s``), until a placement succeeded (``placing_s``) and
until the auditor passed (``audit_s``). docs/faults.md explains each fault.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import append_section  # noqa: E402
TARGET_S = 5.0


def report_path() -> Path:
    return Path(os.environ.get("CB_FAULT_REPORT") or ROOT / ".cbroker" / "fault-recovery.json")


def table(results: dict[str, dict]) -> str:
    lines = ["| fault | back (s) | placing (s) | auditor passes (s) | notes |", "|---|---:|---:|---:|---|"]
    for fault, r in results.items():
        lines.append(f"| {fault} | {r['back_s']:.2f} | {r['placing_s']:.2f} | {r['audit_s']:.2f} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-run", action="store_true", help="print the last run's report only")
    ap.add_argument("--write", action="store_true", help="append the table to docs/benchmarks-log.md")
    args = ap.parse_args()
    if not args.no_run:
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/faults/test_fault_suite.py",
                                "-p", "no:cacheprovider"], cwd=ROOT)
        if code:
            raise SystemExit(f"the fault suite failed (exit {code}); no report")
    results = json.loads(report_path().read_text())
    out = table(results)
    print(out)
    services = [r for f, r in results.items() if f.startswith("SIGKILL")]
    worst = max((r["back_s"] for r in services), default=float("nan"))
    verdict = "met" if worst <= TARGET_S else "MISSED"
    print(f"\nslowest service restart: {worst:.2f}s (target <= {TARGET_S:.0f}s: {verdict})")
    if args.write:
        append_section("Fault recovery", "python bench/fault_report.py",
                       f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; the whole "
                       "deployment (nats-server, redis-server, registry, two brokers, meter, load) on one machine. "
                       "Times from the fault; see docs/faults.md.\n\n"
                       + out + f"\n\nSlowest service restart {worst:.2f} s (target ≤ {TARGET_S:.0f} s: {verdict}).\n")


if __name__ == "__main__":
    main()
