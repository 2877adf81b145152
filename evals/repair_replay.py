"""The agent's verify-and-repair decision (agent.repair) replayed on a recorded memory-tier run:
each recorded answer, with the memories it was shown, is checked and repaired as the agent
would, and the run scored again. Exact for a repair that answers with the correction (no model
call), so a run before the repair gives its figures after it.

    python -m evals.repair_replay reports/memory-tier/before-short/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.protocol import Completion
from agent.repair import REPAIR_SCORE, repaired, same_question_memory
from evals.zsre import score


def repair(text: str, shown: list[dict], question: str, threshold: float = REPAIR_SCORE) -> str:
    fixed = repaired(Completion(text=text), same_question_memory(shown, threshold), question)
    return text if fixed is None else fixed.text


def replay(results: dict, threshold: float = REPAIR_SCORE) -> tuple[dict, dict]:
    """The memory tier's scores as recorded and as repaired, and how many answers were repaired."""
    rows = results["memory_tier_answers"]
    records = [{"answer": a["answer"], "neighbours": a["neighbours"]} for a in rows]
    base = [a["base"] for a in rows]
    before = [a["got"] for a in rows]
    after, counts = [], {"q": 0, "p": 0, "n": 0}
    for a in rows:
        g, shown = a["got"], a["got"]["shown"]
        new = {**g, "q": repair(g["q"], shown["q"], a["question"], threshold),
               "p": repair(g["p"], shown["p"], a["paraphrase"], threshold),
               "n": [repair(t, s, q, threshold) for t, s, q in zip(g["n"], shown["n"], a["neighbours"])]}
        counts["q"] += new["q"] != g["q"]
        counts["p"] += new["p"] != g["p"]
        counts["n"] += sum(x != y for x, y in zip(new["n"], g["n"]))
        after.append(new)
    return {"before": score(records, before, base), "after": score(records, after, base)}, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--thresholds", default=str(REPAIR_SCORE), help="comma-separated same-question scores")
    a = ap.parse_args()
    results = json.loads(a.results.read_text())
    for t in (float(x) for x in a.thresholds.split(",")):
        scores, counts = replay(results, t)
        print(json.dumps({"threshold": t, "repaired": counts, **scores}))


if __name__ == "__main__":
    main()
