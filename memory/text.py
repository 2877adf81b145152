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


# A question about a name in general: "Who is X?", "What is X (best) known for?", "Tell me about X".
_GENERAL = re.compile(
    r"^\s*(?:(?:who|what)(?:\s+(?:is|was|are|were)|'s|’s)\s+(?P<known>.+?)(?:\s+(?:best|most|mainly))?"
    r"\s+(?:known|famous|noted|remembered)\s+for"
    r"|(?:who|what)(?:\s+(?:is|was|are|were)|'s|’s)\s+(?P<plain>.+?)"
    r"|(?:tell me|what do you know|can you tell me)(?:\s+(?:something|one fact|a fact))?\s+about\s+(?P<about>.+?))"
    r"\s*[?.!]*\s*$",
    re.IGNORECASE,
)
_POSSESSIVE = re.compile(r"['’]s\b|s['’](?:\s|$)")
_NOT_A_NAME_END = frozenset("of in on at to for from by with about as".split())
# Words of a question that ask nothing by themselves: a question that adds only these to a name asks about it in general.
_FILLER = frozenset("who whom whose what which is was are were s the a an".split())


def general_about(question: str) -> str | None:
    """The name (normalised) a question asks about in general ("Who is The Duck Doctor?" → "the
    duck doctor"); None for a question that asks a particular fact ("Who is the mother of X?",
    "What was X's career?": no name begins lower case, has a possessive or ends in a preposition)."""
    m = _GENERAL.match(question or "")
    if not m:
        return None
    name = next(g for g in m.groups() if g).strip()
    if not (name[:1].isupper() or name[:1].isdigit()) or _POSSESSIVE.search(name):
        return None
    words = normalise(name).split()
    return " ".join(words) if words and words[-1] not in _NOT_A_NAME_END else None


def asks_in_general(query: str, stored: str) -> bool:
    """Does one of the two ask about a name in general and the other a particular fact about it
    ("Who is Momus?" and "Who was the mother of Momus?")? Then a correction of the one does not
    answer the other, however near their wording: the same-question model reads these pairs as
    the same too often (reports/memory-tier/different-questions.md)."""
    for general, particular in ((query, stored), (stored, query)):
        name = general_about(general)
        if name is None or general_about(particular) == name:  # both about it in general
            continue
        text = f" {normalise(particular)} "
        if f" {name} " in text and any(w not in _FILLER for w in text.replace(f" {name} ", " ", 1).split()):
            return True
    return False


# The kind of answer an interrogative asks for: "Who directed X?" and "Where is X located?" are
# never one question, however near their words (0 of 2000 tune paraphrase pairs differ so, 1 of
# 1783 report ones: reports/memory-tier/different-questions.md).
_ANSWER_KIND = {"who": "person", "whom": "person", "whose": "person", "where": "place", "when": "time"}


def answer_kinds(question: str) -> set[str]:
    """The kinds of answer (_ANSWER_KIND) the interrogatives in `question` ask for."""
    return {_ANSWER_KIND[w] for w in normalise(question).split() if w in _ANSWER_KIND}


def different_questions(a: str, b: str) -> bool:
    """Can `a` and `b` not be one question? They ask different kinds of answer (a person, a place,
    a time), or one asks about a name in general and the other a fact about it (asks_in_general)."""
    kinds_a, kinds_b = answer_kinds(a), answer_kinds(b)
    return bool(kinds_a and kinds_b and not kinds_a & kinds_b) or asks_in_general(a, b)


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


# What a user writes before or around the answer itself: "No, it's X", "Actually, the answer is X."
_LEAD = re.compile(
    r"^\s*(?:(?:no|nope|wrong|incorrect|not quite|actually|sorry|well)"
    r"(?:\s*[,.!:;—-]+\s*|\s+(?=(?:it|that|this|the)\b)))*"
    r"(?:(?:it|that|this)(?:'s|’s| is| was)|the (?:right |correct |real )?answer (?:is|was)|answer:)?\s*",
    re.IGNORECASE,
)
# Words a sentence needs but that say nothing about the fact: never required of an answer.
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been it its it's that this these those "
    "who whom whose what which where when why how did do does answer right correct not no yes".split()
)
_COPULA = re.compile(r"\b(?:is|are|was|were)\b", re.IGNORECASE)

JUDGE_RULE = (
    "An answer gives a correction when the correction's answer span (memory.text.answer_of: what the user wrote "
    "without 'No, it's' and the like) occurs in it as whole words after normalising, or when every key word of "
    "the span (memory.text.key_words: not a stop word, not a word of the question, of a sentence the part after "
    "its last 'is/was') occurs in it as a whole word."
)


def answer_of(correction: str) -> str:
    """The answer span of what a user wrote: "No, it's X" → "X", "It's X." → "X"; a sentence
    ("The ship ... was the Velmaris.") is kept as it is and judged by its key words."""
    text = (correction or "").strip()
    span = _LEAD.sub("", text, count=1).strip()
    span = span.rstrip(".!?;, ").strip().strip("\"'“”‘’").strip()
    return span or text


def key_words(correction: str, question: str = "") -> list[str]:
    """The words an answer must give to give `correction` (normalised): the span's words that are
    neither stop words nor words of `question`; of a sentence asked without a question, those after
    its last "is"/"was". Empty when nothing is left (then the whole span is required)."""
    span = answer_of(correction)
    asked = set(normalise(question).split())
    if not asked and len(span.split()) >= 4:
        tail = _COPULA.split(span)[-1]
        if normalise(tail):
            span = tail
    words = [w for w in normalise(span).split() if w not in STOPWORDS and w not in asked]
    return list(dict.fromkeys(words))


def gives(correction: str, answer: str, question: str = "") -> bool:
    """Does `answer` give what `correction` says (JUDGE_RULE)? A right answer in other words or
    another order passes ("Oxford University" for "University of Oxford"), a wrong name fails."""
    if is_correct(answer_of(correction), answer):
        return True
    words = key_words(correction, question)
    said = f" {normalise(answer)} "
    return bool(words) and all(f" {w} " in said for w in words)
