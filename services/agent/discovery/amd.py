"""AMD and Hygon: ``rocm-smi --showproductname --showmeminfo vram --showuniqueid --json``
(Hygon's DTK ships the same tool, also as ``hy-smi``; its JSON says "DCU" where AMD's
says "GPU").

rocm-smi names a card by marketing series ("AMD INSTINCT MI200 (MCM) OAM …"), which
does not always name the model; the PCI device id does, so a small table from the PCI
ID database (pci-ids.ucw.cz) maps the data-centre parts that are unambiguous there.
"""

from __future__ import annotations

import json
import re

from .model import Device, normalise_bus_id

COMMAND = ("rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showuniqueid", "--showbus", "--json")
HYGON_COMMAND = ("hy-smi", "--showproductname", "--showmeminfo", "vram", "--showuniqueid", "--showbus", "--json")

# PCI device id → product name, from pci.ids (vendor 1002); only ids naming one model
AMD_DEVICE_IDS = {
    "0x7408": "AMD Instinct MI250X",
    "0x740f": "AMD Instinct MI210",
    "0x74a1": "AMD Instinct MI300X",
    "0x74a5": "AMD Instinct MI325X",
}


def _memory_mib(card: dict) -> int | None:
    for key, value in card.items():
        lowered = key.lower()
        if lowered.startswith("vram total memory") and "used" not in lowered:
            unit = re.search(r"\((\w+)\)", key)
            try:
                amount = int(value)
            except (TypeError, ValueError):
                return None
            return amount // (1024 * 1024) if unit and unit.group(1) == "B" else amount
    return None


def parse_rocm_smi_json(text: str) -> list[Device]:
    data = json.loads(text)
    devices = []
    for key, card in data.items():
        match = re.fullmatch(r"card(\d+)", key)
        if not match or not isinstance(card, dict):
            continue  # "system" and other non-card sections
        vendor_text = card.get("Card Vendor", "") or card.get("Card vendor", "")
        vendor = "hygon" if ("Haiguang" in vendor_text or any("DCU" in k for k in card)) else "amd"
        device_id = (card.get("Device ID") or card.get("Card Model") or "").lower()
        name = card.get("Card Series") or card.get("Card series") or card.get("Device Name") or ""
        devices.append(Device(
            vendor=vendor, index=int(match.group(1)), name=name.strip(), source="rocm-smi --json",
            uuid=str(card.get("Unique ID", "")).replace("N/A", ""),
            bus_id=normalise_bus_id(card.get("PCI Bus", "")), memory_mib=_memory_mib(card),
            device_id=device_id if device_id.startswith("0x") else ""))
    return sorted(devices, key=lambda d: d.index)
