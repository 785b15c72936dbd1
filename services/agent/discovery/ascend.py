"""Huawei Ascend: the table ``npu-smi info`` prints (it has no machine-readable form).

Each device is two table rows: ``| NPU  Name | Health | Power Temp Hugepages |`` then
``| Chip [Device|Phy-ID] | Bus-Id | AICore Memory HBM |``. A board with several chips
(Atlas 300I, 910C) repeats the NPU id with one row pair per chip. The index the runtime's
``ASCEND_RT_VISIBLE_DEVICES`` takes is the chip's logical id: the ``Device``/``Phy-ID``
column where the table has one, else the NPU id (one chip per NPU). Health other than
``OK`` (Warning, Alarm, Critical) is a problem. The process table that follows is ignored.
"""

from __future__ import annotations

import re

from .model import Device, normalise_bus_id

COMMAND = ("npu-smi", "info")

_FIRST = re.compile(r"^\|\s*(\d+)\s+(\S.*?)\s*\|\s*(\w+)\s*\|")
_SECOND = re.compile(r"^\|\s*(\d+)(?:\s+(\d+))?\s*\|\s*([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.\d)\s*\|(.*)\|")


def _hbm_mib(rest: str) -> int | None:
    """The last ``used / total`` pair of the second row is the HBM (or, on boards without
    HBM, the memory) in MB."""
    pairs = re.findall(r"(\d+)\s*/\s*(\d+)", rest)
    return int(pairs[-1][1]) if pairs else None


def parse_npu_smi_info(text: str) -> list[Device]:
    devices: list[Device] = []
    pending: tuple[int, str, str] | None = None
    for line in text.splitlines():
        if "Process id" in line:
            break  # the process table: nothing about devices below
        first = _FIRST.match(line)
        if first and not _SECOND.match(line) and first.group(3) not in ("Health", "Bus"):
            pending = (int(first.group(1)), first.group(2).strip(), first.group(3))
            continue
        second = _SECOND.match(line)
        if second and pending is not None:
            npu, name, health = pending
            logical = int(second.group(2)) if second.group(2) is not None else npu
            devices.append(Device(
                vendor="huawei", index=logical, name=name, source="npu-smi info",
                bus_id=normalise_bus_id(second.group(3)), memory_mib=_hbm_mib(second.group(4)),
                problems=() if health == "OK" else (f"npu-smi health {health}",)))
            pending = None
    return devices
