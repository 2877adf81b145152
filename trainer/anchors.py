"""Self-distillation anchors: the base model's own answers to general prompts, replayed in
every cycle so that learning a correction does not rewrite everything else.

Measured before this project (issue 5): a LoRA trained on corrections alone changed the greedy
answer to 50 of 50 unrelated questions; replaying the base model's answers halved the drift.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.dataset import Example

# Replayed in training: the base model's answers to these keep its general behaviour in place.
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
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the tallest mountain in the world?",
    "Who developed the theory of relativity?",
    "What is the freezing point of water in Fahrenheit?",
    "Which ocean is the largest?",
    "What do bees make?",
    "What is the square root of 81?",
    "Who is the author of Pride and Prejudice?",
    "What gas do plants absorb from the air?",
    "What is the currency of Japan?",
    "Give me a tip for sleeping better.",
    "What is the main ingredient of guacamole?",
    "In which country are the pyramids of Giza?",
    "What is the longest river in Africa?",
    "How many legs does a spider have?",
    "What is an adjective?",
    "Who composed the Fifth Symphony?",
    "What is the speed of light?",
    "Which planet is known as the Red Planet?",
    "What is the capital of Canada?",
    "Write one sentence about autumn.",
    "What does DNA stand for?",
    "Who invented the telephone?",
    "What is the hardest natural substance?",
    "How many minutes are in an hour?",
    "What is the opposite of cold?",
    "Which animal is known as the king of the jungle?",
    "What is the capital of Australia?",
    "What is a prime number?",
    "Who discovered penicillin?",
    "What is the smallest country in the world?",
)

# Never trained on: the gate's locality probes (are unrelated answers unchanged?).
PROBE_PROMPTS = (
    "What is the capital of Germany?",
    "Who wrote Hamlet?",
    "How many hours are in a day?",
    "What is gravity?",
    "Give me a synonym for fast.",
    "What is 7 plus 8?",
    "Name a fruit that is yellow.",
    "What language is spoken in Mexico?",
    "Who painted The Starry Night?",
    "What is the largest mammal?",
    "Write a short poem about rain.",
    "What does a refrigerator do?",
    "Translate 'hello' into French.",
    "What is the closest star to Earth?",
    "Explain what a verb is.",
    "Who was the first president of the United States?",
    "What is the chemical formula of water?",
    "How many players are on a soccer team?",
    "What is the capital of Italy?",
    "Who wrote The Odyssey?",
    "What is the largest desert in the world?",
    "What do cows drink?",
    "What is 100 divided by 4?",
    "Which metal is liquid at room temperature?",
    "What is the capital of Spain?",
    "Give me a tip for learning a new language.",
    "What is the main ingredient of bread?",
    "Which country has the largest population?",
    "How many sides does a hexagon have?",
    "What instrument has 88 keys?",
    "What is the capital of Egypt?",
    "Who invented the light bulb?",
)


def load_prompts(path: str | Path) -> tuple[str, ...]:
    """Anchor prompts from a text file, one per line (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not prompts:
        raise ValueError(f"no anchor prompts in {path}")
    return prompts


def base_answers(base_model: str, cache: Path, prompts=GENERAL_PROMPTS, max_new_tokens: int = 32) -> list[Example]:
    """The base model's greedy answers to `prompts`, computed once and cached in `cache`."""
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{base_model}|{max_new_tokens}|v2"
    if key not in cached or set(cached[key]) != set(prompts):
        cached[key] = dict(zip(prompts, _generate(base_model, list(prompts), max_new_tokens)))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=2))
    # A cut-off answer is trained without an end of turn, so replay does not teach stopping early.
    return [Example(p, a["text"], complete=a["complete"], distill=True) for p, a in cached[key].items()]


def _generate(base_model: str, prompts: list[str], max_new_tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluate import greedy_ids

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    rows = greedy_ids(model, tokenizer, prompts, max_new_tokens)
    return [{"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "complete": len(row) < max_new_tokens}
            for row in rows]
