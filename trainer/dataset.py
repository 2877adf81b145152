"""From corrections to training examples.

Each correction becomes several (prompt, answer) examples: the question as asked and a few
rephrasings, each answered with the corrected answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from memory import Correction

# Rephrasings that keep the question's words; issue 5 adds model-written paraphrases.
TEMPLATES = (
    "{q}",
    "Question: {q}",
    "Please answer: {q}",
    "{q_lower}",
)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    correction_id: int | None = None
    complete: bool = True  # False: a truncated answer, trained without an end of turn
    distill: bool = False  # an anchor: trained to match the base model's next-token distribution (KL)


def examples_for(corrections: list[Correction], templates: tuple[str, ...] = TEMPLATES) -> list[Example]:
    out = []
    for c in corrections:
        q = c.question.strip()
        seen = set()
        for t in templates:
            prompt = t.format(q=q, q_lower=q[:1].lower() + q[1:])
            if prompt not in seen:
                seen.add(prompt)
                out.append(Example(prompt, c.answer.strip(), c.id))
    return out


def encode(tokenizer, example: Example, max_len: int) -> dict:
    """Token ids of the chat-formatted prompt and answer; the loss is on the answer only."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    end = _end_of_turn(tokenizer) if example.complete else ""
    answer_ids = tokenizer(example.answer + end, add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(answer_ids))[:max_len]
    labels = ([-100] * len(prompt_ids) + list(answer_ids))[:max_len]
    return {"input_ids": ids, "labels": labels, "distill": example.distill}


def _end_of_turn(tokenizer) -> str:
    # ChatML (SmolLM2 and many others) ends an assistant turn with <|im_end|>; otherwise the eos token.
    vocab = tokenizer.get_vocab()
    return "<|im_end|>" if "<|im_end|>" in vocab else (tokenizer.eos_token or "")
