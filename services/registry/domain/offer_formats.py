"""Other public offer formats, reshaped into SkyPilot ``vms.csv`` rows so that one
classifier (:func:`~services.registry.domain.importers.classify_skypilot`) applies the same
rules (models, memory, prices, regions, row reasons) to every source. Pure.

dstack's gpuhunt catalogue CSV (one file per provider, e.g. ``runpod.csv``): columns
``instance_name, location, price, cpu, memory, gpu_count, gpu_name, gpu_memory, spot``
(newer files add ``gpu_vendor``, ``disk_size``, ``flags``). ``price`` is USD per
instance-hour, ``gpu_memory`` GB per GPU, and each offer appears once per ``spot`` value:
the on-demand and spot rows of one (instance, location) become one offer with ``Price``
and ``SpotPrice``. A spot-only offer has no on-demand price and is reported as such.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["GPUHUNT_REQUIRED", "gpuhunt_to_skypilot"]

GPUHUNT_REQUIRED = ("instance_name", "location", "price", "gpu_count", "gpu_name", "spot")


def _gpu_info(name: str, count: str, memory_gb: str, vendor: str) -> str:
    try:
        mib = int(float(memory_gb) * 1024) if memory_gb.strip() else 0
        n = int(float(count)) if count.strip() else 0
    except ValueError:
        return ""
    maker = f"'Manufacturer': {vendor!r}, " if vendor else ""
    size = f", 'MemoryInfo': {{'SizeInMiB': {mib}}}" if mib else ""
    total = f", 'TotalGpuMemoryInMiB': {mib * n}" if mib and n else ""
    return f"{{'Gpus': [{{'Name': {name!r}, {maker}'Count': {n}{size}}}]{total}}}"


def gpuhunt_to_skypilot(rows: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """SkyPilot-shaped rows, in first-seen order; the on-demand and spot rows of one offer
    merge (the first of each kind wins)."""
    merged: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        key = ((row.get("instance_name") or "").strip(), (row.get("location") or "").strip())
        spot = (row.get("spot") or "").strip().lower() == "true"
        name = (row.get("gpu_name") or "").strip()
        offer = merged.setdefault(key, {
            "InstanceType": key[0], "AcceleratorName": name,
            "AcceleratorCount": (row.get("gpu_count") or "").strip() if name else "",
            "vCPUs": (row.get("cpu") or "").strip(), "MemoryGiB": (row.get("memory") or "").strip(),
            "Price": "", "SpotPrice": "", "Region": key[1],
            "GpuInfo": _gpu_info(name, row.get("gpu_count") or "", row.get("gpu_memory") or "",
                                 (row.get("gpu_vendor") or "").strip()) if name else "",
        })
        column = "SpotPrice" if spot else "Price"
        if not offer[column]:
            offer[column] = (row.get("price") or "").strip()
    return list(merged.values())
