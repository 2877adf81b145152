"""Questions that cannot be one (memory.text.different_questions: a general question about a name
against a particular fact about it, "Who is X?" / "Who was X's mother?"; or different kinds of
answer, "Who directed X?" / "Where is X located?"): what the rule costs and what it would have
spared recorded runs.

On the zsRE dev file: the share of paraphrases it would part from their own question (a cost),
and of each neighbour template it parts from the corrected question. On recorded `ratchet eval
zsre` runs (neighbours as asked now, evals.rescore): each tier that recorded the memories it was
shown, replayed with the rule. An answer all of whose shown memories fall to the rule had no
memory found and no adapter scope, so the base model answered it: its recorded base answer
(exact). One that keeps some of its memories stays as recorded. Weights only shows no memories,
but its adapter scope comes from the same search: replayed with the memories memory + weights was shown.

    python -m evals.different_questions reports/zsre-report-n200-k50-2026-12-05 reports/zsre-report-n1000-k100-2026-12-06
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from evals.rescore import as_asked_now
from evals.zsre import score
from evals.zsre_data import records as all_records
from memory.text import different_questions
from trainer.neighbours import record_neighbours

FIGURES = ("reliability", "generalisation", "neighbour_locality_strict", "neighbour_bleed", "n_neighbours")


def on_dev(rows: list[dict]) -> dict:
    """Paraphrases parted from their question, and per neighbour template the share parted from it."""
    parted, asked = Counter(), Counter()
    for r in rows:
        for q in record_neighbours(r):
            t = q.replace(r["subject"], "{s}")
            asked[t] += 1
            parted[t] += different_questions(q, r["question"])
    lost = [(r["paraphrase"], r["question"]) for r in rows if different_questions(r["paraphrase"], r["question"])]
    return {"records": len(rows), "paraphrases_parted": len(lost), "examples": lost,
            "templates": {t: parted[t] / asked[t] for t in asked}}


def _replayed(a: dict, got: dict, shown: dict) -> dict:
    """`got` with each answer whose shown memories all fall to the rule replaced by the base's."""
    def plain(question: str, memories: list[dict], text: str, base: str) -> str:
        return base if memories and all(different_questions(question, m["question"]) for m in memories) else text

    return {**got, "q": plain(a["question"], shown["q"], got["q"], a["base"]["q"]),
            "p": plain(a["paraphrase"], shown["p"], got["p"], a["base"]["p"]),
            "n": [plain(q, m, t, b) for q, m, t, b in zip(a["neighbours"], shown["n"], got["n"], a["base"]["n"])]}


def on_run(results: dict, subjects: dict[str, str]) -> dict:
    """Per tier, its figures as recorded and replayed with the rule (neighbours as asked now)."""
    rows = [a for a in results["memory_tier_answers"] if "l" in a["got"]]
    kept = {t: (v if isinstance(v, dict) else dict(zip([a["id"] for a in rows], v)))
            for t, v in results.get("tier_answers", {}).items()}
    tiers = {"memory_tier_at_once": ({a["id"]: a["got"] for a in rows}, None)}
    tiers.update({t: (kept[t], None) for t in ("memory_only", "both") if t in kept})
    if "weights_only" in kept and "both" in kept:
        tiers["weights_only"] = (kept["weights_only"], "both")
    out = {}
    for tier, (answers, shown_in) in tiers.items():
        before, after = [], []
        for a in rows:
            got = answers[a["id"]]
            shown = (kept[shown_in] if shown_in else answers)[a["id"]]["shown"]
            before.append({**a, "got": got})
            after.append({**a, "got": _replayed(a, got, shown)})
        out[tier] = {}
        for how, replay in (("recorded", before), ("with the rule", after)):
            asked = as_asked_now(replay, subjects)
            s = score(asked, [r["got"] for r in asked], [r["base"] for r in asked])
            out[tier][how] = {k: s[k] for k in FIGURES}
    return out


def write(dev: dict, runs: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "different-questions.json").write_text(json.dumps({"dev": dev, "runs": runs}, indent=1))
    lines = ["# Questions that cannot be one: general against particular, person against place against time", "",
             "`memory.text.different_questions`, applied by the same-question model (memory.matcher gives such pairs 0). "
             "Written by `python -m evals.different_questions`.", "",
             "## On the dev file", "", "| records | paraphrases parted from their question | "
             + " | ".join(next(iter(dev.values()))["templates"]) + " |",
             "|---|---|" + "---|" * len(next(iter(dev.values()))["templates"])]
    for split, d in dev.items():
        lines.append(f"| {split} | {d['paraphrases_parted']} / {d['records']} | "
                     + " | ".join(f"{v:.3f}" for v in d["templates"].values()) + " |")
    lines += ["", "Template columns: the share of that neighbour question the rule parts from the corrected question. "
              "Paraphrases parted are a cost: the correction no longer reaches them.",
              "", "Why: of the 26 bleeding neighbour answers of the N=1000 run's memory tier at once (2026-12-06, "
              "neighbours as asked now), 17 were \"Who is X?\" or \"What is X known for?\" shown a particular fact "
              "about X, and 9 \"Where is X located/from?\", 6 of them shown a who- or when-question (the other 3: an "
              "airport question), at same-question P 0.52-1.00. "
              "The rule names question forms and interrogatives only; records outside the dev file test it.",
              "", "Replay: an answer whose every shown memory falls to the rule is the recorded base answer (no memory "
              "found, so no memory shown and no adapter scope: the base model answers); exact. Answers that keep a "
              "memory stay as recorded, and so does what the adapter itself does to questions still in its scope.",
              "", "## Recorded runs replayed", "",
              "| run | tier | | reliability | generalisation | neighbours strict | bleed | neighbours |",
              "|---|---|---|---|---|---|---|---|"]
    for run, tiers in runs.items():
        for tier, hows in tiers.items():
            for how, f in hows.items():
                lines.append(f"| {run} | {tier} | {how} | {f['reliability']:.3f} | {f['generalisation']:.3f} | "
                             f"{f['neighbour_locality_strict']:.3f} | {f['neighbour_bleed']:.3f} | {f['n_neighbours']} |")
    (out / "different-questions.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="report folders with a results.json")
    ap.add_argument("--output", type=Path, default=Path("reports/memory-tier"))
    a = ap.parse_args()
    records = all_records()
    subjects = {r["id"]: r["subject"] for r in records}
    dev = {"tune 1-2000": on_dev(records[:2000]), f"report 2001-{len(records)}": on_dev(records[2000:])}
    runs = {r.name: on_run(json.loads((r / "results.json").read_text()), subjects) for r in a.runs}
    write(dev, runs, a.output)
    print((a.output / "different-questions.md").read_text())


if __name__ == "__main__":
    main()
