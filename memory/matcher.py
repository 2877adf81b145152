"""Same question? A cross-encoder that reads two questions together and says how likely they ask
for the same fact, so that a correction reaches its paraphrases and not the other questions
about its subject.

Cosine similarity of sentence embeddings mostly measures the shared subject: "Who is Galvani
potential?" is as near to "What is Galvani potential named after?" (0.93) as a true paraphrase
is, and no threshold keeps the paraphrases without the neighbours (reports/memory-tier/
same_question.md). This model is the packaged all-MiniLM-L6-v2 (memory.embed) with a LoRA
adapter (PEFT, a plain folder) and a one-unit head, trained on zsRE dev records 1-2000 only:
paraphrases against the same subject's other relations (evals/same_question.py --train).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from memory.text import different_questions

MATCHER_DIR = Path(__file__).resolve().parent / "same_question"  # adapter_config.json, adapter_model.safetensors, head.safetensors
MAX_LENGTH = 96  # tokens of a question pair, at most
# Probability from which a memory is taken as the same question: the classifier's own decision
# point, not tuned on the records the benchmark reports (reports/memory-tier/matcher.md).
SAME_QUESTION_PROBABILITY = 0.5
# With the model, the cosine similarity at which it reads a correction at all (below, never the
# same question): 0.988 of zsRE dev 1-2000 paraphrases reach their question's (reports/memory-tier/matcher.md).
CANDIDATE_SIMILARITY = 0.7


def load_encoder(path: Path | None = None):
    """The packaged MiniLM (memory.embed.bundled_minilm_path) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    from memory.embed import bundled_minilm_path

    path = path or bundled_minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def pair_logits(tokenizer, encoder, head, a: list[str], b: list[str]):
    """The head's logit for each pair (a[i], b[i]), read together: mean-pooled last hidden states."""
    x = tokenizer(list(a), list(b), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = encoder(**x).last_hidden_state
    mask = x["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return head((hidden * mask).sum(1) / mask.sum(1)).squeeze(-1)


class Matcher:
    """P(same question) for a query against stored questions; thread-safe, on the CPU. The model
    is loaded at the first question (a server whose memory is never searched never loads it)."""

    def __init__(self, path: str | Path = MATCHER_DIR, threads: int = 1):
        self.path = Path(path)
        if not (self.path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no same-question model in {self.path} "
                                    "(python -m evals.same_question --train makes one)")
        self.threads = threads
        self._lock = threading.Lock()
        self._model = None

    def load(self) -> None:
        """Build the model now rather than at the first question: a server does it before a
        consolidation cycle can build models beside it (trainer.base_model.building)."""
        with self._lock:
            if self._model is None:
                self._model = self._load()

    def _load(self):
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file

        tokenizer, encoder = load_encoder()
        encoder = PeftModel.from_pretrained(encoder, self.path).eval()
        weights = load_file(self.path / "head.safetensors")
        head = torch.nn.Linear(weights["weight"].shape[1], 1)
        head.load_state_dict(weights)
        return torch, tokenizer, encoder, head

    def probability(self, query: str, questions: list[str]) -> np.ndarray:
        """For each of `questions`, the probability that it asks what `query` asks (the mean of
        both reading orders, so the score is symmetric); 0 where they cannot be one question
        (memory.text.different_questions: "Who is X?" and "Who was X's mother?", "Who" and "Where")."""
        out = np.zeros(len(questions), np.float32)
        read = np.array([not different_questions(query, q) for q in questions], dtype=bool)
        asked = [q for q, r in zip(questions, read) if r]  # the model reads only pairs the rule leaves open
        if not asked:
            return out
        queries = [query] * len(asked)
        self.load()
        with self._lock:
            torch, tokenizer, encoder, head = self._model
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                with torch.inference_mode():
                    both = pair_logits(tokenizer, encoder, head, queries + asked, asked + queries)
            finally:
                torch.set_num_threads(before)
        p = torch.sigmoid(both.float()).numpy()
        out[read] = (p[: len(asked)] + p[len(asked):]) / 2
        return out
