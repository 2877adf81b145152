"""A recorded `ratchet eval zsre` run scored again with each corrected subject's neighbours counted
once, as evals.zsre.with_neighbours asks them, for runs that counted them once per record that
corrected the subject (zsRE often words one fact several times). The memory tier's answers are
recorded in every run; the other tiers' only in runs that keep `tier_answers`.

    python -m evals.rescore reports/zsre-report-n200-k50/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.zsre import score
from evals.zsre_data import records as all_records
from trainer.neighbours import first_per_subject


def once_per_subject(rows: list[dict], subjects: dict[str, str]) -> list[dict]:
    """`rows` (memory_tier_answers) with neighbours only at each subject's first record measured in
    full (its unrelated question answered: a long run's sample); `subjects`: record id → subject."""
    firsts = first_per_subject([subjects[a["id"]] for a in rows], {i for i, a in enumerate(rows) if "l" in a["got"]})
    out = []
    for i, a in enumerate(rows):
        if i not in firsts and a["neighbours"]:
            got = {**a["got"], "n": []}
            if "shown" in got:
                got["shown"] = {**got["shown"], "n": []}
            a = {**a, "neighbours": [], "base": {**a["base"], "n": []}, "got": got}
        out.append(a)
    return out


def rescore(results: dict, subjects: dict[str, str]) -> dict:
    """The memory tier's figures (and each kept tier's) as recorded and with neighbours once per subject."""
    rows = results["memory_tier_answers"]
    measured = [a for a in rows if "l" in a["got"]]  # the records measured in full (a sample's others: q and p only)

    def figures(rs: list[dict], got: list[dict]) -> dict:
        return score(rs, got, [a["base"] for a in rs])

    out = {}
    once = once_per_subject(measured, subjects)
    out["memory_tier_at_once"] = {"per_record": figures(measured, [a["got"] for a in measured]),
                                  "per_subject": figures(once, [a["got"] for a in once])}
    for tier, answers in results.get("tier_answers", {}).items():
        got = [{**answers[a["id"]], "n": answers[a["id"]]["n"][:len(b["neighbours"])]} for a, b in zip(measured, once)]
        out[tier] = {"per_record": figures(measured, [answers[a["id"]] for a in measured]),
                     "per_subject": figures(once, got)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    a = ap.parse_args()
    subjects = {r["id"]: r["subject"] for r in all_records()}
    out = rescore(json.loads(a.results.read_text()), subjects)
    (a.results.parent / "per-subject.json").write_text(json.dumps(out, indent=1))
    for tier, figures in out.items():
        for how, f in figures.items():
            print(tier, how, {k: round(v, 3) if isinstance(v, float) else v for k, v in f.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
