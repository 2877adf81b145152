"""Keeping the FAISS indexes equal to SQLite: reconciled on every start, rebuilt on demand from the
stored embeddings, and written to disk by a background thread (SQLite is the truth, so a stale
file only means a little catching up on the next start)."""

from __future__ import annotations

import logging
import threading

import numpy as np

from memory.db import atomic
from memory.index import ScopedIndex, scope_name

log = logging.getLogger("ratchet.memory")

SAVE_EVERY_SECONDS = 30.0  # index files are written at most this often (and on close)


class IndexSync:
    def __init__(self, db, embedder, index: ScopedIndex):
        self.db, self.embedder, self.index = db, embedder, index
        self._wrote = threading.Event()
        self._closing = threading.Event()
        self._saver: threading.Thread | None = None

    def start(self) -> None:
        """Load the index files, reconcile them with SQLite, and start the background saver."""
        self.index.load_all()
        self.sync()
        self._saver = threading.Thread(target=self._save_in_background, name="ratchet-index-saver", daemon=True)
        self._saver.start()

    def wrote(self) -> None:
        """A memory was added or retracted: the index files are written soon."""
        self._wrote.set()

    def close(self) -> None:
        if self._saver is not None:
            self._closing.set()
            self._wrote.set()
            self._saver.join(timeout=60)
            self.index.save()

    def _live_by_scope(self) -> dict[str, tuple[str | None, set[int]]]:
        scopes: dict[str, tuple[str | None, set[int]]] = {}
        for memory_id, user in self.db.execute("select id, user from memories where retracted_at is null"):
            scopes.setdefault(scope_name(user), (user, set()))[1].add(memory_id)
        return scopes

    def sync(self) -> dict[str, int]:
        """Make the FAISS indexes hold exactly the live memories of SQLite; returns what changed."""
        with self.db.write_lock:  # no memory is added or retracted meanwhile
            return self._sync()

    def _sync(self) -> dict[str, int]:
        live = self._live_by_scope()
        added = removed = 0
        for name, index in self.index.scopes().items():
            if name not in live and len(index):
                removed += index.remove(sorted(index.ids()))
        for name, (user, ids) in live.items():
            index = self.index.scope(user)
            have = index.ids()
            extra, missing = sorted(have - ids), sorted(ids - have)
            if extra:
                removed += index.remove(extra)
            if missing:
                index.add(*self.vectors_for(missing))
                added += len(missing)
            if index.needs_retrain():
                index.reset(*self.vectors_for(sorted(ids)))
        self.index.save()
        return {"added": added, "removed": removed}

    def rebuild(self) -> int:
        """Throw the indexes away and build them again from SQLite (stored embeddings); memories
        acknowledged meanwhile wait for it, so none is missed."""
        with self.db.write_lock:
            return self._rebuild()

    def _rebuild(self) -> int:
        # Each scope's contents are replaced in one step, so a search meanwhile sees the old index or
        # the new one, never an empty one.
        live = self._live_by_scope()
        for name, index in self.index.scopes().items():
            if name not in live:
                index.reset(np.zeros(0, np.int64), np.zeros((0, self.index.dim), np.float32))
        total = 0
        for user, ids in live.values():
            self.index.scope(user).reset(*self.vectors_for(sorted(ids)))
            total += len(ids)
        self.index.save(only_dirty=False)
        return total

    def vectors_for(self, ids: list[int], batch: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
        """The stored embeddings of `ids`; rows without one (or from another embedder) are embedded
        now and the embedding stored."""
        out_ids, out_vectors = [], []
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                f"select id, question, embedding, embedder from memories where id in ({marks})", chunk
            ).fetchall()
            stale = [(i, q) for i, q, e, name in rows if e is None or name != self.embedder.name]
            fresh = {}
            if stale:
                vectors = self.embedder.embed([q for _, q in stale])
                fresh = {i: v for (i, _), v in zip(stale, vectors)}
                with atomic(self.db):
                    self.db.conn.executemany(
                        "update memories set embedding = ?, embedder = ? where id = ?",
                        [(v.tobytes(), self.embedder.name, i) for i, v in fresh.items()],
                    )
            for i, _, e, _ in rows:
                out_ids.append(i)
                out_vectors.append(fresh[i] if i in fresh else np.frombuffer(e, dtype=np.float32))
        if not out_ids:
            return np.zeros(0, np.int64), np.zeros((0, self.embedder.dim), np.float32)
        return np.asarray(out_ids, np.int64), np.vstack(out_vectors).astype(np.float32)

    def _save_in_background(self) -> None:
        """Write the changed index files, at most every SAVE_EVERY_SECONDS, off the request path."""
        while not self._closing.is_set():
            self._wrote.wait()
            self._wrote.clear()
            if self._closing.is_set():
                return
            try:
                self.index.save()
            except Exception:  # a full disk must not stop the memory; the next start catches up
                log.exception("could not write the index files")
            self._closing.wait(SAVE_EVERY_SECONDS)
