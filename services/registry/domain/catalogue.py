"""The accelerator catalogue and free-form name resolution.

The catalogue is packaged data (``accelerators.json`` next to this module), decoded and
validated with msgspec into :class:`~services.common.messages.Accelerator` records and
cached. No I/O besides reading that packaged file.

``resolve()`` maps the names that clouds, schedulers and trace files use for a card
("A100", "a100-80gb", "NVIDIA A100-SXM4-80GB", "Tesla V100", "V100M32", "910B4", ...) to one
catalogue model. Rules, in order (documented in ``docs/accelerators.md``):

1. The name is normalised: lower-cased, with spaces, dashes, underscores, dots, slashes and
   brackets removed ("NVIDIA A100 80GB" -> "nvidiaa10080gb").
2. An exact match on a model id, display name or alias wins. Explicit names beat memory
   hints: "A100-80GB" is the 80 GB card whatever ``memory_mib`` says.
3. A *family* name ("A100", "V100", "H100", "910B") covers several variants. With a memory
   hint the variant with the nearest memory is chosen (ties go to the default); without
   one, the family's documented default (the first member of :data:`FAMILIES`).
4. If nothing matched, leading vendor / brand words ("nvidia", "tesla", "geforce",
   "amd", "instinct", "huawei", "ascend", "habana", ...) are stripped and steps 2-3 retried.
5. If still nothing matched and the raw name ends in a separated memory size
   ("A100-40G", "V100 32GB", "910B 32GB"), the size becomes the memory hint for the rest
   of the name.
6. ``vendor``, when it names a known vendor (synonyms such as "Habana" -> intel are
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
    "normalise_vendor", "resolve",
]

_DATA_FILE = "accelerators.json"

# Family name (normalised) -> member model ids; the FIRST member is the default variant
# used when no memory hint is given. SkyPilot's "A100" is the 40 GB SXM part and its
# "A100-80GB" the 80 GB one; "V100" on every public cloud catalogue defaults to 16 GB.
FAMILIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "a100": ("nvidia-a100-sxm-40gb", "nvidia-a100-sxm-80gb"),
    "v100": ("nvidia-v100-sxm2-16gb", "nvidia-v100-sxm2-32gb"),
    "h100": ("nvidia-h100-sxm-80gb", "nvidia-h100-pcie-80gb"),
    "910b": ("huawei-ascend-910b", "huawei-ascend-910b2", "huawei-ascend-910b4"),
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
_MEMORY_SUFFIX_RE = re.compile(r"^(?P<base>.*?\S)[\s\-_/]+(?P<size>\d{1,4})\s*(?:gb|gib|g)$", re.IGNORECASE)


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


def _lookup(key: str, memory_mib: int | None, vendor: str | None) -> Accelerator | None:
    cat = _catalogue()
    if key in cat.index:
        acc = cat.models[cat.index[key]]
        return acc if vendor is None or acc.vendor == vendor else None
    if key in FAMILIES:
        members = [cat.models[m] for m in FAMILIES[key]]
        return _pick([a for a in members if vendor is None or a.vendor == vendor], memory_mib)
    return None


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix) and len(key) > len(prefix):
                key, changed = key[len(prefix):], True
    return key


def _resolve_key(name: str, memory_mib: int | None, vendor: str | None) -> Accelerator | None:
    key = normalise_name(name)
    if not key:
        return None
    found = _lookup(key, memory_mib, vendor)
    if found is None:
        stripped = _strip_prefixes(key)
        if stripped != key:
            found = _lookup(stripped, memory_mib, vendor)
    return found


def resolve(name: str, memory_mib: int | None = None, vendor: str | None = None) -> Accelerator | None:
    """Map a free-form accelerator name to a catalogue model, or ``None`` when unknown.

    ``memory_mib`` (per card) picks among the variants of a family name; ``vendor``
    restricts the match to one vendor when it is a recognised vendor name.
    """
    if not isinstance(name, str) or not name.strip():
        return None
    vendor_id = normalise_vendor(vendor)
    found = _resolve_key(name, memory_mib, vendor_id)
    if found is None:
        match = _MEMORY_SUFFIX_RE.match(name.strip())
        if match:
            size_gib = int(match.group("size"))
            if size_gib > 0:
                found = _resolve_key(match.group("base"), size_gib * 1024, vendor_id)
                # A size that contradicts an explicitly named single model is not a match.
                if found is not None and abs(found.memory_gib - size_gib) > max(2.0, 0.1 * size_gib):
                    found = None
    return found
