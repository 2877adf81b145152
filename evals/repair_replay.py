"""The agent's verify-and-repair decision (agent.repair) replayed on a recorded memory-tier run:
each recorded answer, with the memories it was shown, is checked and repaired as the agent
would, and the run scored again. Exact for a repair that answers with the correction (no model
call), and for an answer changed by memories it does not give (agent.repair.steered), which the
agent replaces by the model's answer shown no memory: on `ratchet-base`, the recorded base answer.

With `--same`, each shown memory is first put to the same-question model (memory.matcher), as
the agent does with RATCHET_SAME_QUESTION: an answer all of whose memories it rejects becomes the
recorded base answer (exact on `ratchet-base`); one that keeps only some stays as recorded (counted
as `partial`, not exact). Where a run did not record the memories' questions, each is the run's
corrected question with that answer whose similarity to the asked one is nearest to the recorded score.

    python -m evals.repair_replay reports/memory-tier/before-short/results.json
    python -m evals.repair_replay reports/zsre-report-n200-k50/results.json --same 0.3,0.5,0.7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.protocol import Completion
from agent.repair import REPAIR_PROBABILITY, REPAIR_SCORE, repaired, same_question_memory, steered
from evals.zsre import score
from memory.text import normalise


def repair(text: str, shown: list[dict], question: str, threshold: float = REPAIR_SCORE, plain: str | None = None,
           probability: float = REPAIR_PROBABILITY) -> str:
    """The answer the agent gives instead of `text`; `plain`: the answer shown no memory (None: not checked)."""
    fixed = repaired(Completion(text=text), same_question_memory(shown, threshold, probability), question)
    if fixed is not None:
        return fixed.text
    return plain if plain is not None and steered(Completion(text=text), shown, question) else text


def _asked(a: dict) -> list[tuple[str, list[dict]]]:
    shown = a["got"]["shown"]
    return [(a["question"], shown["q"]), (a["paraphrase"], shown["p"]), *zip(a["neighbours"], shown["n"])]


def match(results: dict, embedder, matcher) -> dict[tuple[str, str], float]:
    """P(same question) of each asked question and each memory shown to it (memory.matcher)."""
    rows = results["memory_tier_answers"]
    questions = [a["question"] for a in rows]
    vectors = embedder.embed(questions)
    by_answer: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_answer.setdefault(normalise(r["answer"]), []).append(i)
    pairs: dict[tuple[str, str], float] = {}
    for a in rows:
        for asked, shown in _asked(a):
            if not shown:
                continue
            v = embedder.embed([asked])[0]
            for m in (m for m in shown if "question" not in m):  # older runs did not record it
                same = by_answer[normalise(m["answer"])]
                m["question"] = questions[min(same, key=lambda i: abs(float(vectors[i] @ v) - m["score"]))]
            ps = matcher.probability(asked, [m["question"] for m in shown])
            pairs.update({(asked, m["question"]): float(p) for m, p in zip(shown, ps)})
    return pairs


def replay(results: dict, threshold: float = REPAIR_SCORE, check: bool = True,
           same: tuple[dict, float] | None = None, probability: float = REPAIR_PROBABILITY) -> tuple[dict, dict]:
    """The memory tier's scores as recorded and as repaired, and how many answers were repaired.
    `same`: (match(...), the probability a memory needs to be kept); `probability`: that a kept
    memory needs to repair an answer."""
    rows = results["memory_tier_answers"]
    records = [{"answer": a["answer"], "neighbours": a["neighbours"]} for a in rows]
    base = [a["base"] for a in rows]
    before = [a["got"] for a in rows]
    after, counts = [], {"q": 0, "p": 0, "n": 0, "partial": 0}
    for a in rows:
        g, shown = a["got"], a["got"]["shown"]
        b = {"q": a["base"].get("q"), "p": a["base"].get("p"), "n": a["base"].get("n", [None] * len(g["n"]))} \
            if check else {"q": None, "p": None, "n": [None] * len(g["n"])}
        if same is not None:
            g, shown = _kept(a, *same, counts)
        new = {**g, "q": repair(g["q"], shown["q"], a["question"], threshold, b["q"], probability),
               "p": repair(g["p"], shown["p"], a["paraphrase"], threshold, b["p"], probability),
               "n": [repair(t, s, q, threshold, p, probability)
                     for t, s, q, p in zip(g["n"], shown["n"], a["neighbours"], b["n"])]}
        counts["q"] += new["q"] != g["q"]
        counts["p"] += new["p"] != g["p"]
        counts["n"] += sum(x != y for x, y in zip(new["n"], g["n"]))
        after.append(new)
    return {"before": score(records, before, base), "after": score(records, after, base)}, counts


def _kept(a: dict, pairs: dict, at: float, counts: dict) -> tuple[dict, dict]:
    """The recorded answers and memories of `a` once the matcher has had its say: an answer whose
    memories it all rejects becomes the base model's (stays as recorded, counted `partial`, where
    the run did not ask the base model: outside a sample)."""
    got, base = a["got"], a["base"]
    texts, memories = [], []
    for (asked, shown), text, plain in zip(_asked(a), [got["q"], got["p"], *got["n"]],
                                           [base.get("q"), base.get("p"), *base.get("n", [])]):
        keep = [{**m, "same": p} for m in shown if (p := pairs[(asked, m["question"])]) >= at]
        rejected = bool(shown) and not keep
        counts["partial"] += 0 < len(keep) < len(shown) or (rejected and plain is None)
        texts.append(plain if rejected and plain is not None else text)
        memories.append(keep)
    return ({**got, "q": texts[0], "p": texts[1], "n": texts[2:]},
            {"q": memories[0], "p": memories[1], "n": memories[2:]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--thresholds", default=str(REPAIR_SCORE), help="comma-separated same-question scores")
    ap.add_argument("--no-check", action="store_true", help="repair only, as the agent did before agent.repair.steered")
    ap.add_argument("--same", help="comma-separated probabilities the same-question model (memory.matcher) must give a shown memory")
    ap.add_argument("--repair-at", default=str(REPAIR_PROBABILITY),
                    help="comma-separated probabilities from which a kept memory repairs an answer (with --same)")
    ap.add_argument("--per-subject", action="store_true", help="neighbours as the benchmark asks them now: a subject's once, of another kind (evals.rescore)")
    a = ap.parse_args()
    results = json.loads(a.results.read_text())
    if a.per_subject:
        from evals.rescore import as_asked_now
        from evals.zsre_data import records

        subjects = {r["id"]: r["subject"] for r in records()}
        results["memory_tier_answers"] = as_asked_now(results["memory_tier_answers"], subjects)
    pairs = None
    if a.same:
        from memory.embed import Embedder
        from memory.matcher import Matcher

        pairs = match(results, Embedder(), Matcher())
    for t in (float(x) for x in a.thresholds.split(",")):
        for at in [float(x) for x in a.same.split(",")] if a.same else [None]:
            for fix in [float(x) for x in a.repair_at.split(",")] if a.same else [REPAIR_PROBABILITY]:
                scores, counts = replay(results, t, check=not a.no_check, same=None if at is None else (pairs, at),
                                        probability=fix)
                print(json.dumps({"threshold": t, "check": not a.no_check, "same_question": at,
                                  "repair_at": fix if a.same else None, "changed": counts, **scores}))


if __name__ == "__main__":
    main()
