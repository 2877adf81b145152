"""Measuring a model in-process: greedy answers, the correctness rule, token-level agreement.

Used by the gate (candidate against the active version) and by the benchmarks.
"""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)

CORRECTNESS_RULE = (
    "An answer is correct when the expected answer, normalised, occurs in the model's answer, normalised; "
    "normalising = Unicode NFKC, lower case, every character that is neither a letter, a digit nor white "
    "space removed, runs of white space folded to one space."
)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def is_correct(expected: str, answer: str) -> bool:
    e = normalise(expected)
    return bool(e) and f" {e} " in f" {normalise(answer)} "


def chat_prompt(tokenizer, question: str | list[dict]) -> str:
    """The chat-formatted prompt of a question, or of a whole list of messages."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate(model, tokenizer, questions: list[str | list[dict]], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers (to questions, or to lists of messages), batched with left padding."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            texts = [chat_prompt(tokenizer, q) for q in questions[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            answers += [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :],
                                                                   skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def agreement(model, tokenizer, questions: list[str], answers: list[str], batch_size: int = 32) -> float:
    """Token-level locality as the editing benchmarks compute it: the share of the reference
    answers' tokens that `model`, teacher-forced on the question and the answer, predicts as
    its top-1 token."""
    import torch

    matched = total = 0
    for start in range(0, len(questions), batch_size):
        rows = []
        for q, a in zip(questions[start : start + batch_size], answers[start : start + batch_size]):
            prompt = tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False)["input_ids"]
            answer = tokenizer(a, add_special_tokens=False)["input_ids"]
            if answer:
                rows.append((prompt, answer))
        if not rows:
            continue
        width = max(len(p) + len(a) for p, a in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
        with torch.inference_mode():
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for i, (p, a) in enumerate(rows):
            guess = predicted[i, len(p) - 1 : len(p) + len(a) - 1]
            matched += int((guess == torch.tensor(a)).sum())
            total += len(a)
    return matched / total if total else 1.0
