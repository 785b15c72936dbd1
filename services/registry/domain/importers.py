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
import hashlib
import io
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec

from services.common.ids import is_valid_id
from services.common.messages import Accelerator, PoolSpec, Prices

from .catalogue import load_catalogue, normalise_name, resolve

__all__ = [
    "DEFAULT_ON_DEMAND_USD", "ImportResult", "default_price", "make_pool_id", "parse_alibaba_nodes",
    "parse_skypilot", "read_csv_rows", "sanitise_id",
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


def _unit_price(total: Decimal, count: int, what: str) -> Decimal:
    price = (total / count).quantize(_PLACES, rounding=ROUND_HALF_EVEN)
    if price > _MAX_PRICE:
        raise _RowError(f"{what} {total} per unit-hour is out of range")
    return price


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


def _gpu_info(text: str) -> tuple[str | None, str | None, int | None]:
    """(name, manufacturer, memory MiB per GPU) from SkyPilot's Python-literal GpuInfo."""
    if not text or not text.strip():
        return None, None, None
    info: Any
    try:
        info = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            info = json.loads(text)
        except ValueError:
            return None, None, None
    if not isinstance(info, dict):
        return None, None, None
    gpus = info.get("Gpus")
    first = gpus[0] if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict) else {}
    name = first.get("Name")
    maker = first.get("Manufacturer")
    memory = first.get("MemoryInfo")
    size = memory.get("SizeInMiB") if isinstance(memory, dict) else None
    mib = int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0 else None
    return (name if isinstance(name, str) and name.strip() else None,
            maker if isinstance(maker, str) and maker.strip() else None,
            mib)


def _host_arch(text: str) -> str:
    return "aarch64" if text.strip().lower() in {"arm64", "aarch64", "arm"} else "x86_64"


def _assign_ids(result: ImportResult, pending: list[tuple[int, str, str, PoolSpec]]) -> None:
    """Give pending pools their ids: ``(row, raw key, base id, spec)``.

    Two different raw keys that sanitise to the same id both get a hash suffix of their
    raw key, so ids do not depend on row order. A repeated raw key is a duplicate offer:
    the first row wins and later ones are reported.
    """
    keys_by_base: dict[str, set[str]] = defaultdict(set)
    seen_raw: set[str] = set()
    unique: list[tuple[int, str, str, PoolSpec]] = []
    for row_no, raw, base, spec in pending:
        if raw in seen_raw:
            result.errors.append(f"row {row_no}: duplicate offer {raw!r}")
            continue
        seen_raw.add(raw)
        keys_by_base[base].add(raw)
        unique.append((row_no, raw, base, spec))
    for _row_no, raw, base, spec in unique:
        pool_id = _with_hash(base, raw) if len(keys_by_base[base]) > 1 else base
        result.pools.append((pool_id, spec))


def _require_id(value: str, what: str) -> str:
    if not is_valid_id(value):
        raise ValueError(f"{what} {value!r} is not a valid id (lower-case a-z 0-9 _ -, max 63)")
    return value


# --- SkyPilot ------------------------------------------------------------------------------
def parse_skypilot(rows: Rows, provider: str, known_regions: set[str] | frozenset[str] = frozenset(),
                   *, units_per_offer: int = 1, currency: str = "USD") -> ImportResult:
    """Pools from SkyPilot's ``vms.csv`` (columns InstanceType, AcceleratorName,
    AcceleratorCount, vCPUs, MemoryGiB, Price, Region, GpuInfo, SpotPrice, optionally
    AvailabilityZone and Arch).

    One pool per offer (instance type in a region/zone): ``units = AcceleratorCount *
    units_per_offer`` (how many instances of the offer are on sale), ``units_per_node =
    AcceleratorCount``; ``Price`` and ``SpotPrice`` are per instance-hour and become
    per-unit-hour ``on_demand`` / ``interruptible`` prices (6 places, half-even).
    Pool id: ``<provider>-<region>[-<zone>]-<instancetype>`` sanitised (see
    :func:`make_pool_id`).
    """
    _require_id(provider, "provider")
    if not isinstance(units_per_offer, int) or isinstance(units_per_offer, bool) or units_per_offer < 1:
        raise ValueError("units_per_offer must be a positive integer")
    known = {sanitise_id(r) for r in known_regions} | set(known_regions)
    result = ImportResult()
    pending: list[tuple[int, str, str, PoolSpec]] = []
    for row_no, row in enumerate(_iter_rows(rows), start=1):
        result.rows += 1
        try:
            name = row.get("AcceleratorName", "")
            count = _count(row.get("AcceleratorCount", ""), "AcceleratorCount") if name else 0
            if not name or count == 0:
                result.skipped_no_accelerator += 1
                continue
            instance = row.get("InstanceType", "")
            if not instance:
                raise _RowError("missing InstanceType")
            region_raw = row.get("Region", "")
            region = sanitise_id(region_raw)
            if not region or not is_valid_id(region):
                raise _RowError(f"bad Region {region_raw!r}")
            info_name, maker, memory_mib = _gpu_info(row.get("GpuInfo", ""))
            acc = resolve(name, memory_mib, maker)
            if acc is None and info_name:
                acc = resolve(info_name, memory_mib, maker)
            if acc is None:
                result.unmapped[name] += 1
                continue
            on_demand = _unit_price(_decimal(row.get("Price", ""), "Price"), count, "Price")  # type: ignore[arg-type]
            spot_total = _decimal(row.get("SpotPrice", ""), "SpotPrice", optional=True)
            spot = _unit_price(spot_total, count, "SpotPrice") if spot_total is not None else None
            units = count * units_per_offer
            if units > _MAX_UNITS or count > _MAX_UNITS_PER_NODE:
                raise _RowError(f"AcceleratorCount {count} out of range")
            zone = row.get("AvailabilityZone", "")
            spec = _check(PoolSpec(
                region=region, zone=zone, model=acc.model, units=units, units_per_node=count,
                host_arch=_host_arch(row.get("Arch", "")),  # type: ignore[arg-type]
                prices=Prices(currency=currency, on_demand=on_demand, interruptible=spot),
                provider=provider,
            ))
        except _RowError as exc:
            result.errors.append(f"row {row_no}: {exc}")
            continue
        if region not in known:
            result.unknown_regions.add(region)
        raw_key = "-".join(p for p in (provider, region_raw, zone, instance) if p)
        pending.append((row_no, raw_key, make_pool_id(provider, region, zone, instance), spec))
    _assign_ids(result, pending)
    return result


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
            ))
        except _RowError as exc:
            result.errors.append(f"row {row_no}: {exc}")
            continue
        raw_key = f"{provider}-{region}-{sn}"
        pending.append((row_no, raw_key, make_pool_id(provider, region, sn), spec))
    _assign_ids(result, pending)
    return result
