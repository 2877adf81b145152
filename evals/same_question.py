"""When is a retrieved memory the same question? The similarity at which the agent's verify-and-
repair step (agent.repair.REPAIR_SCORE) replaces an answer by the correction, tuned on zsRE dev
records 1-2000 only (evals.zsre.SPLITS["tune"]).

For each threshold: the share of paraphrases that reach their own question (the repair can fire
where it should), of neighbour questions (trainer.neighbours templates about the same subject)
that reach it, and of other records' questions (other subjects) whose nearest question of a
different fact reaches it (the repair would force a wrong answer there).

    python -m evals.same_question --output reports/memory-tier
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from agent.repair import REPAIR_SCORE
from evals.zsre import SPLITS
from evals.zsre_data import records as all_records
from memory.text import normalise
from trainer.neighbours import template_neighbours

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=Path("reports/memory-tier"))
    a = ap.parse_args()
    from memory.embed import Embedder

    start, end = SPLITS["tune"]
    write(shares(Embedder(), all_records()[start:end]), a.output, f"{start + 1}-{end}")


if __name__ == "__main__":
    main()
