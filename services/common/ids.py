"""Identifier rules shared by every service.

Ids end up as NATS subject tokens and inside Redis keys, so they must never contain
dots, wildcards, braces or whitespace. One pattern, checked at every boundary.
"""

from __future__ import annotations

import re
import random
import time

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$(?!\n)"
_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


_rng = random.SystemRandom()
_tail = random.Random(_rng.getrandbits(64))


def new_id(kind: str) -> str:
    """Sortable, unique id: kind prefix, millisecond time, 48 random bits. Ids are not
    secrets (keys guard access), so a fast seeded generator is enough: the hot path
    makes several per placement."""
    return f"{kind}_{int(time.time() * 1000):x}{_tail.getrandbits(48):012x}"
