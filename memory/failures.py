"""Failures that come without feedback: how they are recognised, and the `failures` table.

The code that sees one calls in: the agent's record node for abstentions, contradictions and
repeats, serving's error path for engine errors and timeouts. Each can later be turned into a
lesson (a correction memory) with the right answer.
"""

from __future__ import annotations

import re

from memory.corrections import LOCAL_USER, Corrections
from memory.db import atomic, now
from memory.interactions import Interactions, UnknownResponse
from memory.text import SAME_QUESTION_SCORE, disagrees, question_key

KINDS = ("engine_error", "timeout", "abstention", "contradiction", "repeat")

# Asking again within this many seconds, this close to the last question, is a repeat.
REPEAT_WINDOW_SECONDS = 300
REPEAT_SCORE = 0.9

_ABSTENTIONS = re.compile(
    r"\b(i (do not|don't|dont) know|i'?m not sure|i am not sure|i (cannot|can't|can not|am unable to|'m unable to)"
    r" (answer|say|tell|help|determine|provide)|i (do not|don't) have (any )?(information|data|access)"
    r"|as an ai( language model)?|no (information|idea)|i have no (information|idea)|unknown to me)\b",
    re.IGNORECASE,
)


def is_abstention(text: str | None) -> bool:
    """The model declined to answer (or said it does not know)."""
    if not text or not text.strip():
        return True
    return bool(_ABSTENTIONS.search(text[:400]))


def contradicts(response: str | None, corrected_answer: str) -> bool:
    """The response does not give the corrected answer (memory.text.disagrees). An abstention is
    not a contradiction: it is its own kind."""
    return not is_abstention(response) and disagrees(response or "", corrected_answer)


def classify_engine_error(error: BaseException) -> str:
    """`timeout` for anything that timed out, else `engine_error`."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower():
            return "timeout"
    return "engine_error"


class UnknownFailure(KeyError):
    """No failure with that id."""


class Failures:
    def __init__(self, db, interactions: Interactions, corrections: Corrections, embedder):
        self.db, self.interactions, self.corrections, self.embedder = db, interactions, corrections, embedder

    def record(self, kind: str, response_id: str, detail: str | None = None, user: str | None = None) -> int:
        if kind not in KINDS:
            raise ValueError(f"unknown failure kind {kind!r}: one of {', '.join(KINDS)}")
        with atomic(self.db):
            return self.db["failures"].insert(
                {"kind": kind, "response_id": response_id, "user": user, "detail": detail, "created_at": now()}
            ).last_pk

    def record_engine_error(self, response_id: str, error: BaseException, *, prompt: str, user: str | None = None,
                            model: str | None = None, adapter: str | None = None, thread_id: str | None = None,
                            messages: list[dict] | None = None, latency_ms: float | None = None) -> int:
        """An answer that never came (the engine failed or timed out): an interaction under
        `response_id` with its error, and a failure of kind `engine_error` or `timeout`."""
        detail = f"{type(error).__name__}: {error}"[:2000]
        self.interactions.record(id=response_id, thread_id=thread_id, user=user, model=model, adapter=adapter,
                                 prompt=prompt, messages=messages or [], response=None, error=detail,
                                 latency_ms=latency_ms)
        return self.record(classify_engine_error(error), response_id, detail, user)

    def detect(self, response_id: str, memories: list[dict] | None = None) -> list[int]:
        """Look at a recorded answer for failures nobody reported: an abstention, an answer that
        contradicts an active correction of the same question, or a question asked again right
        after the previous answer (a failure of that previous answer, unless the user corrected
        it). Returns the failure ids."""
        row = self.interactions.get(response_id)
        if row is None:
            raise UnknownResponse(response_id)
        found: list[int] = []
        user, prompt, response = row["user"], row["prompt"] or "", row["response"]
        if is_abstention(response):
            found.append(self.record("abstention", response_id, (response or "")[:500], user))
        if memories is None:  # memory was off for this answer: check it against the corrections anyway
            memories = [{"id": h.correction.id, "answer": h.correction.answer, "score": h.score}
                        for h in self.corrections.search(prompt, user, k=1, threshold=SAME_QUESTION_SCORE)]
        for m in memories:
            if m.get("score", 0) >= SAME_QUESTION_SCORE and contradicts(response, m["answer"]):
                found.append(self.record("contradiction", response_id, f"memory {m['id']} says {m['answer']!r}", user))
                break
        previous = self.interactions.previous(row, REPEAT_WINDOW_SECONDS)
        # A question asked again after its answer was corrected checks the correction: not a failure.
        if previous is not None and prompt.strip() and not self._has("repeat", previous["id"]) \
                and not self._corrected(previous["id"]):
            a, b = self.embedder.embed([prompt, previous["prompt"] or ""])
            if question_key(prompt) == question_key(previous["prompt"] or "") or float(a @ b) >= REPEAT_SCORE:
                found.append(self.record("repeat", previous["id"], f"asked again as {response_id}", user))
        return found

    def _corrected(self, response_id: str) -> bool:
        """Did a user give a correction in their feedback on this answer?"""
        return self.db.execute("select 1 from feedback where response_id = ? and trim(coalesce(correction, '')) != ''",
                               [response_id]).fetchone() is not None

    def _has(self, kind: str, response_id: str) -> bool:
        return self.db.execute("select 1 from failures where response_id = ? and kind = ?",
                               [response_id, kind]).fetchone() is not None

    def list(self, *, kind: str | None = None, user: str | None = None, open_only: bool = False,
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
        return list(self.db.query(
            "select f.*, i.prompt, i.response from failures f left join interactions i on i.id = f.response_id"
            f" where {' and '.join(where)} order by f.id desc limit ? offset ?", [*params, limit, offset],
        ))

    def get(self, failure_id: int) -> dict:
        rows = list(self.db.query(
            "select f.*, i.prompt, i.response from failures f left join interactions i on i.id = f.response_id"
            " where f.id = ?", [failure_id]))
        if not rows:
            raise UnknownFailure(failure_id)
        return rows[0]

    def lesson(self, failure_id: int, answer: str, *, shared: bool = False) -> int:
        """Turn a failure into a correction of the question that failed, for the user who asked
        (or shared with everyone). Returns the memory id."""
        failure = self.get(failure_id)
        question = failure["prompt"]
        if not question:
            raise ValueError(f"failure {failure_id} has no question to correct")
        user = None if shared else (failure["user"] or LOCAL_USER)
        memory_id = self.corrections.add(question, answer, user=user, source="failure")
        with atomic(self.db):
            self.db.execute("update failures set lesson_id = ? where id = ?", [memory_id, failure_id])
        return memory_id
