"""Self-distillation anchors: the base model's own answers to general prompts, replayed in
every cycle so that learning a correction does not rewrite everything else.

Measured before this project (issue 5): a LoRA trained on corrections alone changed the greedy
answer to 50 of 50 unrelated questions; replaying the base model's answers halved the drift.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.dataset import Example

GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "How many days are there in a week?",
    "What is photosynthesis?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "What language is spoken in Brazil?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water in Celsius?",
    "Write a haiku about the sea.",
    "What does a computer's CPU do?",
    "Translate 'thank you' into Spanish.",
    "What is the largest planet in the solar system?",
    "Explain what a noun is.",
    "Who was the first person to walk on the Moon?",
)


def base_answers(base_model: str, cache: Path, prompts=GENERAL_PROMPTS, max_new_tokens: int = 48) -> list[Example]:
    """The base model's greedy answers to `prompts`, computed once and cached in `cache`."""
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{base_model}|{max_new_tokens}"
    if key not in cached or set(cached[key]) != set(prompts):
        cached[key] = dict(zip(prompts, _generate(base_model, list(prompts), max_new_tokens)))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=2))
    return [Example(p, a) for p, a in cached[key].items()]


def _generate(base_model: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]
