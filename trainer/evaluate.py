"""Measuring a model in-process: greedy answers and token-level agreement (the correctness
rule is memory.text.is_correct).

Used by the gate (candidate against the active version) and by the benchmarks.
"""

from __future__ import annotations


def chat_prompt(tokenizer, question: str | list[dict]) -> str:
    """The chat-formatted prompt of a question, or of a whole list of messages."""
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def eos_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generated answer: the model's generation config's, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return eos if isinstance(eos, list) else [eos]


def generate(model, tokenizer, questions: list[str | list[dict]], max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers (to questions, or to lists of messages), batched."""
    rows = greedy_ids(model, tokenizer, questions, max_new_tokens, batch_size)
    return [a.strip() for a in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def greedy_ids(model, tokenizer, questions: list[str | list[dict]], max_new_tokens: int = 24,
               batch_size: int = 32) -> list[list[int]]:
    """The greedy answers' tokens, each up to its end-of-answer token (left out): an answer of
    fewer than `max_new_tokens` tokens ended, one of `max_new_tokens` was cut off. On plain
    decoders (trainer.prefix) the prompts' shared opening is run once per call."""
    import torch

    from trainer.prefix import is_plain, shared_length

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = torch.tensor(eos_ids(model, tokenizer))
    if not is_plain(model):
        return hf_generate(model, tokenizer, questions, max_new_tokens, batch_size, eos)
    prompts = [tokenizer(chat_prompt(tokenizer, q), add_special_tokens=False)["input_ids"] for q in questions]
    n = shared_length(prompts)
    answers: dict[int, list[int]] = {}
    with torch.inference_mode():
        opening = model(input_ids=torch.tensor([prompts[0][:n]]), use_cache=True, logits_to_keep=1).past_key_values if n else None
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length: little padding
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            answers.update(zip(chunk, _greedy(model, [prompts[i][n:] for i in chunk], opening, n, max_new_tokens, eos,
                                              tokenizer.pad_token_id)))
    return [answers[i] for i in range(len(prompts))]


def _greedy(model, rows: list[list[int]], opening, n: int, max_new_tokens: int, eos, pad_id: int) -> list[list[int]]:
    """The greedy continuations of `rows` (token ids after the `n`-token `opening`, a cache),
    each up to its first end-of-sequence token (left out)."""
    import copy

    import torch
    from transformers import DynamicCache

    from trainer.prefix import causal_mask

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    keys = torch.zeros((len(rows), n + width), dtype=torch.bool)
    keys[:, :n] = True
    for i, r in enumerate(rows):  # padded on the left, after the opening
        ids[i, width - len(r) :] = torch.tensor(r)
        keys[i, n + width - len(r) :] = True
    positions = (keys.long().cumsum(-1) - 1).clamp_min(0)[:, n:]
    cache = DynamicCache(config=model.config) if opening is None else copy.deepcopy(opening)
    cache.batch_repeat_interleave(len(rows))  # (nothing to repeat in an empty cache)
    dtype = next(model.parameters()).dtype
    out = [[] for _ in rows]
    alive = torch.arange(len(rows))  # the rows still generating; a finished row leaves the batch
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=causal_mask(keys, ids.shape[1], dtype), position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1)
        going = ~torch.isin(token, eos)
        for i, t in zip(alive[going].tolist(), token[going].tolist()):
            out[i].append(t)
        if not going.any():
            break
        if not going.all():
            alive, token, keys, positions = alive[going], token[going], keys[going], positions[going]
            cache.batch_select_indices(going.nonzero().flatten())
        ids = token[:, None]
        keys = torch.cat([keys, torch.ones((len(alive), 1), dtype=torch.bool)], dim=1)
        positions = positions[:, -1:] + 1
    return out


def hf_generate(model, tokenizer, questions: list[str | list[dict]], max_new_tokens: int, batch_size: int,
                eos) -> list[list[int]]:
    """`greedy_ids` by transformers' generate, batched with left padding (any decoder)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[list[int]] = []
    try:
        for start in range(0, len(questions), batch_size):
            texts = [chat_prompt(tokenizer, q) for q in questions[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1] :]:
                ended = torch.isin(row, eos).nonzero()
                answers.append(row[: int(ended[0]) if len(ended) else len(row)].tolist())
    finally:
        tokenizer.padding_side = side
    return answers


def agreement(model, tokenizer, questions: list[str], answers: list[str], batch_size: int = 32) -> float:
    """Token-level locality as the editing benchmarks compute it: the share of the reference
    answers' tokens that `model`, teacher-forced on the question and the answer, predicts as
    its top-1 token."""
    import torch

    matched = total = 0
    for rows, ids, mask in teacher_forced(tokenizer, questions, answers, batch_size):
        with torch.inference_mode():
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        for i, (p, a) in enumerate(rows):
            guess = predicted[i, len(p) - 1 : len(p) + len(a) - 1]
            matched += int((guess == torch.tensor(a)).sum())
            total += len(a)
    return matched / total if total else 1.0


def teacher_forced(tokenizer, questions: list[str], answers: list[str], batch_size: int = 32):
    """Batches of questions each followed by its answer, to run as one forward pass: (rows,
    ids, mask) with rows the (prompt tokens, answer tokens) of the batch's non-empty answers,
    padded on the right. The logits at positions len(prompt)-1 … len(prompt)+len(answer)-2 of a
    row predict its answer's tokens."""
    import torch

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
        yield rows, ids, mask
