"""What discovery reports about one accelerator, whichever vendor tool it came from."""

from __future__ import annotations

import msgspec


class Device(msgspec.Struct, frozen=True, kw_only=True):
    """One accelerator as a vendor tool reports it.

    ``index`` is what the vendor's visibility variable takes (``CUDA_VISIBLE_DEVICES=3``,
    ``ASCEND_RT_VISIBLE_DEVICES=3``, ...); ``problems`` empty means healthy. ``model`` is
    the catalogue model it maps to, "" when it maps to none (``unmapped`` says why)."""

    vendor: str  # catalogue vendor: nvidia, amd, hygon, huawei, ...
    index: int
    name: str  # the product name exactly as the tool printed it
    source: str  # the tool (and output form) it came from: "nvidia-smi csv", "npu-smi info", ...
    uuid: str = ""
    bus_id: str = ""  # PCI address, normalised to lower-case dddd:bb:dd.f
    memory_mib: int | None = None
    device_id: str = ""  # PCI device id ("0x7408"), when the tool gives it
    problems: tuple[str, ...] = ()
    model: str = ""
    unmapped: str = ""

    @property
    def healthy(self) -> bool:
        return not self.problems


def normalise_bus_id(raw: str) -> str:
    """``00000000:01:00.0`` / ``0000:C1:00.0`` / ``0000:02:00`` → ``0000:01:00.0`` style:
    the last four hex digits of the domain, lower case (nvidia-smi prints an 8-digit
    domain, kernel logs and other tools a 4-digit one)."""
    raw = raw.strip().lower()
    if not raw or raw in ("n/a", "[n/a]"):
        return ""
    parts = raw.split(":")
    if len(parts) == 3:
        parts[0] = parts[0][-4:].rjust(4, "0")
    return ":".join(parts)
