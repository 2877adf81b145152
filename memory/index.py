"""A FAISS index over memory embeddings: normalised vectors, inner product, ids = memories.id.

The index is a cache of SQLite: it can always be rebuilt from the `memories` table.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import faiss
import numpy as np


class VectorIndex:
    def __init__(self, path: str | Path, dim: int):
        self.path = Path(path)
        self.dim = dim
        self._lock = threading.Lock()
        self._index = self._empty()

    def _empty(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def __len__(self) -> int:
        return self._index.ntotal

    def load(self) -> bool:
        """Load the index file; False if it is missing or unreadable (then rebuild)."""
        if not self.path.exists():
            return False
        try:
            index = faiss.read_index(str(self.path))
        except RuntimeError:
            return False
        if index.d != self.dim:
            return False
        with self._lock:
            self._index = index
        return True

    def save(self) -> None:
        """Write atomically: a crash mid-write leaves the previous file, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with self._lock:
            faiss.write_index(self._index, str(tmp))
        os.replace(tmp, self.path)

    def ids(self) -> set[int]:
        with self._lock:
            n = self._index.ntotal
            if n == 0:
                return set()
            return set(faiss.vector_to_array(self._index.id_map).tolist())

    def reset(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        index = self._empty()
        if len(ids):
            index.add_with_ids(_f32(vectors), ids.astype(np.int64))
        with self._lock:
            self._index = index

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            self._index.remove_ids(ids.astype(np.int64))
            self._index.add_with_ids(_f32(vectors), ids.astype(np.int64))

    def remove(self, ids: list[int]) -> None:
        with self._lock:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores, ids), each of shape (n, k); missing neighbours have id -1."""
        with self._lock:
            k = max(1, min(k, self._index.ntotal))
            if self._index.ntotal == 0:
                n = len(vectors)
                return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
            return self._index.search(_f32(vectors), k)


def _f32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)
