"""Seeds derived from integers and tags, stable across processes, machines and Python versions.

Training and sampling draw every random number from a generator seeded by what it is for (``(seed, step, rank)``
for a training step, ``(seed, chunk, "sample")`` for a chunk of samples): the stream is a pure function of the
position, so resuming, sharding across processes and reordering work reproduce it exactly.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the BLAKE2b hash of ``",".join(parts)`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(*parts: int | str, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


__all__ = ["derive_seed", "seeded_generator"]
