"""When is a retrieved memory the same question? The similarity at which the agent's verify-and-
repair step (agent.repair.REPAIR_SCORE) replaces an answer by the correction, tuned on zsRE dev
records 1-2000 only (evals.zsre.SPLITS["tune"]); and the same-question model (memory.matcher),
trained on those records and measured on the report split.

For each threshold: the share of paraphrases that reach their own question (the repair can fire
where it should), of neighbour questions (trainer.neighbours templates about the same subject)
that reach it, and of other records' questions (other subjects) whose nearest question of a
different fact reaches it (the repair would force a wrong answer there).

    python -m evals.same_question --output reports/memory-tier
    python -m evals.same_question --train      # memory/same_question/, then its report
    python -m evals.same_question --matcher    # the report of the model in memory/same_question/
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from agent.repair import REPAIR_SCORE
from evals.zsre import SPLITS
from evals.zsre_data import records as all_records
from memory.text import normalise
from trainer.neighbours import ANCHOR_TEMPLATES, NEIGHBOUR_TEMPLATES, template_neighbours

THRESHOLDS = tuple(round(0.875 + 0.005 * i, 3) for i in range(26))
MAX_WRONG = 0.005  # the share of neighbour or other-fact questions a threshold may let through, at most


def shares(embedder, rows: list[dict]) -> list[dict]:
    questions = [r["question"] for r in rows]
    q = embedder.embed(questions)
    p = embedder.embed([r["paraphrase"] for r in rows])
    neighbours = [template_neighbours(r["subject"]) for r in rows]
    nb = embedder.embed([x for ns in neighbours for x in ns]).reshape(len(rows), len(neighbours[0]), -1)
    own = np.einsum("ij,ij->i", p, q)
    near = np.einsum("ikj,ij->ik", nb, q).ravel()
    sim = q @ q.T
    facts = [normalise(r["answer"]) for r in rows]
    other = np.array([max((sim[i, j] for j in range(len(rows)) if facts[j] != facts[i]
                           and rows[j]["subject"] != rows[i]["subject"]), default=0.0) for i in range(len(rows))])
    return [{"threshold": t, "paraphrase": float((own >= t).mean()), "neighbour": float((near >= t).mean()),
             "other_fact": float((other >= t).mean())} for t in THRESHOLDS]


def write(table: list[dict], output: Path, records: str) -> None:
    """same_question.json and .md in `output`: the table, the threshold MAX_WRONG picks, and the
    row of the threshold in use (memory.text.SAME_QUESTION_SCORE, agent.repair.REPAIR_SCORE)."""
    chosen = next(r for r in table if r["neighbour"] <= MAX_WRONG and r["other_fact"] <= MAX_WRONG)
    used = next(r for r in table if r["threshold"] == REPAIR_SCORE)
    output.mkdir(parents=True, exist_ok=True)
    (output / "same_question.json").write_text(json.dumps({"records": records, "chosen": chosen, "in_use": used,
                                                           "table": table}, indent=1))
    lines = [f"# Same-question threshold, zsRE dev records {records}", "",
             f"Lowest threshold letting through at most {MAX_WRONG:.1%} of neighbour and of other-fact questions: "
             f"{chosen['threshold']} (paraphrases reaching their question: {chosen['paraphrase']:.3f}). In use "
             f"(memory.text.SAME_QUESTION_SCORE, agent.repair.REPAIR_SCORE): **{used['threshold']}**, reached by "
             f"{used['paraphrase']:.3f} of paraphrases, {used['neighbour']:.4f} of neighbour questions and "
             f"{used['other_fact']:.4f} of other facts' nearest questions.", "",
             "| threshold | paraphrase reaches its question | neighbour reaches it | nearest other fact reaches it |",
             "|---|---|---|---|"]
    lines += [f"| {r['threshold']} | {r['paraphrase']:.3f} | {r['neighbour']:.4f} | {r['other_fact']:.4f} |"
              for r in table]
    (output / "same_question.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# -- the same-question model (memory.matcher) ---------------------------------------------------

def _template(question: str, subject: str) -> str:
    return question.replace(subject, "{s}")


def _nearest_other_fact(rows: list[dict], similarity: np.ndarray, i: int, top: int) -> int | None:
    """Among the `top` rows most similar to row `i` (`similarity[i]`), the first of another subject
    and another answer."""
    return next((int(j) for j in np.argsort(-similarity[i])[:top] if rows[j]["subject"] != rows[i]["subject"]
                 and normalise(rows[j]["answer"]) != normalise(rows[i]["answer"])), None)


def training_pairs(rows: list[dict], embedder, seed: int = 0, swaps: int = 12) -> list[tuple[str, str, int]]:
    """(question, question, same?) pairs from zsRE-style records: a question and its paraphrase
    (same); the subject's ANCHOR_TEMPLATES questions (not the measured NEIGHBOUR_TEMPLATES) and its
    other records with another answer (not same); other records' question wordings about this
    subject (same when the two wordings were ever used for one fact, not same otherwise); and each
    paraphrase's nearest question of another subject and fact (not same)."""
    rng = random.Random(seed)
    parent: dict[str, str] = {}

    def find(x: str) -> str:  # relations: question wordings joined by the records that used them together
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        parent[find(_template(r["question"], r["subject"]))] = find(_template(r["paraphrase"], r["subject"]))
        by_subject.setdefault(r["subject"], []).append(r)
    for s, group in by_subject.items():
        for a in group:
            for b in group:
                if normalise(a["answer"]) == normalise(b["answer"]):
                    parent[find(_template(a["question"], s))] = find(_template(b["question"], s))
    wordings = list(dict.fromkeys([_template(r["question"], r["subject"]) for r in rows]
                                  + [_template(r["paraphrase"], r["subject"]) for r in rows]))
    pairs: list[tuple[str, str, int]] = []
    for r in rows:
        s, q, p = r["subject"], r["question"], r["paraphrase"]
        pairs += [(q, p, 1), (p, q, 1)]
        pairs += [(t.format(s=s), x, 0) for t in ANCHOR_TEMPLATES for x in (q, p)]
        pairs += [(b["question"], q, int(normalise(b["answer"]) == normalise(r["answer"])))
                  for b in by_subject[s] if b is not r]
        own = find(_template(q, s))
        for t in rng.sample(wordings, swaps):
            x = t.format(s=s)
            if normalise(x) not in (normalise(q), normalise(p)):
                pairs.append((x, q, int(find(t) == own)))
    q = embedder.embed([r["question"] for r in rows])
    sim = embedder.embed([r["paraphrase"] for r in rows]) @ q.T
    for i, r in enumerate(rows):
        j = _nearest_other_fact(rows, sim, i, top=5)
        if j is not None:
            pairs.append((r["paraphrase"], rows[j]["question"], 0))
    return pairs


def train(rows: list[dict], embedder, output: Path, *, r: int = 16, lr: float = 5e-4, batch: int = 32,
          seed: int = 0) -> None:
    """One epoch of a LoRA (PEFT) on the packaged MiniLM and a one-unit head over the mean-pooled
    pair, on training_pairs(rows); written to `output` as memory.matcher.Matcher reads it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from tqdm import tqdm

    from memory.matcher import load_encoder, pair_logits

    torch.manual_seed(seed)
    rng = random.Random(seed)
    pairs = training_pairs(rows, embedder, seed)
    rng.shuffle(pairs)
    tokenizer, encoder = load_encoder()
    encoder = get_peft_model(encoder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "key", "value", "dense"]))
    head = torch.nn.Linear(encoder.config.hidden_size, 1)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    steps = len(pairs) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    positive = sum(y for *_, y in pairs) / len(pairs)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - positive) / positive))
    encoder.train()
    for step in (bar := tqdm(range(steps), desc="same-question model", unit="step")):
        chunk = pairs[step * batch:(step + 1) * batch]
        flipped = [(b, a, y) if rng.random() < 0.5 else (a, b, y) for a, b, y in chunk]  # either reading order
        a, b, y = zip(*flipped)
        loss = loss_fn(pair_logits(tokenizer, encoder, head, a, b), torch.tensor(y, dtype=torch.float32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    output.mkdir(parents=True, exist_ok=True)
    encoder.peft_config["default"].base_model_name_or_path = "all-MiniLM-L6-v2"  # the packaged one, found at load
    encoder.save_pretrained(output)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, output / "head.safetensors")


def matcher_table(rows: list[dict], embedder, matcher) -> list[dict]:
    """Per threshold, as `shares` but for the same-question model: paraphrase → its question,
    NEIGHBOUR_TEMPLATES questions → the question, a paraphrase → its nearest other-fact question."""
    q = embedder.embed([r["question"] for r in rows])
    sim = embedder.embed([r["paraphrase"] for r in rows]) @ q.T
    para = np.array([matcher.probability(r["question"], [r["paraphrase"]])[0] for r in rows])
    near = np.stack([matcher.probability(r["question"], [t.format(s=r["subject"]) for t in NEIGHBOUR_TEMPLATES])
                     for r in rows])  # rows x templates
    other = []
    for i, r in enumerate(rows):
        j = _nearest_other_fact(rows, sim, i, top=8)
        if j is not None:
            other.append(matcher.probability(rows[j]["question"], [r["paraphrase"]])[0])
    other = np.array(other)
    return [{"threshold": t, "paraphrase": float((para >= t).mean()), "neighbour": float((near >= t).mean()),
             "other_fact": float((other >= t).mean()),
             "by_template": dict(zip(NEIGHBOUR_TEMPLATES, map(float, (near >= t).mean(axis=0))))}
            for t in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98, 0.99)]


def candidate_table(rows: list[dict], embedder) -> list[dict]:
    """Per cosine similarity, the share of paraphrases that reach their question's: the floor
    below which the same-question model never reads a correction (memory.matcher.CANDIDATE_SIMILARITY)."""
    own = np.einsum("ij,ij->i", embedder.embed([r["paraphrase"] for r in rows]), embedder.embed([r["question"] for r in rows]))
    return [{"similarity": t, "paraphrase": float((own >= t).mean())} for t in (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.875)]


def write_matcher(tables: dict[str, list[dict]], candidates: list[dict], output: Path, seconds: float) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "matcher.json").write_text(json.dumps({**tables, "candidates": candidates}, indent=1))
    from agent.repair import REPAIR_PROBABILITY
    from memory.matcher import CANDIDATE_SIMILARITY, SAME_QUESTION_PROBABILITY

    lines = ["# Same-question model (memory.matcher)", "",
             "MiniLM-L6 cross-encoder (LoRA r=16 + a one-unit head), one epoch on pairs from zsRE dev records "
             "1-2000 (evals.same_question.training_pairs; neighbours there: ANCHOR_TEMPLATES and the dev file's "
             "other relations, never NEIGHBOUR_TEMPLATES). Shares of pairs the model calls the same question at "
             f"each probability; in use: {SAME_QUESTION_PROBABILITY} to show a memory, {REPAIR_PROBABILITY} to "
             "repair an answer with it (agent.repair: the lowest row with at most 1% of neighbours on records "
             f"1-2000; there the pairs were trained on, the neighbours never). Measured in {seconds:.0f} s.", ""]
    for name, table in tables.items():
        lines += [f"## {name}", "", "| P(same) at least | paraphrase → its question | neighbour → it | nearest other fact → it |",
                  "|---|---|---|---|"]
        lines += [f"| {r['threshold']} | {r['paraphrase']:.3f} | {r['neighbour']:.4f} | {r['other_fact']:.4f} |"
                  for r in table]
        used = [r for r in table if r["threshold"] in (SAME_QUESTION_PROBABILITY, REPAIR_PROBABILITY)]
        lines += ["", "Neighbours by template, at the probabilities in use:", "",
                  "| template | " + " | ".join(f"P ≥ {r['threshold']}" for r in used) + " |", "|---|" + "---|" * len(used)]
        lines += [f"| {t} | " + " | ".join(f"{r['by_template'][t]:.4f}" for r in used) + " |" for t in NEIGHBOUR_TEMPLATES]
        lines.append("")
    lines += ["## The similarity from which the model reads a correction, records 1-2000", "",
              f"In use: {CANDIDATE_SIMILARITY} (memory.matcher.CANDIDATE_SIMILARITY).", "",
              "| cosine at least | paraphrase reaches its question |", "|---|---|"]
    lines += [f"| {r['similarity']} | {r['paraphrase']:.3f} |" for r in candidates]
    (output / "matcher.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=Path("reports/memory-tier"))
    ap.add_argument("--train", action="store_true", help="train the same-question model on the tune split, then report it")
    ap.add_argument("--matcher", action="store_true", help="report the same-question model in memory/same_question/")
    a = ap.parse_args()
    from memory.embed import Embedder

    embedder = Embedder()
    rows = all_records()
    start, end = SPLITS["tune"]
    if not (a.train or a.matcher):
        write(shares(embedder, rows[start:end]), a.output, f"{start + 1}-{end}")
        return
    from memory.matcher import MATCHER_DIR, Matcher

    if a.train:
        train(rows[start:end], embedder, MATCHER_DIR)
    started, matcher = time.perf_counter(), Matcher()
    report_start, report_end = SPLITS["report"]
    tables = {f"report split, records {report_start + 1}-{report_end}": matcher_table(rows[report_start:report_end], embedder, matcher),
              f"tune split, records {start + 1}-{end} (trained on)": matcher_table(rows[start:end], embedder, matcher)}
    write_matcher(tables, candidate_table(rows[start:end], embedder), a.output, time.perf_counter() - started)


if __name__ == "__main__":
    main()
