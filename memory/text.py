"""What a correction says, in one place: how texts are compared, when an answer gives an
expected one, when two questions are the same, and how retrieved memories enter a prompt.

Serving (the agent), training (the dataset and the gate), failure detection and the benchmarks
all import these, so what the model is trained on and what it is shown cannot drift apart.
"""

from __future__ import annotations

import re
import unicodedata

# Two questions at least this similar (cosine of their embeddings) are the same question: the
# newer correction wins, a correction with the same answer is merged into the older one, and an
# answer against the older one's is a contradiction (reports/memory_calibration.md).
SAME_QUESTION_SCORE = 0.95
MAX_MEMORIES_IN_PROMPT = 3  # corrections shown in one prompt, at most

CORRECTNESS_RULE = (
    "An answer is correct when the expected answer, normalised, occurs in the model's answer, normalised, as "
    "whole words; normalising = Unicode NFKC, lower case, every character that is neither a letter, a digit nor "
    "white space removed, runs of white space folded to one space."
)

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalise(text: str) -> str:
    """Lower case, NFKC, punctuation removed, white space folded: the form texts are compared in."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def question_key(question: str) -> str:
    """The key under which corrections of the same question meet (newest wins, duplicates merge)."""
    return normalise(question)


def is_correct(expected: str, answer: str) -> bool:
    """Does `answer` give `expected`? (CORRECTNESS_RULE)"""
    e = normalise(expected)
    return bool(e) and f" {e} " in f" {normalise(answer)} "


def disagrees(answer: str, expected: str) -> bool:
    """Neither gives the other: an answer that says something else than the expected one."""
    if not normalise(expected) or not normalise(answer):
        return False
    return not is_correct(expected, answer) and not is_correct(answer, expected)


def memory_turns(memories: list[dict]) -> list[dict]:
    """Retrieved memories ({"question", "answer"}, best first) as earlier exchanges: the question,
    then the answer as the assistant's own turn, the best match last (nearest to the question)."""
    turns: list[dict] = []
    for m in reversed(memories[:MAX_MEMORIES_IN_PROMPT]):
        turns.append({"role": "user", "content": m["question"]})
        turns.append({"role": "assistant", "content": m["answer"]})
    return turns


def with_memories(messages: list[dict], memories: list[dict]) -> list[dict]:
    """`messages` with `memories` put in as earlier exchanges, right after the system message: a
    model follows its own earlier answers more often than facts listed in the system message."""
    if not memories:
        return list(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    return system + memory_turns(memories) + list(messages[len(system):])
