"""A finished `ratchet eval zsre` run asked again on its own data directory (its memories and its
active adapter), with the server's settings as they are now: what a change of serving alone (say,
the same-question model, RATCHET_SAME_QUESTION) does to the served answers, with no new training.
Scored against the run's recorded base answers; the unrelated question is not asked again, the
neighbours only of the records the run measured in full, a subject's once, of another kind than
its corrected question (evals.rescore.as_asked_now).

    python -m evals.served_again reports/zsre-report-n200-k50 --data reports/zsre-report-n200-k50/data-x \\
        --env RATCHET_SAME_QUESTION=0.5 --output reports/zsre-report-n200-k50/served-same-question.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from rich.progress import Progress

from evals.rescore import as_asked_now
from evals.server import RatchetServer
from evals.zsre import Client, answers, score
from evals.zsre_data import records as all_records

CONFIGURATIONS = {"weights_only": ("ratchet", False), "memory_only": ("ratchet-base", True), "both": ("ratchet", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the run's report folder (results.json)")
    ap.add_argument("--data", type=Path, required=True, help="the run's data directory (copied, never changed)")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server, repeatable")
    ap.add_argument("--configurations", default="weights_only", help=f"comma-separated of {', '.join(CONFIGURATIONS)}")
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--output", type=Path, required=True)
    a = ap.parse_args()
    results = json.loads((a.run / "results.json").read_text())
    rows = as_asked_now(results["memory_tier_answers"], {r["id"]: r["subject"] for r in all_records()})
    records = [{"question": r["question"], "paraphrase": r["paraphrase"], "answer": r["answer"],
                "neighbours": r["neighbours"], "locality_question": None} for r in rows]
    base = [r["base"] for r in rows]  # its unrelated answer ("l") goes unscored: not asked again
    env = dict(e.split("=", 1) for e in a.env)
    out = {"run": str(a.run), "env": env, "recorded": {k: results["summary"].get(k) for k in CONFIGURATIONS},
           "neighbours_per": results.get("neighbours_per", "record"), "now": {}}
    with tempfile.TemporaryDirectory(dir=a.data.parent) as scratch:
        data = Path(scratch) / "data"
        shutil.copytree(a.data, data, ignore=shutil.ignore_patterns("serve-*.log", "ratchet.lock"))
        with RatchetServer(data, engine=a.engine, env=env) as server, Progress() as progress:
            client = Client(server.url, a.concurrency)
            for name in a.configurations.split(","):
                model, memory = CONFIGURATIONS[name]
                got = answers(client, records, model, memory, progress, name)
                out["now"][name] = score(records, got, base)
                print(name, json.dumps(out["now"][name]))
    a.output.write_text(json.dumps(out, indent=1))
    write_markdown(out, a.output.with_suffix(".md"))


FIGURES = (("reliability", "reliability"), ("generalisation", "generalisation"),
           ("neighbour_locality_strict", "neighbours strict"), ("neighbour_bleed", "bleed"), ("n_neighbours", "neighbours"))


def write_markdown(out: dict, path: Path) -> None:
    """The figures as the run recorded them and as served now, side by side."""
    def cell(v):
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# {out['run']} served again", "", f"Server environment: {out['env'] or 'defaults'}. Recorded: as "
             f"the run measured them, a subject's neighbours once per {out.get('neighbours_per', 'record')}; now: the "
             "run's data directory served by this code, a subject's neighbours once.", "",
             "| configuration | | " + " | ".join(name for _, name in FIGURES) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for name, now in out["now"].items():
        recorded = out["recorded"].get(name) or {}
        lines += [f"| {name} | recorded | " + " | ".join(cell(recorded.get(k)) for k, _ in FIGURES) + " |",
                  f"| {name} | now | " + " | ".join(cell(now.get(k)) for k, _ in FIGURES) + " |"]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
