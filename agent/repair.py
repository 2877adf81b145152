"""Verify and repair: an answer that ignores a correction of the very question asked is replaced
by the correction, and an answer a correction changed without giving it is not served.

The small model often answers something else although the memory of the question was in its
prompt (reports/memory-tier/report.md: most memory-tier misses were such, not retrieval misses).
When a retrieved memory is confidently the same question (the same-question model's probability
at least REPAIR_PROBABILITY; without the model, its similarity at least REPAIR_SCORE) and the
answer does not give the memory's answer (memory.text.gives), the agent answers with the
correction's answer span instead. Below that the memory stays a hint the model may follow or not:
there it may be another question about the same subject, whose answer the correction must not
take over (bleed).

A retrieved memory or an adapter in scope changes answers it has no business changing: shown
"Tours" for a question about someone's birthplace, the model rewrites its answer to "Who is X?"
too, and an adapter trained on the correction answers every question about X differently
(reports/memory-tier/report.md, reports/consolidation/). Such an answer gives none of the
corrections that could have changed it; the base model then answers the conversation as if there
were none (`steered`).
"""

from __future__ import annotations

from agent.protocol import Completion
from memory.text import SAME_QUESTION_SCORE, answer_of, gives

# Similarity of the asked question to a memory's at which the memory is taken as the same
# question: the one the memory uses (memory.text.SAME_QUESTION_SCORE); few neighbour questions
# reach it (reports/memory-tier/same_question.md).
REPAIR_SCORE = SAME_QUESTION_SCORE
# P(same question) (memory.matcher) at which a memory is the question asked: the lowest of the
# model's report rows letting through at most 1% (the bleed target) of neighbour questions on
# zsRE dev records 1-2000, where 0.94 of paraphrases reach it (reports/memory-tier/matcher.md).
REPAIR_PROBABILITY = 0.98


def same_question_memory(memories: list[dict], score: float = REPAIR_SCORE,
                         probability: float = REPAIR_PROBABILITY) -> dict | None:
    """The best retrieved memory, when it is confidently the question asked: by the matcher's
    probability when it read the memory ("same"), else by similarity."""
    sure = [m for m in memories if (m["same"] >= probability if m.get("same") is not None
                                    else m.get("score", 0.0) >= score)]
    return max(sure, key=lambda m: m.get("score", 0.0), default=None)


def repaired(completion: Completion, memory: dict | None, question: str) -> Completion | None:
    """The answer to give instead of `completion`, or None when it stands: it gives `memory`'s
    answer already, or there is no same-question memory."""
    if memory is None or gives(memory["answer"], completion.text, question):
        return None
    return Completion(text=answer_of(memory["answer"]), prompt_tokens=completion.prompt_tokens,
                      completion_tokens=completion.completion_tokens, finish_reason="stop")


def steered(completion: Completion, corrections: list[dict], question: str) -> bool:
    """Was `completion` changed by `corrections` (the memories shown, the corrections that put
    the question in an adapter's scope) without giving any of them? Then it is not served."""
    return bool(corrections) and not any(gives(c["answer"], completion.text, question) for c in corrections)
