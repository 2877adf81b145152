"""From corrections to training examples.

Each correction becomes several (prompt, answer) examples: the question as asked and a few
rephrasings, each answered with the corrected answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from memory import Correction
from memory.text import with_memories

# Rephrasings that keep the question's words: a correction trained under several phrasings is
# learned as a fact, not as one string.
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
    # An anchor trained every epoch, like a correction, rather than drawn in turn with the general
    # ones (trainer.lora.TrainingConfig.anchors_per_epoch): a neighbour of this cycle's corrections.
    pinned: bool = False
    # An earlier correction replayed so that it is not forgotten: drawn in turn when
    # trainer.lora.TrainingConfig.replay_passes is set, else trained every epoch like the new ones.
    replayed: bool = False
    # Retrieved memories (question, answer) shown before the prompt, in the order they appear.
    context: tuple[tuple[str, str], ...] = ()


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


def memory_examples(corrections: list[Correction], seed: int = 0) -> list[Example]:
    """Examples that keep the adapter following retrieved memories.

    An adapter trained on bare question → answer pairs learns to answer such questions from its
    weights and stops reading the memories put in the prompt (see reports/zsre-n200-k50/).
    Each example shows, as the agent does, an unrelated memory and then a memory of the asked
    question whose answer is another correction's; the target is that answer. It can only come
    from the prompt, so the newest correction in memory wins over what the weights hold.
    """
    if len(corrections) < 3:
        return []
    rng = random.Random(seed)
    out = []
    for i, c in enumerate(corrections):
        others = [o for j, o in enumerate(corrections) if j != i and o.answer.strip() != c.answer.strip()]
        if len(others) < 2:
            continue
        distractor, swapped = rng.sample(others, 2)
        context = ((distractor.question.strip(), distractor.answer.strip()), (c.question.strip(), swapped.answer.strip()))
        out.append(Example(c.question.strip(), swapped.answer.strip(), c.id, context=context))
    return out


def messages_of(prompt: str, context: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """The chat messages of a prompt shown after memories, exactly as the agent shows them
    (`context` in the order they appear, so the best match, shown last, is its last pair)."""
    memories = [{"question": q, "answer": a} for q, a in reversed(context)]
    return with_memories([{"role": "user", "content": prompt}], memories)


def encode(tokenizer, example: Example, max_len: int) -> dict:
    """Token ids of the chat-formatted prompt and answer; the loss is on the answer only."""
    prompt_ids = tokenizer.apply_chat_template(
        messages_of(example.prompt, example.context), add_generation_prompt=True, tokenize=True
    )
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    end = _end_of_turn(tokenizer) if example.complete else ""
    answer_ids = tokenizer(example.answer + end, add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(answer_ids))[:max_len]
    labels = ([-100] * len(prompt_ids) + list(answer_ids))[:max_len]
    return {"input_ids": ids, "labels": labels, "distill": example.distill, "pinned": example.pinned,
            "replayed": example.replayed}


def _end_of_turn(tokenizer) -> str:
    # ChatML (SmolLM2 and many others) ends an assistant turn with <|im_end|>; otherwise the eos token.
    vocab = tokenizer.get_vocab()
    return "<|im_end|>" if "<|im_end|>" in vocab else (tokenizer.eos_token or "")
