"""Corrections: the memories retrieval puts into prompts and consolidation puts into weights.

Each is a row of `memories` with its embedding, in the FAISS index of its scope (the shared
one, or its user's). A write is committed before the call returns; of corrections of the same
question (same key, or near-identical wording) the newest visible one wins, and a correction that
repeats a live one with the same answer is merged into it; a retraction leaves the index at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from memory.db import atomic, now
from memory.index import ScopedIndex
from memory.text import SAME_QUESTION_SCORE, normalise, question_key

LOCAL_USER = "local"  # who asks when nobody is named (no API keys, no `user` field)
# Cosine similarity a correction needs to be retrieved: paraphrases of its question reach it, other
# subjects' questions in the same style rarely do; a wrong fact in the prompt is worse than none
# (reports/memory_calibration.md).
RELEVANCE_THRESHOLD = 0.875
# The adapter's scope: a question at least this similar to a stored correction is answered by the
# active adapter, any other by the base model (reports/memory_calibration.md).
ADAPTER_SCOPE = 0.7
MAX_PROMPT_CHARS = 2000  # questions + answers put into one prompt, at most (the first always goes)


# The memories a listing shows (Corrections.visible), by whether they were retracted.
VISIBLE_STATES = {"live": "retracted_at is null", "retracted": "retracted_at is not null", "all": "1"}


class UnknownMemory(KeyError):
    """No memory with that id is visible to the caller."""


class NotAllowed(PermissionError):
    """The caller may see this memory but not change it (a shared memory, for a non-admin)."""


@dataclass(frozen=True)
class Correction:
    """A question and the answer a user says is right."""

    id: int
    question: str
    answer: str
    user: str | None
    created_at: str
    consolidated_in: int | None = None
    retracted_at: str | None = None
    retracted_by: str | None = None
    merged: int = 0
    source: str | None = None
    confirmed_at: str | None = None  # an admin vouched for it

    @property
    def shared(self) -> bool:
        return self.user is None


@dataclass(frozen=True)
class Hit:
    correction: Correction
    score: float  # cosine similarity of the query to the correction's question
    same: float | None = None  # P(same question), when a matcher read them (memory.matcher)


class Corrections:
    """The `memories` table and its FAISS indexes: add, retrieve, see, retract, and what
    consolidation needs. `index` None: the database only (no retrieval). `matcher`: a
    memory.matcher.Matcher, which search may ask whether a hit is the same question."""

    def __init__(self, db, embedder, index: ScopedIndex | None, on_write: Callable[[], None] = lambda: None,
                 matcher=None):
        self.db, self.embedder, self.index, self._on_write = db, embedder, index, on_write
        self.matcher = matcher

    # -- adding ------------------------------------------------------------------------------
    def add(self, question: str, answer: str, user: str | None = LOCAL_USER, *, source: str = "direct",
            within: Callable[[], dict] | None = None) -> int:
        """Store a correction (`user=None` shares it); returns its id, or the older one's it was merged
        into. `within`: more writes to commit in the same transaction, returning extra columns."""
        answer = answer.strip()
        vector = self.embedder.embed([question])[0]
        duplicate = self._duplicate_of(question, answer, user, vector)
        with atomic(self.db):
            extra = within() if within else {}
            if duplicate is not None:
                self.db.execute("update memories set merged = merged + 1, updated_at = ? where id = ?",
                                [now(), duplicate])
                memory_id = duplicate
            else:
                stamp = now()
                memory_id = self.db["memories"].insert(
                    {"kind": "correction", "user": user, "question": question, "question_key": question_key(question),
                     "answer": answer, "embedding": vector.astype(np.float32).tobytes(),
                     "embedder": self.embedder.name, "created_at": stamp, "updated_at": stamp, "merged": 0,
                     "source": source, **extra}
                ).last_pk
                if self.index is not None:  # under the write lock, so a rebuild of the index cannot miss it
                    self.index.scope(user).add(np.array([memory_id], np.int64), vector[None, :])
        self._on_write()
        return memory_id

    def _duplicate_of(self, question: str, answer: str, user: str | None, vector: np.ndarray) -> int | None:
        """The live memory of the same scope that this correction repeats: the newest correction of
        the same (or a near-identical) question, with the same answer."""
        candidates = self._rows_where("question_key = ? and user is ?", [question_key(question), user])
        if self.index is not None:
            scores, ids = self.index.scope(user).search(vector[None, :], 4)
            near = [int(i) for i, s in zip(ids[0], scores[0]) if i >= 0 and s >= SAME_QUESTION_SCORE]
            candidates += [r for r in self._rows_where_ids(near) if r["user"] == user]
        if not candidates:
            return None
        newest = max(candidates, key=lambda r: (r["created_at"], r["id"]))
        return newest["id"] if normalise(newest["answer"]) == normalise(answer) else None

    # -- retrieval -----------------------------------------------------------------------
    def search(self, query: str, user: str | None, k: int = 3, threshold: float = RELEVANCE_THRESHOLD,
               max_chars: int | None = MAX_PROMPT_CHARS, same_at: float | None = None) -> list[Hit]:
        """The corrections visible to `user` (theirs and the shared ones) nearest to `query`, best
        first, at or above `threshold`; at most `k`, and at most `max_chars` of text after the first.
        Of several corrections of the same question the newest wins. `same_at`: with a matcher,
        only corrections at least this likely to be the question asked (memory.matcher)."""
        if self.index is None or len(self.index) == 0 or k <= 0:
            return []
        vector = self.embedder.embed([query])[0]
        scopes = [None] if user is None else [None, user]
        pairs = [(i, s) for i, s in self.index.search(scopes, vector, max(4 * k, 16)) if s >= threshold]
        if not pairs:
            return []
        rows = {r["id"]: r for r in self._rows_where_ids([i for i, _ in pairs])}
        groups: list[tuple[float, list[dict]]] = []  # best score, members (the first is the best)
        for memory_id, score in pairs:
            row = rows.get(memory_id)
            if row is None or (row["user"] is not None and row["user"] != user):
                continue  # retracted since the index saw it, or (never) another user's
            vec = np.frombuffer(row["embedding"], np.float32)
            for _, members in groups:
                lead = members[0]
                if row["question_key"] == lead["question_key"] or float(vec @ lead["_vec"]) >= SAME_QUESTION_SCORE:
                    members.append(row)
                    break
            else:
                row["_vec"] = vec
                groups.append((score, [row]))
        # (score, the newest correction of its question, P(same question) or None), found as needed
        chosen = ((score, self._newest_of(members, user), None) for score, members in groups)
        if self.matcher is not None and same_at is not None:
            chosen = list(chosen)  # the matcher reads all candidates in one batch
            same = self.matcher.probability(query, [r["question"] for _, r, _ in chosen])
            # near in wording but another question (e.g. about the same subject): left out
            chosen = [(score, r, float(p)) for (score, r, _), p in zip(chosen, same) if p >= same_at]
        hits: list[Hit] = []
        used = 0
        for score, newest, p in chosen:
            size = len(newest["question"]) + len(newest["answer"])
            if hits and max_chars is not None and used + size > max_chars:
                continue
            hits.append(Hit(_correction(newest), score, None if p is None else round(p, 4)))
            used += size
            if len(hits) == k:
                break
        return hits

    def _newest_of(self, members: list[dict], user: str | None) -> dict:
        """Of a group of hits on one question, the newest visible correction of that question."""
        same_key = self._newest_visible(members[0]["question_key"], user)
        return max(members + ([same_key] if same_key else []), key=lambda r: (r["created_at"], r["id"]))

    def _newest_visible(self, key: str, user: str | None) -> dict | None:
        rows = list(self.db.query(
            "select * from memories where question_key = ? and retracted_at is null"
            " and (user is null or user is ?) order by created_at desc, id desc limit 1",
            [key, user],
        ))
        return rows[0] if rows else None

    def _rows_where(self, where: str, params: list, live: bool = True) -> list[dict]:
        sql = f"select * from memories where ({where})" + (" and retracted_at is null" if live else "")
        return list(self.db.query(sql, params))

    def _rows_where_ids(self, ids: Iterable[int], live: bool = True) -> list[dict]:
        ids = list(ids)
        if not ids:
            return []
        return self._rows_where(f"id in ({','.join('?' * len(ids))})", ids, live)

    # -- what a caller may see and change ----------------------------------------------------
    def get(self, memory_id: int, user: str | None, *, admin: bool = False) -> Correction:
        """The memory, if `user` may see it (theirs or shared; an admin sees all), retracted or not."""
        rows = self._rows_where_ids([memory_id], live=False)
        if not rows or not (admin or rows[0]["user"] is None or rows[0]["user"] == user):
            raise UnknownMemory(memory_id)
        return _correction(rows[0])

    def count(self, user: str | None) -> int:
        """How many live memories `user` keeps (None: the shared ones)."""
        return self.db.execute("select count(*) from memories where user is ? and retracted_at is null",
                               [user]).fetchone()[0]

    def visible(self, user: str | None, *, limit: int = 50, offset: int = 0, state: str = "live") -> list[Correction]:
        """The memories `user` may see, newest first: live ones, retracted ones, or all (`state`)."""
        where = VISIBLE_STATES.get(state)
        if where is None:
            raise ValueError(f"state must be one of {', '.join(VISIBLE_STATES)}, not {state!r}")
        rows = self.db.query(
            f"select * from memories where {where} and (user is null or user is ?)"
            " order by created_at desc, id desc limit ? offset ?",
            [user, limit, offset],
        )
        return [_correction(r) for r in rows]

    def retract(self, memory_id: int, by: str | None, *, admin: bool = False) -> Correction:
        """Take a memory out of retrieval at once (by the user who gave it, or an admin) and mark
        it for the next consolidation. Retracting twice is harmless."""
        memory = self.get(memory_id, by, admin=admin)
        if not admin and memory.user != by:
            raise NotAllowed(f"memory {memory_id} is shared: only an admin can retract it")
        if memory.retracted_at is None:
            with atomic(self.db):
                self.db.execute(
                    "update memories set retracted_at = ?, retracted_by = ? where id = ? and retracted_at is null",
                    [now(), by if not admin else f"admin:{by}" if by else "admin", memory_id],
                )
                if self.index is not None:
                    self.index.scope(memory.user).remove([memory_id])
            self._on_write()
        return self.get(memory_id, by, admin=True)

    def confirm(self, memory_id: int, by: str | None) -> Correction:
        """An admin confirms a correction: it may now enter the shared adapter."""
        self.get(memory_id, None, admin=True)  # UnknownMemory if there is none
        with atomic(self.db):
            self.db.execute("update memories set confirmed_at = ?, confirmed_by = ? where id = ?",
                            [now(), by, memory_id])
        return self.get(memory_id, None, admin=True)

    # -- consolidation's view --------------------------------------------------------------
    def live(self, *, include_consolidated: bool = True,
             admits: Callable[[Correction], bool] = lambda c: True) -> list[Correction]:
        """Live (not retracted) corrections that `admits` lets in, oldest first; of those, the newest
        of each question only (so a correction kept out cannot displace one let in)."""
        where = "retracted_at is null and kind = 'correction'"
        if not include_consolidated:
            where += " and consolidated_in is null"
        newest: dict[str, Correction] = {}
        for row in self.db["memories"].rows_where(where, order_by="created_at, id"):
            c = _correction(row)
            if admits(c):
                newest[row["question_key"] or question_key(row["question"])] = c
        return sorted(newest.values(), key=lambda c: c.id)

    def mark_consolidated(self, ids: list[int], cycle_id: int) -> None:
        self._set_where_ids("consolidated_in", cycle_id, ids)

    def retracted_since(self, since: str | None = None) -> list[Correction]:
        """Corrections retracted after the ISO time `since` (all retracted ones if None), oldest first."""
        rows = self.db.query(
            "select * from memories where retracted_at is not null and retracted_at > ? order by retracted_at, id",
            [since or ""],
        )
        return [_correction(r) for r in rows]

    def to_unlearn(self) -> list[Correction]:
        """Retracted corrections that an adapter was trained on and no cycle has unlearnt yet: what
        the next consolidation must take out of the weights."""
        rows = self.db.query(
            "select * from memories where retracted_at is not null and consolidated_in is not null"
            " and retraction_consolidated_in is null order by retracted_at, id"
        )
        return [_correction(r) for r in rows]

    def mark_unlearnt(self, ids: list[int], cycle_id: int) -> None:
        self._set_where_ids("retraction_consolidated_in", cycle_id, ids)

    def _set_where_ids(self, column: str, cycle_id: int, ids: list[int]) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with atomic(self.db):
            self.db.execute(f"update memories set {column} = ? where id in ({marks})", [cycle_id, *ids])


def _correction(row: dict[str, Any]) -> Correction:
    return Correction(
        id=row["id"], question=row["question"], answer=row["answer"], user=row["user"], created_at=row["created_at"],
        consolidated_in=row.get("consolidated_in"), retracted_at=row.get("retracted_at"),
        retracted_by=row.get("retracted_by"), merged=row.get("merged") or 0, source=row.get("source"),
        confirmed_at=row.get("confirmed_at"),
    )
