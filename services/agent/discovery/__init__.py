"""Finds the host's accelerators from the vendors' own tools (whichever are on PATH) or
a static inventory, and maps each to a catalogue model. Parsers are pure functions of a
tool's output, so they are tested on outputs captured from real machines
(tests/data/agent/README.md says where each came from)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

from . import amd, ascend, nvidia
from .catalogue import Catalogue
from .model import Device

__all__ = ["Catalogue", "Device", "Inventory", "discover", "from_static"]

TOOL_TIMEOUT_S = 20.0


class Inventory(msgspec.Struct, frozen=True, kw_only=True):
    devices: tuple[Device, ...] = ()
    errors: tuple[str, ...] = ()  # a tool that was found but failed: said, not hidden

    @property
    def unmapped(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if not d.model)

    def healthy_units(self, model: str) -> int:
        """What the agent heartbeats for a pool of this model: its mapped, healthy devices."""
        return sum(1 for d in self.devices if d.model == model and d.healthy)

    def by_model(self) -> dict[str, list[Device]]:
        out: dict[str, list[Device]] = {}
        for device in self.devices:
            if device.model:
                out.setdefault(device.model, []).append(device)
        return out


async def _run(command: Sequence[str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), TOOL_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"{Path(command[0]).name} did not answer within {TOOL_TIMEOUT_S:g} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited {process.returncode}: {err.decode(errors='replace').strip()[:200]}")
    return out.decode(errors="replace")


async def _kernel_log(path: str | None) -> str:
    """Best effort: reading the kernel ring buffer needs privileges the agent may lack."""
    dmesg = shutil.which("dmesg", path=path)
    try:
        return await _run((dmesg,)) if dmesg else ""
    except RuntimeError:
        return ""


async def discover(catalogue: Catalogue, overrides: Mapping[str, str] | None = None,
                   path: str | None = None) -> Inventory:
    """Runs each vendor tool found on PATH (``path``: another search path) and maps what
    it reports. A tool that fails or hangs is reported in ``errors``, not raised."""
    devices: list[Device] = []
    errors: list[str] = []
    probes = [
        ("nvidia-smi", nvidia.QUERY_COMMAND, nvidia.parse_query_csv),
        ("rocm-smi", amd.COMMAND, amd.parse_rocm_smi_json),
        ("hy-smi", amd.HYGON_COMMAND, amd.parse_rocm_smi_json),
        ("npu-smi", ascend.COMMAND, ascend.parse_npu_smi_info),
    ]
    for tool, command, parse in probes:
        executable = shutil.which(tool, path=path)
        if not executable:
            continue
        try:
            found = parse(await _run((executable, *command[1:])))
        except (RuntimeError, ValueError, KeyError) as exc:
            errors.append(f"{tool}: {exc}")
            continue
        if tool == "nvidia-smi":
            found = nvidia.apply_xids(found, await _kernel_log(path))
        devices.extend(found)
    return Inventory(devices=tuple(catalogue.map(d, overrides) for d in devices), errors=tuple(errors))


def from_static(entries: Sequence[Mapping], catalogue: Catalogue) -> Inventory:
    """A provider's written inventory (``[[discovery.static]]``): trusted as given."""
    devices = []
    for entry in entries:
        model = catalogue.models.get(entry["model"])
        vendor = model["vendor"] if model else ""
        for index in entry["indices"]:
            devices.append(Device(vendor=vendor, index=index, name=entry["model"], source="static inventory",
                                  model=entry["model"] if model else "",
                                  unmapped="" if model else f"unknown model {entry['model']!r}"))
    return Inventory(devices=tuple(devices))
