"""Stand-ins that make tests fast: an embedder that needs no model."""

from __future__ import annotations

import hashlib

import numpy as np


class HashEmbedder:
    """Deterministic unit vectors from a hash of the normalised text: equal texts match exactly,
    different ones are nearly orthogonal. Fine for tests of bookkeeping, not of relevance."""

    name = "hash-test"
    dim = 32

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(" ".join(text.lower().split()).encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out
