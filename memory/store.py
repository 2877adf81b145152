"""The memory: interactions, feedback, failures and the lessons drawn from them.

SQLite holds everything, each memory with its embedding; the FAISS indexes (one per scope) are
reconciled with it whenever the memory is opened, so the two never disagree for long and a lost
index file costs a rebuild from the stored vectors, not a re-embedding.

Guarantees:
- a write (feedback, a correction, a retraction) is committed before the call returns;
- a user's memories are searched in that user's index only, and checked again against SQLite;
- of corrections of the same question (same normalised text, or near-identical wording) the
  newest visible one wins; a correction that repeats a live one is merged into it;
- a retraction takes the memory out of its index at once and out of consolidation's view.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from memory import failures as failure_rules
from memory.db import atomic, now, open_db
from memory.embed import Embedder
from memory.index import APPROX_FROM, NPROBE, ScopedIndex, scope_name
from memory.text import SAME_QUESTION_SCORE, normalise, question_key

LOCAL_USER = "local"  # who asks when nobody is named (no API keys, no `user` field)
# Cosine similarity a correction needs to be retrieved, calibrated by evals/memory_calibration.py on
# zsRE dev (reports/memory_calibration.md): with 1,891 questions stored, a paraphrase retrieves a
# correction of its fact 95.9% of the time; an unrelated NQ question reaches it 0.00% of the time,
# and a zsRE question about a subject not stored 0.85% (at 0.65 that was 16.9%: "What university did
# X attend?" scores high against "What university did Y attend?", and a wrong fact in the prompt
# is worse than none).
RELEVANCE_THRESHOLD = 0.875
# The adapter's scope: a question at least this similar to some stored correction is answered by the
# active adapter, any other by the base model, whose answers the adapter could only change for the
# worse (locality). From the same calibration: 99.8% of paraphrases reach a correction of their fact
# at 0.7, 0.08% of unrelated NQ questions reach any of 1,891 stored ones, and 6.9% of zsRE questions
# about subjects not stored (same style, other facts).
ADAPTER_SCOPE = 0.7
MAX_PROMPT_CHARS = 2000  # questions + answers put into one prompt, at most (the first always goes)
# Index files are written by a background thread, at most this often (and on close); SQLite is
# the truth, so a stale file only means a little catching up on the next start.
SAVE_EVERY_SECONDS = 30.0


class UnknownResponse(KeyError):
    """Feedback named a response id that Ratchet never gave."""


class UnknownMemory(KeyError):
    """No memory with that id is visible to the caller."""


class UnknownFailure(KeyError):
    """No failure with that id."""


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
    score: float


class Memory:
    def __init__(
        self,
        data_dir: str | Path,
        embedder: Embedder | None = None,
        *,
        open_index: bool = True,
        approx_from: int = APPROX_FROM,
        nprobe: int = NPROBE,
    ):
        """`open_index=False` opens the database only (listing, retracting); the indexes are
        then reconciled by the next process that opens them."""
        self.data_dir = Path(data_dir)
        self.db = open_db(self.data_dir / "ratchet.db")
        self.embedder = embedder or Embedder()  # the exported encoder is cached per machine, not per data dir
        self.index = ScopedIndex(self.data_dir / "index", self.embedder.dim, approx_from=approx_from, nprobe=nprobe)
        self._saved_at = time.monotonic()
        self.has_index = open_index
        self._wrote = threading.Event()
        self._closing = threading.Event()
        self._saver: threading.Thread | None = None
        if open_index:
            (self.data_dir / "memories.faiss").unlink(missing_ok=True)  # the skeleton's single index
            self.index.load_all()
            self.sync_index()
            self._saver = threading.Thread(target=self._save_in_background, name="ratchet-index-saver", daemon=True)
            self._saver.start()

    # -- the index -----------------------------------------------------------------------
    def _live_by_scope(self) -> dict[str, tuple[str | None, set[int]]]:
        scopes: dict[str, tuple[str | None, set[int]]] = {}
        for memory_id, user in self.db.execute("select id, user from memories where retracted_at is null"):
            scopes.setdefault(scope_name(user), (user, set()))[1].add(memory_id)
        return scopes

    def sync_index(self) -> dict[str, int]:
        """Make the FAISS indexes hold exactly the live memories of SQLite; returns what changed."""
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
                index.add(*self._vectors_for(missing))
                added += len(missing)
            if index.needs_retrain():
                index.reset(*self._vectors_for(sorted(ids)))
        self.index.save()
        self._saved_at = time.monotonic()
        return {"added": added, "removed": removed}

    def rebuild_index(self) -> int:
        """Throw the indexes away and build them again from SQLite (stored embeddings)."""
        self.index.clear()
        total = 0
        for user, ids in self._live_by_scope().values():
            self.index.scope(user, load=False).reset(*self._vectors_for(sorted(ids)))
            total += len(ids)
        self.index.save(only_dirty=False)
        self._saved_at = time.monotonic()
        return total

    def _vectors_for(self, ids: list[int], batch: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
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

    def _after_write(self) -> None:
        self._wrote.set()

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
                import logging

                logging.getLogger("ratchet.memory").exception("could not write the index files")
            self._saved_at = time.monotonic()
            self._closing.wait(SAVE_EVERY_SECONDS)

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
        answer = correction.strip() if correction and correction.strip() else None
        question = interaction["prompt"] or ""
        vector = self.embedder.embed([question])[0] if answer else None
        duplicate = self._duplicate_of(question, answer, user, vector) if answer else None
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
            if answer:
                memory_id = self._insert_memory(question, answer, user, vector, duplicate, source="feedback",
                                                feedback_id=feedback_id, response_id=response_id)
        if memory_id is not None and duplicate is None:
            self._index_one(memory_id, user, vector)
        self._after_write()
        return feedback_id

    def add_correction(self, question: str, answer: str, user: str | None = LOCAL_USER, *,
                       source: str = "direct") -> int:
        """A correction given directly (not as feedback on a response); `user=None` shares it.
        Returns the memory's id (an older one's, if this one repeats it and was merged into it)."""
        answer = answer.strip()
        vector = self.embedder.embed([question])[0]
        duplicate = self._duplicate_of(question, answer, user, vector)
        with atomic(self.db):
            memory_id = self._insert_memory(question, answer, user, vector, duplicate, source=source)
        if duplicate is None:
            self._index_one(memory_id, user, vector)
        self._after_write()
        return memory_id

    def _index_one(self, memory_id: int, user: str | None, vector: np.ndarray) -> None:
        if self.has_index:
            self.index.scope(user).add(np.array([memory_id], np.int64), vector[None, :])

    def _duplicate_of(self, question: str, answer: str, user: str | None, vector: np.ndarray) -> int | None:
        """The live memory of the same scope that this correction repeats: the newest correction of
        the same (or a near-identical) question, with the same answer."""
        candidates = [row for row in self._rows_where("question_key = ? and user is ?", [question_key(question), user])]
        if self.has_index:
            scores, ids = self.index.scope(user).search(vector[None, :], 4)
            near = [int(i) for i, s in zip(ids[0], scores[0]) if i >= 0 and s >= SAME_QUESTION_SCORE]
            candidates += [r for r in self._rows_where_ids(near) if r["user"] == user]
        if not candidates:
            return None
        newest = max(candidates, key=lambda r: (r["created_at"], r["id"]))
        return newest["id"] if normalise(newest["answer"]) == normalise(answer) else None

    def _insert_memory(self, question: str, answer: str, user: str | None, vector: np.ndarray,
                       duplicate: int | None, **extra: Any) -> int:
        """Inside a transaction: a new memory row, or the duplicate's merge count bumped."""
        if duplicate is not None:
            self.db.execute("update memories set merged = merged + 1, updated_at = ? where id = ?", [now(), duplicate])
            return duplicate
        stamp = now()
        return self.db["memories"].insert(
            {"kind": "correction", "user": user, "question": question, "question_key": question_key(question),
             "answer": answer, "embedding": vector.astype(np.float32).tobytes(), "embedder": self.embedder.name,
             "created_at": stamp, "updated_at": stamp, "merged": 0, **extra}
        ).last_pk

    # -- retrieval -----------------------------------------------------------------------
    def search(
        self,
        query: str,
        user: str | None,
        k: int = 3,
        threshold: float = RELEVANCE_THRESHOLD,
        max_chars: int | None = MAX_PROMPT_CHARS,
    ) -> list[Hit]:
        """The corrections visible to `user` (theirs and the shared ones) nearest to `query`, best
        first, at or above `threshold`; at most `k`, and at most `max_chars` of text after the first.

        Of several corrections of the same question the newest wins.
        """
        if not self.has_index or len(self.index) == 0 or k <= 0:
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
        hits: list[Hit] = []
        used = 0
        for score, members in groups:
            same_key = self._newest_visible(members[0]["question_key"], user)
            newest = max(members + ([same_key] if same_key else []), key=lambda r: (r["created_at"], r["id"]))
            size = len(newest["question"]) + len(newest["answer"])
            if hits and max_chars is not None and used + size > max_chars:
                continue
            hits.append(Hit(_correction(newest), score))
            used += size
            if len(hits) == k:
                break
        return hits

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

    def visible(self, user: str | None, *, limit: int = 50, offset: int = 0) -> list[Correction]:
        """The live memories `user` may see, newest first."""
        rows = self.db.query(
            "select * from memories where retracted_at is null and (user is null or user is ?)"
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
            if self.has_index:
                self.index.scope(memory.user).remove([memory_id])
            self._after_write()
        return self.get(memory_id, by, admin=True)

    # -- consolidation's view --------------------------------------------------------------
    def corrections(self, *, include_consolidated: bool = True) -> list[Correction]:
        """Live (not retracted) corrections, oldest first; the newest of each question only."""
        where = "retracted_at is null and kind = 'correction'"
        if not include_consolidated:
            where += " and consolidated_in is null"
        rows = list(self.db["memories"].rows_where(where, order_by="created_at, id"))
        newest: dict[str, dict] = {}
        for row in rows:
            newest[row["question_key"] or question_key(row["question"])] = row
        return [_correction(r) for r in sorted(newest.values(), key=lambda r: r["id"])]

    def confirm(self, memory_id: int, by: str | None) -> Correction:
        """An admin confirms a correction: it may now enter the shared adapter."""
        self.get(memory_id, None, admin=True)  # UnknownMemory if there is none
        with atomic(self.db):
            self.db.execute("update memories set confirmed_at = ?, confirmed_by = ? where id = ?",
                            [now(), by, memory_id])
        return self.get(memory_id, None, admin=True)

    def mark_consolidated(self, ids: list[int], cycle_id: int) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with atomic(self.db):
            self.db.execute(f"update memories set consolidated_in = ? where id in ({marks})", [cycle_id, *ids])

    def retracted_since(self, since: str | None = None) -> list[Correction]:
        """Corrections retracted after the ISO time `since` (all retracted ones if None), oldest first."""
        rows = self.db.query(
            "select * from memories where retracted_at is not null and retracted_at > ? order by retracted_at, id",
            [since or ""],
        )
        return [_correction(r) for r in rows]

    def retractions_to_unlearn(self) -> list[Correction]:
        """Retracted corrections that an adapter was trained on and no cycle has unlearnt yet: what
        the next consolidation must take out of the weights."""
        rows = self.db.query(
            "select * from memories where retracted_at is not null and consolidated_in is not null"
            " and retraction_consolidated_in is null order by retracted_at, id"
        )
        return [_correction(r) for r in rows]

    def mark_retractions_consolidated(self, ids: list[int], cycle_id: int) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with atomic(self.db):
            self.db.execute(f"update memories set retraction_consolidated_in = ? where id in ({marks})",
                            [cycle_id, *ids])

    # -- failures --------------------------------------------------------------------------
    def record_failure(self, kind: str, response_id: str, detail: str | None = None, user: str | None = None) -> int:
        if kind not in failure_rules.KINDS:
            raise ValueError(f"unknown failure kind {kind!r}: one of {', '.join(failure_rules.KINDS)}")
        with atomic(self.db):
            return self.db["failures"].insert(
                {"kind": kind, "response_id": response_id, "user": user, "detail": detail, "created_at": now()}
            ).last_pk

    def record_engine_failure(self, error: BaseException, *, prompt: str, user: str | None = None,
                              model: str | None = None, adapter: str | None = None, thread_id: str | None = None,
                              messages: list[dict] | None = None, latency_ms: float | None = None) -> tuple[str, int]:
        """An answer that never came (the engine failed or timed out): an interaction with its error,
        and a failure of kind `engine_error` or `timeout`. Returns (response id, failure id)."""
        kind = failure_rules.classify_engine_error(error)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        detail = f"{type(error).__name__}: {error}"[:2000]
        self.record_interaction(id=response_id, thread_id=thread_id, user=user, model=model, adapter=adapter,
                                prompt=prompt, messages=messages or [], response=None, error=detail,
                                latency_ms=latency_ms)
        return response_id, self.record_failure(kind, response_id, detail, user)

    def detect_failures(self, response_id: str, memories: list[dict] | None = None) -> list[int]:
        """Look at a recorded answer for failures nobody reported: an abstention, an answer that
        contradicts an active correction of the same question, or a question asked again right
        after the previous answer (a failure of that previous answer). Returns the failure ids."""
        row = self.interaction(response_id)
        if row is None:
            raise UnknownResponse(response_id)
        found: list[int] = []
        user, prompt, response = row["user"], row["prompt"] or "", row["response"]
        if failure_rules.is_abstention(response):
            found.append(self.record_failure("abstention", response_id, (response or "")[:500], user))
        if memories is None:  # memory was off for this answer: check it against the corrections anyway
            memories = [{"id": h.correction.id, "answer": h.correction.answer, "score": h.score}
                        for h in self.search(prompt, user, k=1, threshold=SAME_QUESTION_SCORE)]
        for m in memories:
            if m.get("score", 0) >= SAME_QUESTION_SCORE and failure_rules.contradicts(response, m["answer"]):
                found.append(self.record_failure(
                    "contradiction", response_id, f"memory {m['id']} says {m['answer']!r}", user))
                break
        previous = self._previous_interaction(row)
        if previous is not None and prompt.strip():
            a, b = self.embedder.embed([prompt, previous["prompt"] or ""])
            if question_key(prompt) == question_key(previous["prompt"] or "") or float(a @ b) >= failure_rules.REPEAT_SCORE:
                found.append(self.record_failure("repeat", previous["id"], f"asked again as {response_id}", user))
        return found

    def _previous_interaction(self, row: dict) -> dict | None:
        """The same user's answer just before `row` (in the same thread, if any), if it came within
        the repeat window and failed no other way already."""
        import datetime as dt

        since = (dt.datetime.fromisoformat(row["created_at"])
                 - dt.timedelta(seconds=failure_rules.REPEAT_WINDOW_SECONDS)).isoformat()
        thread = "and thread_id is ?" if row["thread_id"] else ""
        params = [row["user"], row["id"], since, row["created_at"]] + ([row["thread_id"]] if row["thread_id"] else [])
        rows = list(self.db.query(
            f"select * from interactions where user is ? and id != ? and created_at >= ? and created_at <= ?"
            f" and error is null {thread} order by created_at desc limit 1", params,
        ))
        if not rows:
            return None
        already = self.db.execute("select 1 from failures where response_id = ? and kind = 'repeat'",
                                  [rows[0]["id"]]).fetchone()
        return None if already else rows[0]

    def failures(self, *, kind: str | None = None, user: str | None = None, open_only: bool = False,
                 limit: int = 100, offset: int = 0) -> list[dict]:
        """Recorded failures, newest first, with the question and the answer that failed."""
        where, params = ["1"], []
        if kind:
            where.append("f.kind = ?")
            params.append(kind)
        if user:
            where.append("f.user = ?")
            params.append(user)
        if open_only:
            where.append("f.lesson_id is null")
        rows = self.db.query(
            "select f.*, i.prompt, i.response from failures f left join interactions i on i.id = f.response_id"
            f" where {' and '.join(where)} order by f.id desc limit ? offset ?", [*params, limit, offset],
        )
        return list(rows)

    def failure(self, failure_id: int) -> dict:
        rows = list(self.db.query(
            "select f.*, i.prompt, i.response from failures f left join interactions i on i.id = f.response_id"
            " where f.id = ?", [failure_id]))
        if not rows:
            raise UnknownFailure(failure_id)
        return rows[0]

    def lesson_from_failure(self, failure_id: int, answer: str, *, shared: bool = False) -> int:
        """Turn a failure into a correction of the question that failed, for the user who asked
        (or shared with everyone). Returns the memory id."""
        failure = self.failure(failure_id)
        question = failure["prompt"]
        if not question:
            raise ValueError(f"failure {failure_id} has no question to correct")
        user = None if shared else (failure["user"] or LOCAL_USER)
        memory_id = self.add_correction(question, answer, user=user, source="failure")
        with atomic(self.db):
            self.db.execute("update failures set lesson_id = ? where id = ?", [memory_id, failure_id])
        return memory_id

    def close(self) -> None:
        if self._saver is not None:
            self._closing.set()
            self._wrote.set()
            self._saver.join(timeout=60)
        if self.has_index:
            self.index.save()
        self.db.conn.close()


def _correction(row: dict) -> Correction:
    return Correction(
        id=row["id"],
        question=row["question"],
        answer=row["answer"],
        user=row["user"],
        created_at=row["created_at"],
        consolidated_in=row.get("consolidated_in"),
        retracted_at=row.get("retracted_at"),
        retracted_by=row.get("retracted_by"),
        merged=row.get("merged") or 0,
        source=row.get("source"),
        confirmed_at=row.get("confirmed_at"),
    )
