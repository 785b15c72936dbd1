"""Maps a discovered device to a catalogue model, or says plainly why it cannot.

The catalogue is the registry's (``GET /v1/accelerators``): each model has a vendor, a
display name, aliases and its memory. A device maps when its product name (or, for AMD,
the name its PCI device id stands for) equals a model's name or alias once case, the
vendor prefix and punctuation are set aside, and exactly one model of its vendor
matches. Never a guess: "Ascend910" (which 910?) or a redacted "xxx" stays unmapped,
and the provider names the model in ``agent.toml`` (``[discovery.models]``) instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import msgspec

from .amd import AMD_DEVICE_IDS
from .model import Device

_PREFIXES = ("nvidia ", "amd ", "huawei ", "ascend ", "tesla ", "instinct ", "hygon ", "cambricon ")


def _key(name: str) -> str:
    text = re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if text.startswith(prefix):
                text, changed = text[len(prefix):], True
    return text.replace(" ", "")


class Catalogue:
    """The models of one vendor by normalised name and alias."""

    def __init__(self, models: Iterable[Mapping]) -> None:
        self.models = {m["model"]: m for m in models}
        self._by_key: dict[tuple[str, str], set[str]] = {}
        for model in self.models.values():
            for name in (model.get("name", ""), *model.get("aliases", ())):
                self._by_key.setdefault((model["vendor"], _key(name)), set()).add(model["model"])

    def candidates(self, vendor: str, name: str) -> set[str]:
        return set(self._by_key.get((vendor, _key(name)), set())) if name else set()

    def map(self, device: Device, overrides: Mapping[str, str] | None = None) -> Device:
        """The device with ``model`` set, or ``unmapped`` saying why not."""
        if overrides and device.name in overrides:
            return msgspec.structs.replace(device, model=overrides[device.name], unmapped="")
        found = self.candidates(device.vendor, device.name)
        if not found and device.vendor == "amd" and device.device_id in AMD_DEVICE_IDS:
            found = self.candidates("amd", AMD_DEVICE_IDS[device.device_id])
        if len(found) > 1 and device.memory_mib:
            # the same name sold with different memory (A100 40/80 GB): the memory decides
            near = {m for m in found if abs(self.models[m].get("memory_gib", 0) * 1024 - device.memory_mib)
                    <= 0.1 * device.memory_mib}
            found = near or found
        if len(found) == 1:
            return msgspec.structs.replace(device, model=next(iter(found)), unmapped="")
        why = (f"{device.vendor} device {device.index} {device.name!r}: "
               + (f"matches several models ({', '.join(sorted(found))})" if found
                  else "no catalogue model has this name")
               + "; name it in agent.toml [discovery.models]")
        return msgspec.structs.replace(device, model="", unmapped=why)
