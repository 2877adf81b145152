"""The memory, composed: one database, the embedder, the FAISS indexes, and its parts —
`corrections` (retrieval, visibility, consolidation's view), `interactions` (answers and
feedback), `failures` (failures without feedback, lessons), `sync` (indexes kept equal to SQLite).

Guarantees:
- a write (feedback, a correction, a retraction) is committed before the call returns;
- a user's memories are searched in that user's index only, and checked again against SQLite;
- of corrections of the same question the newest visible one wins; a repeat is merged into it;
- a retraction takes the memory out of its index at once and out of consolidation's view.
"""

from __future__ import annotations

from pathlib import Path

from memory.corrections import LOCAL_USER, Corrections
from memory.db import atomic, open_db
from memory.embed import Embedder
from memory.failures import Failures
from memory.index import APPROX_FROM, NPROBE, ScopedIndex
from memory.interactions import Interactions, UnknownResponse
from memory.sync import IndexSync


class Memory:
    def __init__(self, data_dir: str | Path, embedder: Embedder | None = None, *, open_index: bool = True,
                 embedder_dir: str | Path | None = None, approx_from: int = APPROX_FROM, nprobe: int = NPROBE,
                 matcher=None):
        """`open_index=False` opens the database only (listing, retracting); the indexes are
        then reconciled by the next process that opens them. `embedder_dir`: where the default
        embedder keeps its ONNX export. `matcher`: memory.matcher.Matcher, for searches that ask
        whether a hit is the same question (`same_at`)."""
        self.data_dir = Path(data_dir)
        self.db = open_db(self.data_dir / "ratchet.db")
        self.embedder = embedder or Embedder(cache_dir=embedder_dir)
        self.index = ScopedIndex(self.data_dir / "index", self.embedder.dim, approx_from=approx_from, nprobe=nprobe)
        self.sync = IndexSync(self.db, self.embedder, self.index)
        self.corrections = Corrections(self.db, self.embedder, self.index if open_index else None, self.sync.wrote,
                                       matcher=matcher)
        self.interactions = Interactions(self.db)
        self.failures = Failures(self.db, self.interactions, self.corrections, self.embedder)
        if open_index:
            self.sync.start()

    def search(self, query: str, user: str | None, **options):
        """The corrections `user` may see nearest to `query` (memory.corrections.Corrections.search)."""
        return self.corrections.search(query, user, **options)

    def add_correction(self, question: str, answer: str, user: str | None = LOCAL_USER, *,
                       source: str = "direct") -> int:
        """A correction given directly (not as feedback on a response); `user=None` shares it."""
        return self.corrections.add(question, answer, user, source=source)

    def record_feedback(self, response_id: str, rating: int, comment: str | None = None,
                        correction: str | None = None, user: str | None = None) -> int:
        """Store feedback on an answer (committed before this returns); a correction becomes a
        memory of the answer's question, in the same transaction. Returns the feedback's id."""
        interaction = self.interactions.get(response_id)
        if interaction is None:
            raise UnknownResponse(response_id)
        user = user or interaction["user"] or LOCAL_USER
        if not (correction and correction.strip()):
            with atomic(self.db):
                return self.interactions.add_feedback(response_id, user, rating, comment, correction)
        ids = {}

        def feedback_row() -> dict:
            ids["feedback"] = self.interactions.add_feedback(response_id, user, rating, comment, correction)
            return {"feedback_id": ids["feedback"], "response_id": response_id}

        self.corrections.add(interaction["prompt"] or "", correction, user, source="feedback", within=feedback_row)
        return ids["feedback"]

    def close(self) -> None:
        self.sync.close()
        self.db.conn.close()
