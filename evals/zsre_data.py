"""The zsRE dev records (../shared/data/zsre/dev.jsonl) and their embeddings, cached per embedder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ZSRE = Path(os.environ.get("RATCHET_ZSRE", ROOT.parent / "shared" / "data" / "zsre" / "dev.jsonl"))
CACHE = ROOT / "reports" / "tmp"


def records(path: Path | None = None) -> list[dict]:
    with open(path or ZSRE) as f:
        return [json.loads(line) for line in f]


def nq_anchor_prompts(evaluated: list[dict], k: int = 150, path: Path | None = None,
                      rows: list[dict] | None = None) -> tuple[str, ...]:
    """Replay anchors like a user's everyday questions: `k` Natural Questions queries taken from
    the end of the file (`rows`: its records, when already read), none of them the locality
    question of an evaluated record (the file repeats some), so locality is measured on questions
    never trained on."""
    held_out = {r["locality_question"] for r in evaluated}
    later = [r["locality_question"] for r in reversed(records(path) if rows is None else rows)]
    return tuple(dict.fromkeys(q for q in later if q not in held_out))[:k]


def embed_cached(embedder, texts: list[str]) -> np.ndarray:
    """`embedder.embed(texts)`, kept in reports/tmp/ (ignored by git) between runs."""
    key = hashlib.sha256(("\n".join(texts) + "|" + embedder.name + "|" + embedder.backend).encode()).hexdigest()[:16]
    path = CACHE / f"vectors-{key}.npy"
    if path.exists():
        return np.load(path)
    vectors = np.vstack([embedder.embed_uncached(texts[i : i + 256]) for i in range(0, len(texts), 256)])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors
