"""Efficacy against the adapter's own locality, for every recipe measured on the same 100 zsRE
corrections: where the issue's target (efficacy ≥ 0.95 and token-level locality ≥ 0.95, retrieval
off) lies against what was reached.

    python -m evals.frontier

Reads the consolidation bench's single-training results (`reports/consolidation/results_100*.json`,
`python -m evals.consolidation_bench --n 100`) and `reports/consolidation/levers.json`: figures of
the same measure (the first 100 zsRE records, trainer.evaluate's rules) from experiments whose code
was not kept, each with the report section that describes it. Writes `frontier.{md,png}`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET = (0.95, 0.95)  # efficacy, token-level locality


def points(folder: Path) -> list[dict]:
    """One point per measured recipe: name, family, efficacy, paraphrase, token and strict locality
    (a recipe measured twice: its latest figures)."""
    found: dict[str, dict] = {}
    for path in sorted(folder.glob("results_100*.json")):
        if path.stem.removeprefix("results_100").startswith("x"):
            continue  # cycles (results_100x2…): not one training on the first 100 records
        for r in json.loads(path.read_text()):
            family = "LoRA, no replay" if r["anchors"] == "none" else "LoRA + replay"
            found[r["variant"]] = dict(name=r["variant"], family=family, source=path.name,
                                       **{k: r[k] for k in ("efficacy", "paraphrase", "locality_token", "locality_strict")})
    levers = folder / "levers.json"
    for r in json.loads(levers.read_text()) if levers.exists() else []:
        found[r["name"]] = dict(r, source=f"levers.json ({r['section']})")
    return sorted(found.values(), key=lambda p: (p["family"], -p["efficacy"]))


def report(pts: list[dict]) -> str:
    reached = [p for p in pts if p["efficacy"] >= TARGET[0] and p["locality_token"] >= TARGET[1]]
    best = max((p for p in pts if p["efficacy"] >= TARGET[0]), key=lambda p: p["locality_token"], default=None)
    lines = ["# Efficacy against the adapter's locality (100 zsRE corrections, retrieval off)", "",
             f"{len(pts)} recipes; in the target (efficacy ≥ {TARGET[0]}, token locality ≥ {TARGET[1]}): "
             f"{len(reached)}." + (f" Best token locality at efficacy ≥ {TARGET[0]}: {best['locality_token']:.3f} "
                                   f"({best['name']})." if best else ""), "",
             "| recipe | family | efficacy | paraphrase | loc token | loc strict | source |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['family']} | {p['efficacy']:.2f} | {p['paraphrase']:.2f} | {p['locality_token']:.3f} "
              f"| {p['locality_strict']:.2f} | {p['source']} |" for p in pts]
    return "\n".join(lines) + "\n"


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = dict(zip(sorted({p["family"] for p in pts}), "osD^vP"))
    for family, marker in markers.items():
        mine = [p for p in pts if p["family"] == family]
        ax.scatter([p["efficacy"] for p in mine], [p["locality_token"] for p in mine], marker=marker, label=family)
    ax.fill_between([TARGET[0], 1.02], TARGET[1], 1.0, color="tab:green", alpha=0.15, label="target")
    ax.set_xlim(0.3, 1.02)
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("efficacy (corrected questions answered right)")
    ax.set_ylabel("token-level locality of the adapter alone")
    ax.set_title("100 zsRE corrections on SmolLM2-135M")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", default="reports/consolidation")
    args = ap.parse_args()
    folder = Path(args.folder)
    pts = points(folder)
    text = report(pts)
    (folder / "frontier.md").write_text(text)
    plot(pts, folder / "frontier.png")
    print(text)


if __name__ == "__main__":
    main()
