"""FAISS indexes over memory embeddings: normalised vectors, inner product, ids = memories.id.

One `VectorIndex` per scope (the shared memories, and each user's own), so a search can only
ever see the scopes it is asked for. An index is exact (a flat scan) while small; from
`APPROX_FROM` vectors on it is an inverted-file index (IVF-Flat), which, unlike HNSW, removes
ids in place — a retraction leaves the index at once. The indexes are a cache of SQLite: they
can always be rebuilt from the `memories` table, which keeps each memory's embedding.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from pathlib import Path

import faiss
import numpy as np

# One query at a time gains nothing from OpenMP, and on busy cores its threads wait on each other
# (reports/memory.md).
faiss.omp_set_num_threads(1)

# Where exact search stops being cheap and an IVF probe is faster (reports/memory.md).
APPROX_FROM = 20_000
NPROBE = 24  # lists probed per query; chosen in evals/memory_bench.py for recall@5 >= 0.95
RETRAIN_GROWTH = 4  # retrain the coarse quantiser when the index has grown this much since


def nlist_for(n: int) -> int:
    """Inverted lists for `n` vectors: about 2·sqrt(n) (so a probe scans a few thousand vectors),
    with at least 39 training points per list, as k-means wants."""
    return int(max(1, min(2 * math.sqrt(max(n, 1)), n // 39, 4096)))


def build_ivf(ids: np.ndarray, vectors: np.ndarray, dim: int, nlist: int | None = None,
              nprobe: int = NPROBE, seed: int = 0) -> faiss.Index:
    """An IVF-Flat (inner product) index trained on (a sample of) `vectors`, holding all of them."""
    n = len(vectors)
    nlist = nlist or nlist_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.max_points_per_centroid = 32  # train on <= 32·nlist points: seconds, not minutes, at 1M
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = vectors if n <= 32 * nlist else vectors[rng.choice(n, 32 * nlist, replace=False)]
    index.train(_f32(sample))
    index.add_with_ids(_f32(vectors), ids.astype(np.int64))
    index.nprobe = nprobe
    return index


def _ivf_ids(index: faiss.Index) -> np.ndarray:
    invlists = index.invlists
    parts = []
    for list_no in range(index.nlist):
        size = invlists.list_size(list_no)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class VectorIndex:
    """One scope's vectors: exact below `approx_from`, IVF from there on."""

    def __init__(self, path: str | Path, dim: int, *, approx_from: int = APPROX_FROM, nprobe: int = NPROBE):
        self.path = Path(path)
        self.dim = dim
        self.approx_from = approx_from
        self.nprobe = nprobe
        self._lock = threading.RLock()
        self._index = self._flat()
        self.trained_on = 0  # vectors in the index when the IVF quantiser was trained
        self.dirty = False

    def _flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self._index, faiss.IndexIVF) else "flat"

    def __len__(self) -> int:
        return self._index.ntotal

    def needs_retrain(self) -> bool:
        return self.kind == "ivf" and len(self) > RETRAIN_GROWTH * max(self.trained_on, 1)

    # -- files -----------------------------------------------------------------------------
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
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe
        with self._lock:
            self._index = index
            self.trained_on = int(index.ntotal) if isinstance(index, faiss.IndexIVF) else 0
            self.dirty = False
        return True

    def save(self) -> None:
        """Write atomically: a crash mid-write leaves the previous file, never half of one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
        with self._lock:  # searches wait only for the copy into memory, not for the disk
            data = faiss.serialize_index(self._index)
            self.dirty = False
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- contents --------------------------------------------------------------------------
    def ids(self) -> set[int]:
        with self._lock:
            if self._index.ntotal == 0:
                return set()
            if self.kind == "ivf":
                return set(_ivf_ids(self._index).tolist())
            return set(faiss.vector_to_array(self._index.id_map).tolist())

    def reset(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents: exact below `approx_from` vectors, IVF (freshly trained) from it."""
        if len(ids) >= self.approx_from:
            index = build_ivf(ids, vectors, self.dim, nprobe=self.nprobe)
            trained_on = len(ids)
        else:
            index = self._flat()
            trained_on = 0
            if len(ids):
                index.add_with_ids(_f32(vectors), ids.astype(np.int64))
        with self._lock:
            self._index = index
            self.trained_on = trained_on
            self.dirty = True

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = ids.astype(np.int64)
        with self._lock:
            if self.kind == "flat" and self._index.ntotal + len(ids) >= self.approx_from:
                old_ids, old_vectors = self._flat_contents()
                keep = ~np.isin(old_ids, ids)
                self.reset(np.concatenate([old_ids[keep], ids]), np.concatenate([old_vectors[keep], _f32(vectors)]))
                return
            self._index.remove_ids(ids)
            self._index.add_with_ids(_f32(vectors), ids)
            self.dirty = True

    def _flat_contents(self) -> tuple[np.ndarray, np.ndarray]:
        n = self._index.ntotal
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, n) if n else np.zeros((0, self.dim), np.float32)
        return ids, vectors

    def remove(self, ids: list[int]) -> int:
        with self._lock:
            removed = self._index.remove_ids(np.asarray(ids, dtype=np.int64))
            self.dirty = self.dirty or bool(removed)
            return int(removed)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (scores, ids), each of shape (n, k'); missing neighbours have id -1."""
        with self._lock:
            if self._index.ntotal == 0:
                n = len(vectors)
                return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
            k = max(1, min(k, self._index.ntotal))
            return self._index.search(_f32(vectors), k)


def scope_name(user: str | None) -> str:
    """The file stem of a scope's index: `shared`, or `user-` and a digest of the user's name."""
    if user is None:
        return "shared"
    return "user-" + hashlib.sha256(user.encode()).hexdigest()[:20]


class ScopedIndex:
    """The indexes of all scopes, in one folder: `shared.faiss` and one `user-*.faiss` per user."""

    def __init__(self, folder: str | Path, dim: int, *, approx_from: int = APPROX_FROM, nprobe: int = NPROBE):
        self.folder = Path(folder)
        self.dim = dim
        self.approx_from = approx_from
        self.nprobe = nprobe
        self._scopes: dict[str, VectorIndex] = {}
        self._lock = threading.Lock()

    def scope(self, user: str | None, *, load: bool = True) -> VectorIndex:
        name = scope_name(user)
        with self._lock:
            index = self._scopes.get(name)
            if index is None:
                index = VectorIndex(self.folder / f"{name}.faiss", self.dim, approx_from=self.approx_from,
                                    nprobe=self.nprobe)
                if load:
                    index.load()
                self._scopes[name] = index
            return index

    def __len__(self) -> int:
        return sum(len(i) for i in list(self._scopes.values()))

    def scopes(self) -> dict[str, VectorIndex]:
        with self._lock:
            return dict(self._scopes)

    def load_all(self) -> None:
        """Load every index file in the folder (stale or orphan ones are reconciled by the caller)."""
        for path in sorted(self.folder.glob("*.faiss")):
            with self._lock:
                if path.stem in self._scopes:
                    continue
                index = VectorIndex(path, self.dim, approx_from=self.approx_from, nprobe=self.nprobe)
                index.load()
                self._scopes[path.stem] = index

    def save(self, *, only_dirty: bool = True) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for index in self.scopes().values():
            if index.dirty or not only_dirty or (len(index) and not index.path.exists()):
                index.save()

    def search(self, users: list[str | None], vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The `k` best (id, score) pairs over the scopes of `users` (None = shared)."""
        pairs: list[tuple[int, float]] = []
        for user in users:
            index = self._scopes.get(scope_name(user))
            if index is None:
                continue  # a scope with no memories (load_all has read every file there is)
            scores, ids = index.search(vector[None, :], k)
            pairs += [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        pairs.sort(key=lambda p: -p[1])
        return pairs[:k]


def _f32(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)
