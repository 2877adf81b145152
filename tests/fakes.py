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


def png(width: int = 2, height: int = 2) -> bytes:
    """A valid grey PNG image, made without an imaging library."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))  # filter byte, then grey pixels
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_learning_report(reports_dir, name: str = "zsre-report-n200-k50", *, n: int = 200, cycle_every: int = 50,
                          split: str | None = "report", plots=("accuracy_per_cycle.png", "first_cycle_over_time.png")):
    """A folder as `ratchet eval zsre` writes it: results.json, report.md and the named plots."""
    import json
    from pathlib import Path

    folder = Path(reports_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    results = {"n": n, "cycle_every": cycle_every, "engine": "vllm", "tiers": "all", "seconds": 12.5,
               "summary": {}, "cycles": []}
    if split is not None:
        results["split"] = split
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "report.md").write_text(f"# zsRE learning benchmark: N={n}, a cycle every {cycle_every}\n\nText.\n")
    for plot in plots:
        (folder / plot).write_bytes(png())
    return folder
