"""NVIDIA: ``nvidia-smi --query-gpu=… --format=csv[,noheader][,nounits]``, ``nvidia-smi -q -x``,
and the driver's Xid lines in the kernel log.

A device is unhealthy when the driver says its memory is not trustworthy: volatile
uncorrected ECC errors, a pending page retirement or row remap, a failed row remap, or
a critical Xid (the GPU fell off the bus, double-bit ECC, ...). Fields a GPU does not
support read ``[N/A]``/``N/A`` and never count as a problem.
"""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET

import msgspec

from .model import Device, normalise_bus_id

# what the agent asks for; nvidia-smi answers in exactly this column order
QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "pci.bus_id", "temperature.gpu",
                "ecc.errors.uncorrected.volatile.total")
QUERY_COMMAND = ("nvidia-smi", "--query-gpu=" + ",".join(QUERY_FIELDS), "--format=csv,noheader,nounits")
XML_COMMAND = ("nvidia-smi", "-q", "-x")

# Xids that mean the GPU cannot be trusted with a tenant's work until it is reset or
# replaced (NVIDIA's Xid catalogue: "GPU has fallen off the bus", double-bit ECC, row
# remapping failure, uncontained ECC, NVLink errors, GSP errors, ...)
CRITICAL_XIDS = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})

# nvidia-smi accepts several names for one property
_ALIASES = {"gpu_uuid": "uuid", "gpu_name": "name", "gpu_bus_id": "pci.bus_id"}

_NA = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]"}


def _value(raw: str | None) -> str:
    raw = (raw or "").strip()
    return "" if raw.lower() in _NA or raw.lower().startswith("[requested functionality") else raw


def _number(raw: str | None) -> int | None:
    """``81559``, ``81559 MiB``, ``0`` → int; ``[N/A]`` → None."""
    raw = _value(raw)
    match = re.match(r"^(-?\d+)", raw)
    return int(match.group(1)) if match else None


def parse_query_csv(text: str, fields: tuple[str, ...] = QUERY_FIELDS) -> list[Device]:
    """Rows of ``--query-gpu`` CSV. With a header line (``--format=csv``) the header names
    the columns (``memory.total [MiB]`` → ``memory.total``); without one (``noheader``)
    ``fields`` must be the query that produced it."""
    rows = [r for r in csv.reader(io.StringIO(text), skipinitialspace=True) if r]
    if not rows:
        return []
    header = [c.split(" [")[0].strip() for c in rows[0]]
    if "name" in header or "index" in header:
        columns, rows = header, rows[1:]
    else:
        columns = list(fields)
    devices = []
    for position, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"nvidia-smi row {position + 1} has {len(row)} columns, expected {len(columns)}")
        cell = {_ALIASES.get(c, c): v for c, v in zip(columns, row)}
        index = _number(cell.get("index"))
        problems = []
        ecc = _number(cell.get("ecc.errors.uncorrected.volatile.total"))
        if ecc:
            problems.append(f"{ecc} volatile uncorrected ECC errors")
        if _value(cell.get("retired_pages.pending")).lower() == "yes":
            problems.append("page retirement pending")
        if _value(cell.get("remapped_rows.pending")).lower() == "yes":
            problems.append("row remap pending (reset required)")
        if _value(cell.get("remapped_rows.failure")).lower() == "yes":
            problems.append("row remap failed")
        devices.append(Device(
            vendor="nvidia", index=position if index is None else index, name=_value(cell.get("name")),
            source="nvidia-smi csv", uuid=_value(cell.get("uuid")),
            bus_id=normalise_bus_id(cell.get("pci.bus_id", "")),
            memory_mib=_number(cell.get("memory.total")), problems=tuple(problems)))
    return devices


def _text(node: ET.Element | None, path: str) -> str:
    found = node.find(path) if node is not None else None
    return _value(found.text if found is not None else "")


def parse_query_xml(text: str) -> list[Device]:
    """``nvidia-smi -q -x``. The index is the GPU's position in the file, which is
    nvidia-smi's enumeration order (the one ``CUDA_VISIBLE_DEVICES`` uses when
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; nvidia-smi sorts by PCI bus id)."""
    root = ET.fromstring(text)
    devices = []
    for position, gpu in enumerate(root.findall("gpu")):
        problems = []
        volatile = gpu.find("ecc_errors/volatile")
        if volatile is not None:
            for child in volatile:
                if "uncorrectable" in child.tag and (_number(child.text) or 0) > 0:
                    problems.append(f"{child.text.strip()} volatile {child.tag.replace('_', ' ')} ECC errors")
        if _text(gpu, "retired_pages/pending_retirement").lower() == "yes":
            problems.append("page retirement pending")
        if _text(gpu, "remapped_rows/remapped_row_pending").lower() == "yes":
            problems.append("row remap pending (reset required)")
        if _text(gpu, "remapped_rows/remapped_row_failure").lower() == "yes":
            problems.append("row remap failed")
        devices.append(Device(
            vendor="nvidia", index=position, name=_text(gpu, "product_name"), source="nvidia-smi -q -x",
            uuid=_text(gpu, "uuid"), bus_id=normalise_bus_id(gpu.get("id", "") or _text(gpu, "pci/pci_bus_id")),
            memory_mib=_number(_text(gpu, "fb_memory_usage/total")),
            device_id=_text(gpu, "pci/pci_device_id").lower(), problems=tuple(problems)))
    return devices


_XID = re.compile(r"NVRM: Xid \(PCI:([0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2})(?:\.\d)?\)[^:]*: (\d+)")


def parse_xids(log: str) -> list[tuple[str, int, str]]:
    """``(bus, xid, line)`` for each driver Xid line in a kernel log (``dmesg``,
    ``journalctl -k``); ``bus`` is ``dddd:bb:dd`` (the driver leaves the function off)."""
    events = []
    for line in log.splitlines():
        match = _XID.search(line)
        if match:
            events.append((normalise_bus_id(match.group(1)), int(match.group(2)), line.split("NVRM: ", 1)[1].strip()))
    return events


def apply_xids(devices: list[Device], log: str) -> list[Device]:
    """Marks a device unhealthy for each critical Xid on its PCI address."""
    critical: dict[str, list[str]] = {}
    for bus, xid, line in parse_xids(log):
        if xid in CRITICAL_XIDS:
            critical.setdefault(bus, []).append(line)
    out = []
    for device in devices:
        lines = critical.get(device.bus_id.rsplit(".", 1)[0], [])
        out.append(msgspec.structs.replace(device, problems=device.problems + tuple(lines)) if lines else device)
    return out

