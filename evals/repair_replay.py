"""The agent's verify-and-repair decision (agent.repair) replayed on a recorded memory-tier run:
each recorded answer, with the memories it was shown, is checked and repaired as the agent
would, and the run scored again. Exact for a repair that answers with the correction (no model
call), and for an answer changed by memories it does not give (agent.repair.steered), which the
agent replaces by the model's answer shown no memory: on `ratchet-base`, the recorded base answer.

    python -m evals.repair_replay reports/memory-tier/before-short/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.protocol import Completion
from agent.repair import REPAIR_SCORE, repaired, same_question_memory, steered
from evals.zsre import score


def repair(text: str, shown: list[dict], question: str, threshold: float = REPAIR_SCORE, plain: str | None = None) -> str:
    """The answer the agent gives instead of `text`; `plain`: the answer shown no memory (None: not checked)."""
    fixed = repaired(Completion(text=text), same_question_memory(shown, threshold), question)
    if fixed is not None:
        return fixed.text
    return plain if plain is not None and steered(Completion(text=text), shown, question) else text


def replay(results: dict, threshold: float = REPAIR_SCORE, check: bool = True) -> tuple[dict, dict]:
    """The memory tier's scores as recorded and as repaired, and how many answers were repaired."""
    rows = results["memory_tier_answers"]
    records = [{"answer": a["answer"], "neighbours": a["neighbours"]} for a in rows]
    base = [a["base"] for a in rows]
    before = [a["got"] for a in rows]
    after, counts = [], {"q": 0, "p": 0, "n": 0}
    for a in rows:
        g, shown = a["got"], a["got"]["shown"]
        b = a["base"] if check else {"q": None, "p": None, "n": [None] * len(g["n"])}
        new = {**g, "q": repair(g["q"], shown["q"], a["question"], threshold, b["q"]),
               "p": repair(g["p"], shown["p"], a["paraphrase"], threshold, b["p"]),
               "n": [repair(t, s, q, threshold, p) for t, s, q, p in zip(g["n"], shown["n"], a["neighbours"], b["n"])]}
        counts["q"] += new["q"] != g["q"]
        counts["p"] += new["p"] != g["p"]
        counts["n"] += sum(x != y for x, y in zip(new["n"], g["n"]))
        after.append(new)
    return {"before": score(records, before, base), "after": score(records, after, base)}, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--thresholds", default=str(REPAIR_SCORE), help="comma-separated same-question scores")
    ap.add_argument("--no-check", action="store_true", help="repair only, as the agent did before agent.repair.steered")
    a = ap.parse_args()
    results = json.loads(a.results.read_text())
    for t in (float(x) for x in a.thresholds.split(",")):
        scores, counts = replay(results, t, check=not a.no_check)
        print(json.dumps({"threshold": t, "check": not a.no_check, "changed": counts, **scores}))


if __name__ == "__main__":
    main()
