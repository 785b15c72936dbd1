"""Turn public capacity/price catalogues into pool specs. Pure: no network, no Redis.

Two sources are understood:

* SkyPilot's public catalogue ``vms.csv`` (one row per instance type x region [x zone]):
  :func:`parse_skypilot`.
* Alibaba's GPU cluster trace node list ``openb_node_list_gpu_node.csv`` (one row per
  node): :func:`parse_alibaba_nodes`.

Both take the CSV *text* or an iterable of already-parsed dict rows, so they are testable
without files; :func:`read_csv_rows` reads a file into such rows. Nothing is dropped
silently: rows without accelerators are counted, names the catalogue does not know are
counted in ``unmapped``, regions the caller does not know are listed in
``unknown_regions`` (their pools are still returned: the caller decides), and malformed
rows are reported in ``errors`` as ``"row N: reason"`` (N counts data rows from 1).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import msgspec

from services.common.ids import is_valid_id
from services.common.messages import (
    MAX_SHARED_UNITS,
    MILLI,
    Accelerator,
    PoolSpec,
    Prices,
    Region,
    Sharing,
)

from .catalogue import load_catalogue, normalise_name, resolve, split_hints
from .cloud_regions import RegionResolver

__all__ = [
    "DEFAULT_ON_DEMAND_USD", "MAX_UNIT_PRICE", "SKYPILOT_REQUIRED", "FileError", "ImportResult", "RowOutcome",
    "check_columns", "classify_skypilot", "default_price", "make_pool_id", "parse_alibaba_nodes",
    "parse_skypilot", "read_catalogue_text", "read_csv_rows", "reason_kind", "sanitise_id",
]

Rows = Iterable[Mapping[str, Any]] | str

_PLACES = Decimal("0.000001")
_MAX_ID = 63
_MAX_UNITS = 1_000_000
_MAX_UNITS_PER_NODE = 1024
_MAX_PRICE = Decimal("1000000")

# Default on-demand price per unit-hour (USD) for sources that carry no prices (the
# Alibaba trace). Approximate public list prices, rounded, us regions, 2024:
#   T4 0.35, P100 1.46, V100 16GB 2.48, L4 ~0.71 (g2-standard-4): Google Cloud GPU pricing;
#   V100 32GB 3.90 = AWS p3dn.24xlarge 31.212 / 8; A10G 1.006 = AWS g5.xlarge;
#   A10 0.75, A100 40GB 1.29 (gpu_8x_a100 10.32 / 8), A100 80GB 1.79, H100 SXM 2.99:
#   Lambda Cloud list prices.
# Models not listed fall back to :func:`default_price` (a per-TFLOPS placeholder).
# These are defaults for simulation and demos, not quotes; pass ``prices=`` to override.
DEFAULT_ON_DEMAND_USD: Mapping[str, Decimal] = {
    "nvidia-t4": Decimal("0.35"),
    "nvidia-p100-pcie-16gb": Decimal("1.46"),
    "nvidia-v100-sxm2-16gb": Decimal("2.48"),
    "nvidia-v100-sxm2-32gb": Decimal("3.90"),
    "nvidia-a10": Decimal("0.75"),
    "nvidia-a10g": Decimal("1.006"),
    "nvidia-l4": Decimal("0.71"),
    "nvidia-a100-sxm-40gb": Decimal("1.29"),
    "nvidia-a100-sxm-80gb": Decimal("1.79"),
    "nvidia-h100-sxm-80gb": Decimal("2.99"),
}
_USD_PER_DENSE_TFLOP_HOUR = Decimal("0.004")
_MIN_PRICE = Decimal("0.10")


@dataclass
class ImportResult:
    """What an import produced and everything it could not use."""

    pools: list[tuple[str, PoolSpec]] = field(default_factory=list)
    skipped_no_accelerator: int = 0
    unmapped: Counter[str] = field(default_factory=Counter)
    unknown_regions: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    rows: int = 0  # data rows read
    outcomes: list[RowOutcome] = field(default_factory=list)  # one per data row (SkyPilot-shaped sources)
    new_regions: dict[str, Region] = field(default_factory=dict)  # regions the pools need added

    @property
    def units(self) -> int:
        return sum(spec.units for _, spec in self.pools)


class _RowError(ValueError):
    pass


# --- helpers -------------------------------------------------------------------------------
_BAD_ID_CHARS = re.compile(r"[^a-z0-9_-]+")
_DASH_RUNS = re.compile(r"-{2,}")


def sanitise_id(raw: str) -> str:
    """Lower-case, replace anything outside ``[a-z0-9_-]`` by ``-``, collapse dashes, trim
    leading/trailing separators. May return "" (the caller rejects it); not truncated."""
    s = _BAD_ID_CHARS.sub("-", raw.strip().lower())
    s = _DASH_RUNS.sub("-", s)
    return s.strip("-_")


def _short_hash(raw: str) -> str:
    return hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]


def _with_hash(base: str, raw: str) -> str:
    head = base[: _MAX_ID - 9].rstrip("-_")
    return f"{head}-{_short_hash(raw)}" if head else _short_hash(raw)


def make_pool_id(*parts: str) -> str:
    """Deterministic pool id from parts (empty parts skipped), valid per the id pattern.

    Ids longer than 63 characters are cut and get an 8-hex-digit hash of the raw key.
    """
    raw = "-".join(p.strip() for p in parts if p and p.strip())
    base = sanitise_id(raw)
    if not base or len(base) > _MAX_ID:
        return _with_hash(base, raw)
    return base


def _iter_rows(rows: Rows) -> Iterator[dict[str, str]]:
    if isinstance(rows, (bytes, bytearray)):
        rows = rows.decode("utf-8-sig")
    source: Iterable[Mapping[str, Any]] = csv.DictReader(io.StringIO(rows)) if isinstance(rows, str) else rows
    for row in source:
        clean: dict[str, str] = {}
        for key, value in row.items():
            if key is None:  # csv puts surplus fields under None
                continue
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            clean[str(key).strip()] = "" if value is None else str(value).strip()
        yield clean


def read_csv_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV file as dicts keyed by the (stripped) header names."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        yield from _iter_rows(csv.DictReader(f))


def _decimal(text: str, what: str, *, optional: bool = False) -> Decimal | None:
    t = text.strip()
    if not t or t.lower() in {"nan", "none", "null"}:
        if optional:
            return None
        raise _RowError(f"missing {what}")
    try:
        value = Decimal(t)
    except InvalidOperation:
        raise _RowError(f"bad {what} {text!r}") from None
    if not value.is_finite():
        if optional and value.is_nan():
            return None
        raise _RowError(f"bad {what} {text!r}")
    if value < 0:
        raise _RowError(f"negative {what} {text!r}")
    return value


def _count(text: str, what: str) -> int:
    value = _decimal(text, what, optional=True)
    if value is None:
        return 0
    if value != value.to_integral_value():
        raise _RowError(f"fractional {what} {text!r}")
    return int(value)


def _check(spec: PoolSpec) -> PoolSpec:
    """Validate against the wire contract (constructors do not check constraints)."""
    try:
        return msgspec.json.decode(msgspec.json.encode(spec), type=PoolSpec)
    except msgspec.ValidationError as exc:
        raise _RowError(f"invalid pool spec: {exc}") from None


def _host_arch(text: str) -> str:
    return "aarch64" if text.strip().lower() in {"arm64", "aarch64", "arm"} else "x86_64"


def _rank_variants(pending: list[tuple[int, str, str, PoolSpec]]) -> list[tuple[int, str, str, PoolSpec]]:
    """Rename the 2nd, 3rd... distinct spec of a raw key (by on-demand price, then spec)."""
    specs: dict[str, dict[bytes, PoolSpec]] = defaultdict(dict)
    for _, raw, _, spec in pending:
        specs[raw].setdefault(msgspec.json.encode(spec), spec)
    rank: dict[tuple[str, bytes], int] = {}
    for raw, variants in specs.items():
        ordered = sorted(variants.items(), key=lambda kv: (kv[1].prices.on_demand or kv[1].prices.interruptible,
                                                           kv[0]))
        rank.update({(raw, enc): k for k, (enc, _) in enumerate(ordered, start=1)})
    out = []
    for row_no, raw, base, spec in pending:
        k = rank[(raw, msgspec.json.encode(spec))]
        if k > 1:
            raw, base = f"{raw}#{k}", f"{base}-{k}"
            base = base if len(base) <= _MAX_ID else _with_hash(base, raw)
        out.append((row_no, raw, base, spec))
    return out


def _assign_ids(result: ImportResult, pending: list[tuple[int, str, str, PoolSpec]]) -> dict[int, str | None]:
    """Give pending pools their ids: ``(row, raw key, base id, spec)``.

    Two different raw keys that sanitise to the same id both get a hash suffix of their
    raw key, so ids do not depend on row order. A repeated raw key with the same spec is a
    duplicate offer: the first row wins and later ones are reported. A repeated raw key
    with a different spec is another offer of the same name (a marketplace's hosts:
    SimplePod lists ``gpu_4x_rtx4090_128`` in Europe-PL at 1.28 and at 1.36): the
    cheapest keeps the id, the k-th cheapest gets ``-k`` (ranked by price, not by row).
    """
    keys_by_base: dict[str, set[str]] = defaultdict(set)
    seen_raw: set[str] = set()
    unique: list[tuple[int, str, str, PoolSpec]] = []
    ids: dict[int, str | None] = {}
    for row_no, raw, base, spec in _rank_variants(pending):
        if raw in seen_raw:
            result.errors.append(f"row {row_no}: duplicate offer {raw!r}")
            ids[row_no] = None
            continue
        seen_raw.add(raw)
        keys_by_base[base].add(raw)
        unique.append((row_no, raw, base, spec))
    for row_no, raw, base, spec in unique:
        pool_id = _with_hash(base, raw) if len(keys_by_base[base]) > 1 else base
        result.pools.append((pool_id, spec))
        ids[row_no] = pool_id
    return ids


def _require_id(value: str, what: str) -> str:
    if not is_valid_id(value):
        raise ValueError(f"{what} {value!r} is not a valid id (lower-case a-z 0-9 _ -, max 63)")
    return value


# --- SkyPilot ------------------------------------------------------------------------------
SKYPILOT_REQUIRED = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Price", "Region")
# Ceiling on a price per unit-hour: above it a row is "absurd" (a typo or a sentinel such
# as 1e400) and reported, never registered. The dearest public GPU-hour is ~15 USD.
MAX_UNIT_PRICE = Decimal("1000")
_TPU_RE = re.compile(r"^tpu-(v\d+[a-z]*)-(\d+)$", re.IGNORECASE)
# TPU slice names count TensorCores for these generations (two per chip), chips otherwise.
_TPU_CORES_PER_CHIP = {"v2": 2, "v3": 2, "v4": 2, "v5p": 2}
_TPU_CHIPS_PER_HOST = {"v5litepod": 8, "v6e": 8}
_AARCH64_MODELS = frozenset({"nvidia-gh200-96gb"})
# SkyPilot's GCP catalogue writes 700.0 for TPU slices GCP lists no price for (seen for
# whole regions, e.g. southamerica-east1, next to real prices such as 691.2 for v6e-256).
_TPU_PLACEHOLDER_PRICE = Decimal("700")


class FileError(ValueError):
    """The file is not a catalogue of the expected format; one line says why."""


@dataclass(frozen=True)
class RowOutcome:
    """What became of one catalogue row. ``status``: ``ready`` (a pool spec to register),
    ``skipped`` (not an accelerator offer) or ``rejected`` (an offer that cannot be
    registered; ``reason`` says why). ``note`` records rules applied to a ready row."""

    row: int
    status: Literal["ready", "skipped", "rejected"]
    offer: str = ""
    region: str = ""
    reason: str = ""
    note: str = ""
    pool_id: str = ""
    model: str = ""
    memory_gib: float | None = None
    on_demand: Decimal | None = None
    interruptible: Decimal | None = None
    merged_into: int = 0  # a spot-only row whose price became the interruptible price of this row's offer


def check_columns(header: Iterable[str] | None, required: Iterable[str], what: str) -> None:
    """Raise :class:`FileError` when a CSV header lacks the columns ``what`` needs."""
    have = {h.strip() for h in header or () if h}
    missing = [c for c in required if c not in have]
    if missing:
        shown = ", ".join(sorted(have)[:8]) or "none"
        raise FileError(f"not a {what}: missing column(s) {', '.join(missing)} (columns found: {shown})")


def read_catalogue_text(data: bytes, what: str) -> str:
    """Decode a catalogue file, refusing what is not UTF-8 text or is JSON."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    head = text.lstrip()[:1]
    if not head:
        raise FileError("the file is empty")
    if head in "[{":
        raise FileError(f"this looks like JSON; a {what} is CSV")
    return text


# Hyperstack's GpuInfo mixes Python quotes with JSON's null ('Manufacturer': null).
_JSON_WORDS = re.compile(r"(?<=[:\[,\s])(?:null|true|false)(?=\s*[,}\]])")
_PY_WORDS = {"null": "None", "true": "True", "false": "False"}


@lru_cache(maxsize=4096)
def _gpu_info(text: str) -> tuple[str | None, str | None, int | None, int | None, str | None]:
    """(name, manufacturer, MemoryInfo MiB, TotalGpuMemoryInMiB, problem) from SkyPilot's
    Python-literal GpuInfo. Values under 1024 are GiB (RunPod writes 80 for 80 GB)."""
    if not text or not text.strip():
        return None, None, None, None, None
    if text.strip()[0] not in "{[":
        return text.strip(), None, None, None, None  # GCP writes the accelerator's name
    info: Any
    try:
        info = ast.literal_eval(_JSON_WORDS.sub(lambda m: _PY_WORDS[m.group(0)], text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            info = json.loads(text)
        except ValueError:
            return None, None, None, None, "GpuInfo is not a readable literal (ignored)"
    if not isinstance(info, dict):
        return None, None, None, None, "GpuInfo is not a mapping (ignored)"
    gpus = info.get("Gpus")
    first = gpus[0] if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict) else {}
    name = first.get("Name")
    maker = first.get("Manufacturer")
    memory = first.get("MemoryInfo")

    def mib(value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
            return None
        return int(value * 1024) if value < 1024 else int(value)

    return (name if isinstance(name, str) and name.strip() else None,
            maker if isinstance(maker, str) and maker.strip() else None,
            mib(memory.get("SizeInMiB")) if isinstance(memory, dict) else None,
            mib(info.get("TotalGpuMemoryInMiB")), None)


def _fit(acc: Accelerator, mib: int) -> float:
    """How far ``mib`` is from the model's memory (relative; 0 is exact)."""
    return abs(acc.memory_gib * 1024 - mib) / (acc.memory_gib * 1024)


def _memory_candidates(size: int | None, total: int | None, count: int) -> tuple[int, ...]:
    """Per-GPU memory readings of GpuInfo. Catalogues disagree whether ``SizeInMiB`` is per
    GPU (Lambda, AWS) or the instance's total (Vast.ai); when the total says so it is per
    GPU, else both readings are tried, the instance total first."""
    if size is None:
        return ()
    if count <= 1:
        return (size,)
    if total is not None and abs(total - size * count) <= 0.02 * total:
        # Prime Intellect writes the instance total as SizeInMiB *and* multiplies it again
        # in the total (8 x H100: 655360 and 5242880): the per-GPU share stays a candidate
        return (size, size // count)
    return (size // count, size)


def _form_hint(*texts: str) -> str | None:
    for text in texts:
        _, _, form = split_hints(text)
        if form:
            return form
    return None


def _sku_form(cloud: str, instance: str) -> str | None:
    """Form factors that only the provider's instance name tells (documented in
    docs/accelerators.md): Azure's NC A100 v4 is PCIe, its NC H100 v5 is H100 NVL; Lambda's
    gpu_1x_a100 is PCIe; RunPod and Paperspace sell "H100"/"A100-80GB" as PCIe cards unless
    they say SXM."""
    i = instance.lower()
    if cloud == "azure":
        if re.search(r"_nc\d+ads_a100_v4", i):
            return "pcie"
        if re.search(r"_ncc?\d+a?d?i?s?_h100_v5", i):
            return "nvl"
        if re.search(r"_nc\d+r?s_v3$", i):
            return "pcie"  # NCv3 is V100 PCIe; the ND40rs_v2 has the SXM2 boards
    if cloud == "lambda" and i == "gpu_1x_a100":
        return "pcie"  # Lambda's "1x A100 (40 GB PCIe)"; its SXM4 twin is gpu_1x_a100_sxm4
    if "hbm3" in i:
        return "sxm"  # "H100 80GB HBM3" is the SXM part; the PCIe card has HBM2e
    if cloud in {"runpod", "paperspace"} and "sxm" not in i:
        return "pcie"
    return None


@lru_cache(maxsize=4096)
def _resolve_model(name: str, info_name: str | None, maker: str | None, candidates: tuple[int, ...],
                   form: str | None, named_gib: int | None = None) -> tuple[Accelerator | None, int | None]:
    """Resolve the accelerator and the per-GPU memory reading that fits it best. When two
    readings fit two variants equally well (Prime Intellect's 2 x V100: 32768 MiB is the
    instance's total or one 32 GB card), the memory the instance name states
    (``datacrunch__2xV100_16GB__10__45``) decides."""
    best: tuple[float, int, Accelerator, int | None] | None = None
    for mib in candidates or (None,):
        for label in (name, info_name):
            if not label:
                continue
            acc = resolve(label, mib, maker, form)
            if acc is None:
                continue
            score = _fit(acc, mib) if mib else 0.5
            named = 0 if named_gib is None or abs(acc.memory_gib - named_gib) <= 1 else 1
            if best is None or score < best[0] - 1e-9 or (abs(score - best[0]) <= 1e-9 and named < best[1]):
                best = (score, named, acc, mib)
            break
    return (best[2], best[3]) if best else (None, None)


def _tpu(name: str) -> tuple[str, int, int] | None:
    """``tpu-v5p-8`` -> (``tpu-v5p``, chips, chips per host)."""
    m = _TPU_RE.match(name.strip())
    if not m:
        return None
    gen, n = m.group(1).lower(), int(m.group(2))
    chips = max(1, n // _TPU_CORES_PER_CHIP.get(gen, 1))
    return f"tpu-{gen}", chips, min(chips, _TPU_CHIPS_PER_HOST.get(gen, 4))


def _share_milli(count: Decimal, name: str, tpu: bool) -> int:
    """0 for a whole number of accelerators; for a share of one GPU (AWS G6f/Gr6f sell 1/8,
    1/4 or 1/2 of an L4: AcceleratorCount 0.125-0.5), the share in milli, which becomes the
    pool's ``min_milli`` (docs/sharing.md, "Listed shares"). A fraction above one, of a TPU,
    or below a thousandth of a device is not something a pool can sell."""
    if count == count.to_integral_value():
        return 0
    if count > 1 or tpu:
        raise _RowError(f"fractional AcceleratorCount {count} (more than one {name} but not a whole number): "
                        "not a whole unit")
    milli = int((count * MILLI).to_integral_value(rounding=ROUND_HALF_EVEN))
    if milli < 1:
        raise _RowError(f"fractional AcceleratorCount {count}: below a thousandth of one {name}")
    return milli


def _price(text: str, what: str) -> Decimal:
    value = _decimal(text, what)
    assert value is not None
    if value == 0:
        raise _RowError(f"{what} is 0 (not on sale)")
    return value


def _per_unit(total: Decimal, count: int | Decimal, what: str) -> Decimal:
    raw = total / count
    if raw > MAX_UNIT_PRICE:  # checked before rounding: 1e400 cannot be quantized
        raise _RowError(f"absurd {what} {total}: {raw:.6g} per GPU-hour is above the {MAX_UNIT_PRICE} ceiling")
    price = raw.quantize(_PLACES, rounding=ROUND_HALF_EVEN)
    if price <= 0:
        raise _RowError(f"{what} {total} is below 0.000001 per GPU-hour")
    return price


def _spot(text: str, count: int | Decimal, on_demand: Decimal,
          on_demand_total: Decimal) -> tuple[Decimal | None, str]:
    """The interruptible price per unit-hour and a note: missing, 0, unreadable or absurd
    spot prices, and spot above on-demand, mean no interruptible offer (never a rejection).
    Spot and on-demand are compared per instance, before rounding: Azure's 12-GPU
    ND96isr_H100_v5 lists 98.32 for both, which must not read as "spot above on-demand"."""
    t = text.strip()
    if not t or t.lower() in {"nan", "none", "null"}:
        return None, ""
    try:
        total = Decimal(t)
    except InvalidOperation:
        return None, f"SpotPrice {t!r} unreadable: no interruptible price"
    if not total.is_finite() or total <= 0:
        return None, f"SpotPrice {t} means no spot offer: no interruptible price"
    if total > on_demand_total:
        return None, f"SpotPrice {t} is above on-demand: ignored"
    price = (total / count).quantize(_PLACES, rounding=ROUND_HALF_EVEN)
    if price <= 0 or price > on_demand:
        return None, f"SpotPrice {t} is {'above on-demand' if price > 0 else 'below 0.000001'}: ignored"
    return price, ""


_SPOT_WORD = re.compile(r"[_-]+spot(?=$|[_-])", re.IGNORECASE)


def _merge_spot_rows(table: list[dict[str, str]]) -> dict[int, int]:
    """Spot-only rows (a SpotPrice, no Price) whose on-demand twin is in the file: the same
    instance type but for a ``spot`` word (DataCrunch's ``1A100.22V_SPOT``, Spheron's
    ``n3-A100x1-spot__CANADA-1``), region, zone, accelerator and count. The twin takes the
    spot price as its SpotPrice (when it has none); returns {spot row: twin row}, rows from 1."""
    def key(row: dict[str, str]) -> tuple[str, ...]:
        return (_SPOT_WORD.sub("", row.get("InstanceType", "")).lower(), row.get("Region", ""),
                row.get("AvailabilityZone", ""), row.get("AcceleratorName", ""), row.get("AcceleratorCount", ""))

    def spot_only(row: dict[str, str]) -> bool:
        return bool(row.get("AcceleratorName") and not row.get("Price") and row.get("SpotPrice"))

    on_demand = {key(r): n for n, r in enumerate(table, start=1) if r.get("Price") and not spot_only(r)}
    twins: dict[int, int] = {}
    for n, row in enumerate(table, start=1):
        twin = on_demand.get(key(row)) if spot_only(row) else None
        if twin is not None and not table[twin - 1].get("SpotPrice"):
            table[twin - 1]["SpotPrice"] = row["SpotPrice"]
            twins[n] = twin
    return twins


def classify_skypilot(rows: Rows, provider: str, regions: RegionResolver, *, units_per_offer: int = 1,
                      currency: str = "USD") -> tuple[list[RowOutcome], list[tuple[int, str, str, PoolSpec]],
                                                      dict[str, Region]]:
    """Classify every row of a SkyPilot ``vms.csv``: a pure function of the rows.

    Returns the row outcomes, the pending pools ``(row, raw key, base id, spec)`` and the
    regions to add to the topology. See :func:`parse_skypilot` for the rules."""
    outcomes: list[RowOutcome] = []
    pending: list[tuple[int, str, str, PoolSpec]] = []
    new_regions: dict[str, Region] = {}
    table = list(_iter_rows(rows))
    twins = _merge_spot_rows(table)
    for row_no, row in enumerate(table, start=1):
        name = row.get("AcceleratorName", "")
        instance = row.get("InstanceType", "")
        region_raw = row.get("Region", "")
        offer = instance or name
        if row_no in twins:
            outcomes.append(RowOutcome(row_no, "ready", offer, region_raw, merged_into=twins[row_no],
                                       note=f"spot-only row: its SpotPrice is the interruptible price of row "
                                            f"{twins[row_no]}'s offer"))
            continue
        try:
            if not name:
                outcomes.append(RowOutcome(row_no, "skipped", offer, region_raw, "no accelerator"))
                continue
            tpu = _tpu(name)
            count_value = _decimal(row.get("AcceleratorCount", ""), "AcceleratorCount", optional=True)
            if count_value is None or count_value == 0:
                outcomes.append(RowOutcome(row_no, "skipped", offer, region_raw, "no accelerator"))
                continue
            share = _share_milli(count_value, name, tpu is not None)
            count = 1 if share else int(count_value)
            per_node = count
            if tpu:
                name, count, per_node = tpu[0], tpu[1] * count, tpu[2]
            if count > _MAX_UNITS_PER_NODE * 64 or per_node > _MAX_UNITS_PER_NODE:
                raise _RowError(f"AcceleratorCount {count} out of range")
            info_name, maker, size, total, info_problem = _gpu_info("" if tpu else row.get("GpuInfo", ""))
            form = _form_hint(name, info_name or "", instance) or _sku_form(regions.cloud, instance)
            candidates = _memory_candidates(size, total, count)
            if share and size:  # AWS lists the slice's memory (2861 MiB for 1/8 of an L4): scale it up
                candidates = (size * MILLI // share, size)
            acc, mib = _resolve_model(name, info_name, maker, candidates, form, split_hints(instance)[1])
            if acc is None:
                raise _RowError(f"unknown accelerator {name!r}" + (f" (GpuInfo {info_name!r})" if info_name else ""))
            on_demand: Decimal | None
            gpus = Decimal(share) / MILLI if share else Decimal(count)  # GPUs an instance-hour buys
            if not row.get("Price") and row.get("SpotPrice"):
                # sold as spot only (Verda): an interruptible-only pool, never on-demand
                on_demand = None
                spot = _per_unit(_price(row["SpotPrice"], "SpotPrice"), gpus, "SpotPrice")
                note = "sold as spot only: interruptible pool, no on-demand price"
            else:
                price_total = _price(row.get("Price", ""), "Price")
                spot_text = row.get("SpotPrice", "")
                if tpu and price_total == _TPU_PLACEHOLDER_PRICE:
                    raise _RowError("Price 700.0 is SkyPilot's placeholder for a TPU slice GCP lists no price for")
                if tpu and spot_text.strip() in {"700", "700.0"}:
                    spot_text = ""
                on_demand = _per_unit(price_total, gpus, "Price")
                spot, note = _spot(spot_text, gpus, on_demand, price_total)
            where = regions.locate(region_raw, row.get("AvailabilityZone", ""))
            if isinstance(where, str):
                raise _RowError(where)
            units = count * units_per_offer
            if units > _MAX_UNITS or (share and units > MAX_SHARED_UNITS):
                raise _RowError(f"{units} units out of range" + (f" (a sharing pool has at most "
                                                                 f"{MAX_SHARED_UNITS} devices)" if share else ""))
            zone = row.get("AvailabilityZone", "")
            arch = "aarch64" if acc.model in _AARCH64_MODELS or name.lower() == "t4g" else _host_arch(row.get("Arch", ""))
            spec = _check(PoolSpec(
                region=where.id, zone=zone[:64], model=acc.model, units=units, units_per_node=per_node,
                host_arch=arch,  # type: ignore[arg-type]
                prices=Prices(currency=currency, on_demand=on_demand, interruptible=spot), provider=provider,
                availability="listed",
                # a listed slice is one size: never a larger share, never the whole device
                sharing=Sharing(mode="memory", min_milli=share, max_milli=share) if share else Sharing(),
            ))
        except _RowError as exc:
            outcomes.append(RowOutcome(row_no, "rejected", offer, region_raw, str(exc)))
            continue
        if share:
            shared = (f"a {share}/1000 share of one {name}: sharing pool (memory, min_milli = max_milli = {share}), "
                      f"prices per whole GPU-hour = instance price / {gpus.normalize():f}")
            note = "; ".join(n for n in (shared, note) if n)
        if where.region is not None:
            new_regions.setdefault(where.id, where.region)
        notes = "; ".join(n for n in (note, info_problem or "",
                                      f"region located by {where.source}" if where.source in {"derived", "location"}
                                      else f"location unknown: region {where.id}" if where.source == "unlocated"
                                      else "") if n)
        key_instance = instance or f"{row.get('AcceleratorName', '')}x{count_value.normalize():f}"
        raw_key = "-".join(p for p in (provider, region_raw, zone, key_instance) if p)
        pending.append((row_no, raw_key, make_pool_id(provider, region_raw, zone, key_instance), spec))
        outcomes.append(RowOutcome(row_no, "ready", offer, region_raw, note=notes, model=acc.model,
                                   memory_gib=acc.memory_gib, on_demand=on_demand, interruptible=spot))
    return outcomes, pending, new_regions


def parse_skypilot(rows: Rows, provider: str, known_regions: set[str] | frozenset[str] = frozenset(),
                   *, units_per_offer: int = 1, currency: str = "USD", cloud: str | None = None,
                   region_map: Mapping[str, Region | str] | None = None) -> ImportResult:
    """Pools from SkyPilot's ``vms.csv`` (columns InstanceType, AcceleratorName,
    AcceleratorCount, Price, Region, optionally GpuInfo, SpotPrice, AvailabilityZone, Arch).

    One pool per offer (instance type in a region/zone; GCP's attachable GPUs, which have
    no InstanceType, are offers of ``<name>x<count>``): ``units = AcceleratorCount *
    units_per_offer``, ``units_per_node = AcceleratorCount`` (TPU slices: chips, and
    chips per host). ``Price`` and ``SpotPrice`` are per instance-hour and become
    per-unit-hour ``on_demand`` / ``interruptible`` prices (6 places, half-even). A share of
    one GPU (AcceleratorCount below 1: AWS G6f) is a ``memory`` sharing pool of
    ``units_per_offer`` devices with ``min_milli`` = the share, priced per whole GPU-hour
    (instance price / share), so the sold share costs what the instance costs.
    Rules (docs/accelerators.md): Price missing, 0, unreadable or above
    :data:`MAX_UNIT_PRICE` per unit-hour rejects the row; a missing, 0, unreadable or
    absurd SpotPrice only drops the interruptible price. Regions go through
    :class:`RegionResolver` for ``cloud`` (default: the provider id); rows whose region
    cannot be located are rejected with the reason. Pool id:
    ``<provider>-<region>[-<zone>]-<instancetype>`` sanitised (see :func:`make_pool_id`),
    the same on every run, so a re-import updates the same pools.
    """
    _require_id(provider, "provider")
    if not isinstance(units_per_offer, int) or isinstance(units_per_offer, bool) or units_per_offer < 1:
        raise ValueError("units_per_offer must be a positive integer")
    known = {sanitise_id(r) for r in known_regions} | set(known_regions)
    resolver = RegionResolver(cloud or provider, known, region_map)
    outcomes, pending, new_regions = classify_skypilot(rows, provider, resolver, units_per_offer=units_per_offer,
                                                       currency=currency)
    result = ImportResult(new_regions=new_regions)
    for outcome in outcomes:
        result.rows += 1
        if outcome.status == "skipped":
            result.skipped_no_accelerator += 1
        elif outcome.status == "rejected":
            if outcome.reason.startswith("unknown accelerator"):
                result.unmapped[outcome.reason.split("'")[1]] += 1
            elif "map it with --region-map" in outcome.reason or "not a topology region" in outcome.reason:
                result.unknown_regions.add(outcome.region)
            result.errors.append(f"row {outcome.row}: {outcome.reason}")
    ids = _assign_ids(result, pending)
    result.outcomes = _with_ids(outcomes, ids)
    result.errors += [f"row {o.row}: {o.reason}" for o, before in zip(result.outcomes, outcomes, strict=True)
                      if o.status == "rejected" and before.merged_into]
    return result


def reason_kind(reason: str) -> str:
    """A row's reason without its row-specific values, to count reasons in a summary:
    "bad Price 'abc'" -> "bad Price"; names of accelerators and regions are kept."""
    for marker in (" '", ' "', ": "):
        if marker in reason:
            head = reason.split(marker)[0]
            if marker == " '" and reason.startswith(("unknown accelerator", "region")):
                return f"{head} {reason.split(marker)[1].split(chr(39))[0]!r}"
            return head
    return reason


def _with_ids(outcomes: list[RowOutcome], ids: Mapping[int, str | None]) -> list[RowOutcome]:
    """Fill in pool ids; a duplicate offer (id None) becomes a rejected row."""
    out = []
    by_row = {o.row: o for o in outcomes}
    for o in outcomes:
        if o.merged_into:
            twin = by_row.get(o.merged_into)
            if twin is None or twin.status != "ready" or not ids.get(twin.row):
                o = RowOutcome(o.row, "rejected", o.offer, o.region,
                               f"spot-only row: its on-demand row {o.merged_into} was not registered")
            elif twin.interruptible is None:
                o = RowOutcome(o.row, "rejected", o.offer, o.region,
                               f"spot-only row: its SpotPrice is not usable (row {twin.row}: {twin.note})")
            else:
                o = dataclasses.replace(o, pool_id=ids[twin.row] or "", model=twin.model, memory_gib=twin.memory_gib,
                                        on_demand=twin.on_demand, interruptible=twin.interruptible)
        elif o.status == "ready" and o.row in ids:
            pool_id = ids[o.row]
            o = (dataclasses.replace(o, pool_id=pool_id) if pool_id else
                 RowOutcome(o.row, "rejected", o.offer, o.region, "duplicate offer (an earlier row has it)"))
        out.append(o)
    return out


# --- Alibaba GPU trace ---------------------------------------------------------------------
def default_price(acc: Accelerator) -> Decimal:
    """Default on-demand USD per unit-hour: the table above, else a placeholder of
    0.004 USD per dense 16-bit TFLOPS (at least 0.10)."""
    if acc.model in DEFAULT_ON_DEMAND_USD:
        return DEFAULT_ON_DEMAND_USD[acc.model]
    tflops = Decimal(str(max(acc.bf16_tflops, acc.fp16_tflops)))
    return max(_MIN_PRICE, (tflops * _USD_PER_DENSE_TFLOP_HOUR).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


def parse_alibaba_nodes(rows: Rows, provider: str, region: str, assume: Mapping[str, str] | None = None,
                        *, prices: Mapping[str, Decimal] | None = None, currency: str = "USD") -> ImportResult:
    """Pools from Alibaba's ``openb_node_list_gpu_node.csv`` (``sn, cpu_milli, memory_mib,
    gpu, model``): one pool per node with ``units = units_per_node = gpu``.

    ``model`` goes through :func:`resolve` (V100M16, V100M32, P100, T4, A10 are in the
    catalogue). The undisclosed codes G1/G2/G3 resolve only through ``assume`` (e.g.
    ``{"G2": "nvidia-a10"}``, which also overrides any other name) and are otherwise
    counted in ``unmapped``. Prices: ``prices[model]`` if given, else
    :func:`default_price`.
    """
    _require_id(provider, "provider")
    _require_id(region, "region")
    catalogue = load_catalogue()
    assumed: dict[str, Accelerator] = {}
    for code, model in (assume or {}).items():
        if model not in catalogue:
            raise ValueError(f"assume[{code!r}] = {model!r} is not a catalogue model")
        assumed[normalise_name(code)] = catalogue[model]
    result = ImportResult()
    pending: list[tuple[int, str, str, PoolSpec]] = []
    for row_no, row in enumerate(_iter_rows(rows), start=1):
        result.rows += 1
        try:
            sn = row.get("sn", "")
            if not sn:
                raise _RowError("missing sn")
            gpus = _count(row.get("gpu", ""), "gpu")
            if gpus == 0:
                result.skipped_no_accelerator += 1
                continue
            model_name = row.get("model", "")
            if not model_name:
                raise _RowError("missing model")
            acc = assumed.get(normalise_name(model_name)) or resolve(model_name)
            if acc is None:
                result.unmapped[model_name] += 1
                continue
            if gpus > _MAX_UNITS_PER_NODE:
                raise _RowError(f"gpu {gpus} out of range")
            price = (prices or {}).get(acc.model)
            on_demand = Decimal(price) if price is not None else default_price(acc)
            spec = _check(PoolSpec(
                region=region, model=acc.model, units=gpus, units_per_node=gpus,
                prices=Prices(currency=currency, on_demand=on_demand.quantize(_PLACES, rounding=ROUND_HALF_EVEN)),
                provider=provider,
                availability="listed",
            ))
        except _RowError as exc:
            result.errors.append(f"row {row_no}: {exc}")
            continue
        raw_key = f"{provider}-{region}-{sn}"
        pending.append((row_no, raw_key, make_pool_id(provider, region, sn), spec))
    _assign_ids(result, pending)
    return result
