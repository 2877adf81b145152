"""Failures that come without feedback, and how they are recognised.

The memory records them (table `failures`); the code that sees one calls in: the agent's record
node for abstentions, contradictions and repeats, serving's error path for engine errors and
timeouts. Each can later be turned into a lesson (a correction memory) with the right answer.
"""

from __future__ import annotations

import re

from memory.text import disagrees

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
