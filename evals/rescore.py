"""A recorded `ratchet eval zsre` run scored again as the benchmark asks its neighbours now: each
corrected subject's once (runs before 60a4f5c counted them once per record that corrected the
subject; zsRE often words one fact several times), and only the templates that ask another kind of
thing than the corrected question (trainer.neighbours.template_neighbours; runs before it asked
every template). The memory tier's answers are recorded in every run; the other tiers' only in
runs that keep `tier_answers`.

    python -m evals.rescore reports/zsre-report-n200-k50/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.zsre import score
from evals.zsre_data import records as all_records
from trainer.neighbours import first_per_subject, record_neighbours, template_neighbours


def keep_neighbours(a: dict, keep: list[bool], got: dict | None = None) -> tuple[dict, dict]:
    """Row `a` (memory_tier_answers) and `got` (its answers in a tier; its memory tier's by default)
    with only the neighbours where `keep` holds."""
    def pick(xs: list) -> list:
        return [x for x, k in zip(xs, keep) if k]

    got = dict(a["got"] if got is None else got)
    got["n"] = pick(got.get("n", []))
    if "shown" in got:
        got["shown"] = {**got["shown"], "n": pick(got["shown"].get("n", []))}
    return {**a, "neighbours": pick(a["neighbours"]), "base": {**a["base"], "n": pick(a["base"].get("n", []))}}, got


def first_subjects(rows: list[dict], subjects: dict[str, str]) -> list[list[bool]]:
    """Per row, its neighbours if it is its subject's first record measured in full (its unrelated
    question answered: a long run's sample), else none; `subjects`: record id → subject."""
    firsts = first_per_subject([subjects[a["id"]] for a in rows], {i for i, a in enumerate(rows) if "l" in a["got"]})
    return [[i in firsts] * len(a["neighbours"]) for i, a in enumerate(rows)]


def other_kinds(rows: list[dict], subjects: dict[str, str]) -> list[list[bool]]:
    """Per row, which of its neighbours are not templates that ask what its question or paraphrase asks."""
    out = []
    for a in rows:
        s = subjects[a["id"]]
        dropped = set(template_neighbours(s)) - set(record_neighbours({**a, "subject": s}))
        out.append([q not in dropped for q in a["neighbours"]])
    return out


def asked_now(rows: list[dict], subjects: dict[str, str]) -> list[list[bool]]:
    """Per row, which of its neighbours the benchmark asks now: a subject's once (first_subjects),
    and of another kind than its corrected question (other_kinds)."""
    return [[x and y for x, y in zip(once, kinds)]
            for once, kinds in zip(first_subjects(rows, subjects), other_kinds(rows, subjects))]


def as_asked_now(rows: list[dict], subjects: dict[str, str]) -> list[dict]:
    """`rows` with only the neighbours the benchmark asks now (asked_now)."""
    out = []
    for a, keep in zip(rows, asked_now(rows, subjects)):
        row, got = keep_neighbours(a, keep)
        out.append({**row, "got": got})
    return out


def rescore(results: dict, subjects: dict[str, str]) -> dict:
    """The memory tier's figures (and each kept tier's): as recorded, with neighbours once per
    subject, and once per subject on templates of another kind only."""
    measured = [a for a in results["memory_tier_answers"] if "l" in a["got"]]  # a sample's others: q and p only
    masks = {"per_record": [[True] * len(a["neighbours"]) for a in measured],
             "per_subject": first_subjects(measured, subjects), "per_subject_other_kinds": asked_now(measured, subjects)}
    tiers = {"memory_tier_at_once": {a["id"]: a["got"] for a in measured}, **results.get("tier_answers", {})}
    out = {}
    for tier, answers in tiers.items():
        out[tier] = {}
        for how, mask in masks.items():
            kept = [keep_neighbours(a, keep, answers[a["id"]]) for a, keep in zip(measured, mask)]
            out[tier][how] = score([r for r, _ in kept], [g for _, g in kept], [r["base"] for r, _ in kept])
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
