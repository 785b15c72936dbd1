"""The accelerator catalogue and free-form name resolution.

The catalogue is packaged data (``accelerators.json`` next to this module), decoded and
validated with msgspec into :class:`~services.common.messages.Accelerator` records and
cached. No I/O besides reading that packaged file.

``resolve()`` maps the names that clouds, schedulers and trace files use for a card
("A100", "a100-80gb", "NVIDIA A100-SXM4-80GB", "A100-80G-PCIe", "H100-SXM5", "Tesla V100",
"V100M32", "910B4", ...) to one catalogue model. Rules, in order (documented in
``docs/accelerators.md``):

1. The name is normalised: lower-cased, with spaces, dashes, underscores, dots, slashes and
   brackets removed ("NVIDIA A100 80GB" -> "nvidiaa10080gb").
2. An exact match on a model id, display name or alias wins: explicit names beat hints.
3. Otherwise the name is split into words; a form-factor word ("SXM", "SXM4", "SXM5",
   "NVLink" = SXM unless the name also says PCIe, "PCIe", "NVL", "OAM") and a memory word ("80GB", "80G", "40GiB") are
   taken out as hints, and the rest is looked up. A hint written in the name beats one
   given by the caller.
4. A *family* name ("A100", "V100", "H100", "H200", "RTX6000", "910B", ...) covers several
   variants. A form-factor hint keeps only the variants of that form factor; a memory hint
   then picks the variant with the nearest memory (ties go to the earlier, default one);
   without hints, the family's documented default (the first member of :data:`FAMILIES`).
5. A memory or form factor written in the name that contradicts the model found is not a
   match ("T4 48GB", "L4-SXM" resolve to None).
6. Leading vendor / brand words ("nvidia", "tesla", "geforce", "amd", "instinct",
   "huawei", "ascend", "habana", ...) are stripped and the lookup retried.
7. ``vendor``, when it names a known vendor (synonyms such as "Habana" -> intel are
   understood), filters candidates; an unrecognised vendor string is ignored.

Anything else resolves to ``None``: callers report it, never guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from types import MappingProxyType
from typing import NamedTuple, get_args

import msgspec

from services.common.messages import Accelerator, Vendor

__all__ = [
    "DEFAULT_VARIANT", "FAMILIES", "CatalogueError", "load_catalogue", "normalise_name",
    "normalise_vendor", "resolve", "split_hints",
]

_DATA_FILE = "accelerators.json"

# Family name (normalised) -> member model ids; the FIRST member is the default variant
# used when no memory hint is given. SkyPilot's "A100" is the 40 GB SXM part and its
# "A100-80GB" the 80 GB one; "V100" on every public cloud catalogue defaults to 16 GB.
# "RTX6000" is Lambda's Quadro RTX 6000 (24 GB) by default; other clouds' GpuInfo memory
# picks the Ada (48 GB) or Blackwell RTX PRO (96 GB) part.
FAMILIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "a100": ("nvidia-a100-sxm-40gb", "nvidia-a100-sxm-80gb", "nvidia-a100-pcie-40gb", "nvidia-a100-pcie-80gb"),
    "v100": ("nvidia-v100-sxm2-16gb", "nvidia-v100-sxm2-32gb", "nvidia-v100-pcie-16gb", "nvidia-v100-pcie-32gb"),
    "a800": ("nvidia-a800-sxm-80gb", "nvidia-a800-pcie-80gb"),
    "h100": ("nvidia-h100-sxm-80gb", "nvidia-h100-pcie-80gb", "nvidia-h100-nvl-94gb"),
    "h200": ("nvidia-h200-sxm-141gb", "nvidia-h200-nvl-141gb"),
    "910b": ("huawei-ascend-910b", "huawei-ascend-910b2", "huawei-ascend-910b4"),
    "rtx6000": ("nvidia-quadro-rtx-6000", "nvidia-rtx-6000-ada", "nvidia-rtx-pro-6000"),
    "rtx3060": ("nvidia-rtx-3060", "nvidia-rtx-3060-ti"),
    "rtx4060": ("nvidia-rtx-4060", "nvidia-rtx-4060-ti-16gb"),
    "rtx4070": ("nvidia-rtx-4070", "nvidia-rtx-4070-ti-super"),
})
DEFAULT_VARIANT: Mapping[str, str] = MappingProxyType({k: v[0] for k, v in FAMILIES.items()})

# Brand words that may precede a model name and carry no extra information.
_PREFIXES = (
    "nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "radeon", "huawei", "hisilicon",
    "ascend", "intel", "habana", "cambricon", "hygon", "kunlunxin", "kunlun", "baidu",
    "moorethreads", "mthreads", "iluvatar", "biren", "google", "cloud", "aws", "amazon",
)

_VENDORS: frozenset[str] = frozenset(get_args(Vendor))
_VENDOR_SYNONYMS: Mapping[str, str] = MappingProxyType({
    "nvidiacorporation": "nvidia",
    "advancedmicrodevices": "amd",
    "ati": "amd",
    "habana": "intel",
    "habanalabs": "intel",
    "intelhabana": "intel",
    "huaweitechnologies": "huawei",
    "hisilicon": "huawei",
    "ascend": "huawei",
    "moorethreads": "moore-threads",
    "mthreads": "moore-threads",
    "kunlun": "kunlunxin",
    "baidu": "kunlunxin",
    "amazon": "aws",
    "amazonwebservices": "aws",
    "googlecloud": "google",
    "gcp": "google",
    "iluvatarcorex": "iluvatar",
})

_STRIP_RE = re.compile(r"[\s\-_./()\[\],]+")
_WORD_RE = re.compile(r"[\s\-_/(),]+")
_MEMORY_WORD_RE = re.compile(r"^(\d{1,4})(?:gb|gib|g)$")
_FORM_WORDS: Mapping[str, str] = MappingProxyType({
    "sxm": "sxm", "sxm2": "sxm", "sxm3": "sxm", "sxm4": "sxm", "sxm5": "sxm", "sxm6": "sxm", "nvlink": "sxm",
    "pcie": "pcie", "pci": "pcie", "nvl": "nvl", "oam": "oam",
})
# Words that say nothing about the card: memory kinds, and how the host is rented or sized
# (Spheron's "H100_PCIE_BAREMETAL", "A6000_PCIE_HIGH_PERF", "A6000_PCIE_LOW_RAM").
_NOISE_WORDS = frozenset({"hbm", "hbm2", "hbm2e", "hbm3", "hbm3e", "gddr6", "gddr6x", "gddr7", "baremetal",
                          "high", "perf", "low", "ram"})


class CatalogueError(ValueError):
    """The packaged catalogue is inconsistent (duplicate ids or names)."""


def normalise_name(name: str) -> str:
    """Lower-case and drop spaces, dashes, underscores, dots, slashes and brackets."""
    return _STRIP_RE.sub("", name.strip().lower())


def normalise_vendor(vendor: str | None) -> str | None:
    """Map a free-form manufacturer string to a catalogue vendor, or None if unknown."""
    if not vendor or not vendor.strip():
        return None
    raw = vendor.strip().lower()
    if raw in _VENDORS:
        return raw
    key = normalise_name(raw)
    if key in _VENDORS:
        return key
    return _VENDOR_SYNONYMS.get(key)


class _Catalogue(NamedTuple):
    models: Mapping[str, Accelerator]
    index: Mapping[str, str]  # normalised id / name / alias -> model id


@lru_cache(maxsize=1)
def _catalogue() -> _Catalogue:
    data = resources.files(__package__).joinpath(_DATA_FILE).read_bytes()
    accelerators = msgspec.json.decode(data, type=list[Accelerator])
    models: dict[str, Accelerator] = {}
    index: dict[str, str] = {}
    for acc in accelerators:
        if acc.model in models:
            raise CatalogueError(f"duplicate model id {acc.model!r}")
        models[acc.model] = acc
    for acc in accelerators:
        for label in (acc.model, acc.name, *acc.aliases):
            key = normalise_name(label)
            if not key:
                raise CatalogueError(f"{acc.model}: empty name or alias {label!r}")
            if key in FAMILIES:
                raise CatalogueError(f"{acc.model}: {label!r} is a family name ({key!r})")
            owner = index.setdefault(key, acc.model)
            if owner != acc.model:
                raise CatalogueError(f"{label!r} names both {owner!r} and {acc.model!r}")
    for family, members in FAMILIES.items():
        for member in members:
            if member not in models:
                raise CatalogueError(f"family {family!r} names unknown model {member!r}")
    return _Catalogue(models=MappingProxyType(models), index=MappingProxyType(index))


def load_catalogue() -> dict[str, Accelerator]:
    """Every catalogue model keyed by model id (a fresh dict; the records are frozen)."""
    return dict(_catalogue().models)


def _pick(candidates: list[Accelerator], memory_mib: int | None) -> Accelerator | None:
    if not candidates:
        return None
    if memory_mib is None or memory_mib <= 0:
        return candidates[0]
    # min() keeps the first of equal distances, so ties go to the default variant.
    return min(candidates, key=lambda a: abs(a.memory_gib * 1024 - memory_mib))


def _memory_fits(acc: Accelerator, memory_gib: int) -> bool:
    return abs(acc.memory_gib - memory_gib) <= max(2.0, 0.1 * memory_gib)


class _Hints(NamedTuple):
    memory_mib: int | None
    form_factor: str | None
    memory_strict: bool = False  # written in the name: a contradiction means no match
    form_strict: bool = False


def _lookup(key: str, hints: _Hints, vendor: str | None) -> Accelerator | None:
    cat = _catalogue()
    if key in cat.index:
        acc = cat.models[cat.index[key]]
        if vendor is not None and acc.vendor != vendor:
            return None
        if hints.form_strict and acc.form_factor != hints.form_factor:
            return None
        if hints.memory_strict and not _memory_fits(acc, (hints.memory_mib or 0) // 1024):
            return None
        if hints.form_factor and acc.form_factor != hints.form_factor and not hints.form_strict:
            # "A100-80GB" from a cloud that rents the PCIe card: same family and memory, that form
            return next((cat.models[m] for members in FAMILIES.values() if acc.model in members for m in members
                         if cat.models[m].form_factor == hints.form_factor
                         and cat.models[m].memory_gib == acc.memory_gib), acc)
        return acc
    if key not in FAMILIES:
        return None
    members = [cat.models[m] for m in FAMILIES[key] if vendor is None or cat.models[m].vendor == vendor]
    if hints.form_factor:
        shaped = [a for a in members if a.form_factor == hints.form_factor]
        if shaped or hints.form_strict:
            members = shaped
    found = _pick(members, hints.memory_mib)
    if found is not None and hints.memory_strict and not _memory_fits(found, (hints.memory_mib or 0) // 1024):
        return None
    return found


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key, changed = key[len(prefix):], True
    return key


def _lookup_both(key: str, hints: _Hints, vendor: str | None) -> Accelerator | None:
    if not key:
        return None
    found = _lookup(key, hints, vendor)
    if found is None:
        stripped = _strip_prefixes(key)
        if stripped != key:
            found = _lookup(stripped, hints, vendor)
    return found


def split_hints(name: str) -> tuple[str, int | None, str | None]:
    """``(base name, memory GiB, form factor)`` with the memory and form-factor words of
    ``name`` taken out: "A100-80G-PCIe" -> ("a100", 80, "pcie")."""
    base: list[str] = []
    memory: int | None = None
    form: str | None = None
    for word in _WORD_RE.split(name.strip().lower()):
        if not word or word in _NOISE_WORDS:
            continue
        if word in _FORM_WORDS:
            # "A100-80G-PCIe-NVLink" is PCIe cards joined by an NVLink bridge, not SXM
            if not (word == "nvlink" and form == "pcie"):
                form = _FORM_WORDS[word]
        elif (m := _MEMORY_WORD_RE.match(word)) and int(m.group(1)) > 0:
            memory = int(m.group(1))
        else:
            base.append(word)
    return "".join(base), memory, form


def resolve(name: str, memory_mib: int | None = None, vendor: str | None = None,
            form_factor: str | None = None) -> Accelerator | None:
    """Map a free-form accelerator name to a catalogue model, or ``None`` when unknown.

    ``memory_mib`` (per card) and ``form_factor`` ("sxm", "pcie", "nvl", "oam") pick
    among the variants of a family name; ``vendor`` restricts the match to one vendor
    when it is a recognised vendor name.
    """
    if not isinstance(name, str) or not name.strip():
        return None
    vendor_id = normalise_vendor(vendor)
    loose = _Hints(memory_mib if memory_mib and memory_mib > 0 else None, form_factor)
    found = _lookup_both(normalise_name(name), loose, vendor_id)
    if found is not None:
        return found
    base, memory_gib, form = split_hints(name)
    if memory_gib is None and form is None:
        return None
    named = _Hints(memory_gib * 1024 if memory_gib else loose.memory_mib, form or form_factor,
                   memory_strict=memory_gib is not None, form_strict=form is not None)
    return _lookup_both(base, named, vendor_id)
