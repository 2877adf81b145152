"""The memory: interactions, feedback and the lessons drawn from them.

SQLite holds everything; the FAISS index over the lessons' questions is reconciled with it
whenever it is opened, so the two never disagree for long and a lost index file costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from memory.db import atomic, now, open_db
from memory.embed import Embedder
from memory.index import VectorIndex

LOCAL_USER = "local"  # who asks when nobody is named (no API keys, no `user` field)
# Cosine similarity a correction needs to be retrieved. On the first 1,000 zsRE records: a
# paraphrase scores >= 0.65 against its own question 99.1% of the time; an unrelated question
# reaches 0.65 against any of the 1,000 questions 0.1% of the time (0.60: 1.8%).
RELEVANCE_THRESHOLD = 0.65


class UnknownResponse(KeyError):
    """Feedback named a response id that Ratchet never gave."""


@dataclass(frozen=True)
class Correction:
    """A question and the answer a user says is right."""

    id: int
    question: str
    answer: str
    user: str | None
    created_at: str
    consolidated_in: int | None = None


@dataclass(frozen=True)
class Hit:
    correction: Correction
    score: float


class Memory:
    def __init__(self, data_dir: str | Path, embedder: Embedder | None = None):
        self.data_dir = Path(data_dir)
        self.db = open_db(self.data_dir / "ratchet.db")
        self.embedder = embedder or Embedder()
        self.index = VectorIndex(self.data_dir / "memories.faiss", self.embedder.dim)
        self.index.load()
        self.sync_index()

    # -- the index -----------------------------------------------------------------------
    def _live_ids(self) -> list[int]:
        return [r[0] for r in self.db.execute("select id from memories where retracted_at is null")]

    def sync_index(self) -> dict[str, int]:
        """Make the FAISS index hold exactly the live memories of SQLite; returns what changed."""
        live = set(self._live_ids())
        have = self.index.ids()
        extra, missing = sorted(have - live), sorted(live - have)
        if extra:
            self.index.remove(extra)
        if missing:
            self._index_rows(missing)
        if extra or missing or not self.index.path.exists():
            self.index.save()
        return {"added": len(missing), "removed": len(extra)}

    def rebuild_index(self) -> int:
        """Throw the index away and build it again from SQLite."""
        self.index.reset(np.zeros(0, np.int64), np.zeros((0, self.embedder.dim), np.float32))
        self.index.path.unlink(missing_ok=True)
        self.sync_index()
        return len(self.index)

    def _index_rows(self, ids: list[int], batch: int = 1024) -> None:
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(f"select id, question from memories where id in ({marks})", chunk).fetchall()
            vectors = self.embedder.embed([q for _, q in rows])
            self.index.add(np.array([i for i, _ in rows], np.int64), vectors)

    # -- interactions and feedback ---------------------------------------------------------
    def record_interaction(self, **fields: Any) -> str:
        row = dict(fields)
        for key in ("messages", "memory_ids"):
            if key in row and not isinstance(row[key], str):
                row[key] = json.dumps(row[key])
        row.setdefault("created_at", now())
        with atomic(self.db):
            self.db["interactions"].insert(row)
        return row["id"]

    def interaction(self, response_id: str) -> dict | None:
        rows = list(self.db["interactions"].rows_where("id = ?", [response_id]))
        return rows[0] if rows else None

    def record_feedback(
        self,
        response_id: str,
        rating: int,
        comment: str | None = None,
        correction: str | None = None,
        user: str | None = None,
    ) -> int:
        """Store feedback (committed before this returns); a correction becomes a memory."""
        interaction = self.interaction(response_id)
        if interaction is None:
            raise UnknownResponse(response_id)
        user = user or interaction["user"] or LOCAL_USER
        with atomic(self.db):
            feedback_id = self.db["feedback"].insert(
                {
                    "response_id": response_id,
                    "user": user,
                    "rating": rating,
                    "comment": comment,
                    "correction": correction,
                    "created_at": now(),
                }
            ).last_pk
            memory_id = None
            if correction and correction.strip():
                memory_id = self.db["memories"].insert(
                    {
                        "kind": "correction",
                        "user": user,
                        "question": interaction["prompt"],
                        "answer": correction.strip(),
                        "feedback_id": feedback_id,
                        "response_id": response_id,
                        "created_at": now(),
                    }
                ).last_pk
        if memory_id is not None:
            self._index_rows([memory_id])
            self.index.save()
        return feedback_id

    def add_correction(self, question: str, answer: str, user: str | None = LOCAL_USER) -> int:
        """A correction given directly (not as feedback on a response)."""
        with atomic(self.db):
            memory_id = self.db["memories"].insert(
                {"kind": "correction", "user": user, "question": question, "answer": answer, "created_at": now()}
            ).last_pk
        self._index_rows([memory_id])
        self.index.save()
        return memory_id

    # -- retrieval -----------------------------------------------------------------------
    def search(self, query: str, user: str | None, k: int = 3, threshold: float = RELEVANCE_THRESHOLD) -> list[Hit]:
        """The lessons visible to `user` nearest to `query`, best first, at or above `threshold`.

        Of several corrections of the same question the newest wins.
        """
        if len(self.index) == 0:
            return []
        scores, ids = self.index.search(self.embedder.embed([query]), k * 4)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and s >= threshold]
        if not pairs:
            return []
        rows = {c.id: c for c in self._corrections_where_ids([i for i, _ in pairs])}
        hits: list[Hit] = []
        seen_questions: set[str] = set()
        for memory_id, score in pairs:
            c = rows.get(memory_id)
            if c is None or (c.user is not None and c.user != user):
                continue
            key = _normal(c.question)
            if key in seen_questions:
                continue
            newest = self._newest_for_question(c, user)
            seen_questions.add(key)
            hits.append(Hit(newest, score))
            if len(hits) == k:
                break
        return hits

    def _newest_for_question(self, c: Correction, user: str | None) -> Correction:
        rows = list(self.db.query(
            "select * from memories where question = ? and retracted_at is null"
            " and (user is null or user = ?) order by created_at desc, id desc limit 1",
            [c.question, user],
        ))
        return _correction(rows[0]) if rows else c

    def _corrections_where_ids(self, ids: Iterable[int]) -> list[Correction]:
        ids = list(ids)
        marks = ",".join("?" * len(ids))
        rows = self.db.query(f"select * from memories where retracted_at is null and id in ({marks})", ids)
        return [_correction(r) for r in rows]

    # -- consolidation's view --------------------------------------------------------------
    def corrections(self, *, include_consolidated: bool = True) -> list[Correction]:
        """Live (not retracted) corrections, oldest first; the newest of each question only."""
        where = "retracted_at is null and kind = 'correction'"
        if not include_consolidated:
            where += " and consolidated_in is null"
        rows = list(self.db["memories"].rows_where(where, order_by="created_at, id"))
        newest: dict[str, dict] = {}
        for row in rows:
            newest[_normal(row["question"])] = row
        return [_correction(r) for r in sorted(newest.values(), key=lambda r: r["id"])]

    def mark_consolidated(self, ids: list[int], cycle_id: int) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with atomic(self.db):
            self.db.execute(f"update memories set consolidated_in = ? where id in ({marks})", [cycle_id, *ids])

    def retracted_consolidated_since(self, since: str) -> int:
        """How many corrections already trained into weights were retracted after `since`."""
        row = self.db.execute(
            "select count(*) from memories where consolidated_in is not null and retracted_at is not null"
            " and retracted_at > ?",
            [since],
        ).fetchone()
        return row[0]

    def close(self) -> None:
        self.index.save()
        self.db.conn.close()


def _correction(row: dict) -> Correction:
    return Correction(
        id=row["id"],
        question=row["question"],
        answer=row["answer"],
        user=row["user"],
        created_at=row["created_at"],
        consolidated_in=row["consolidated_in"],
    )


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?.! ")
