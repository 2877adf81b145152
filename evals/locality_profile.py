"""Where an adapter's answers part from the base model's: token-level locality (trainer.evaluate.
agreement) split by the base model's own confidence in each token, on anchors the adapter was
trained on and on questions it never saw.

    python -m evals.locality_profile reports/consolidation/adapter-replay-nq-quarter-w3

For each set of questions the base model's greedy answers (24 tokens at most) are teacher-forced
through the adapted model and through the base; a token agrees when the adapted model's top-1 is
the base's. The base's *margin* on a token is its top-1 probability minus its top-2 probability:
below 0.05 the base itself is nearly at a coin toss there. Sets: the 150 Natural Questions
queries the consolidation bench replays as anchors (`evals.zsre_data.nq_anchor_prompts`), zsRE's
locality questions of the first 100 records (the bench's locality measure), and 100 more NQ
queries in neither. Writes `<output>/locality_profile.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.zsre_data import nq_anchor_prompts, records as zsre_records

BINS = ((0.0, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.01))


def question_sets(n: int = 100) -> dict[str, list[str]]:
    rows = zsre_records()
    records = rows[:n]
    anchors = list(nq_anchor_prompts(records, 150, rows=rows))
    probes = [r["locality_question"] for r in records]
    taken = set(anchors) | set(probes)
    fresh = [q for q in dict.fromkeys(r["locality_question"] for r in reversed(rows)) if q not in taken][:n]
    return {"anchors (trained on)": anchors, "zsRE locality questions": probes, "other NQ questions": fresh}


def profile(model, tokenizer, questions: list[str], answers: list[str], batch_size: int = 32) -> dict:
    """Agreement of `model` (a PeftModel) with its base on `answers`, by token and by base margin."""
    import torch

    from trainer.evaluate import teacher_forced

    tokens = []  # (base margin, agrees)
    whole = []  # every token of the answer agrees
    for chunk, ids, mask in teacher_forced(tokenizer, questions, answers, batch_size):
        with torch.inference_mode():
            adapted = model(input_ids=ids, attention_mask=mask).logits
            with model.disable_adapter():
                base = model(input_ids=ids, attention_mask=mask).logits
        for i, (p, a) in enumerate(chunk):
            at = slice(len(p) - 1, len(p) + len(a) - 1)
            agrees = (adapted[i, at].argmax(-1) == base[i, at].argmax(-1)).tolist()
            top2 = base[i, at].softmax(-1).topk(2).values
            tokens += [(float(m), ok) for m, ok in zip(top2[:, 0] - top2[:, 1], agrees)]
            whole.append(all(agrees))
    if not tokens:
        raise ValueError("no answer tokens to compare")
    out = {"answers": len(whole), "tokens": len(tokens),
           "agreement": sum(ok for _, ok in tokens) / len(tokens),
           "answers_wholly_agreeing": sum(whole) / len(whole), "bins": []}
    for lo, hi in BINS:
        inside = [ok for m, ok in tokens if lo <= m < hi]
        out["bins"].append({"margin": [lo, min(hi, 1.0)], "share_of_tokens": len(inside) / len(tokens),
                            "agreement": sum(inside) / len(inside) if inside else None})
    return out


def report(adapter: str, results: dict[str, dict]) -> str:
    lines = [f"# Where `{adapter}` parts from the base model", "",
             "Token-level locality (the adapted model's top-1 = the base's, teacher-forced on the base's greedy answer, "
             "24 tokens at most), split by the base's margin on the token (top-1 minus top-2 probability).", "",
             "| questions | answers | tokens | agreement | answers wholly agreeing | "
             + " | ".join(f"margin {b[0]}–{min(b[1], 1.0)}: share / agreement" for b in BINS) + " |",
             "|---|---|---|---|---|" + "---|" * len(BINS)]
    for name, r in results.items():
        cells = " | ".join(f"{b['share_of_tokens']:.2f} / " + ("—" if b["agreement"] is None else f"{b['agreement']:.3f}")
                           for b in r["bins"])
        lines.append(f"| {name} | {r['answers']} | {r['tokens']} | {r['agreement']:.3f} | "
                     f"{r['answers_wholly_agreeing']:.2f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(results)
    for k, (name, r) in enumerate(results.items()):
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(BINS))]
        ax.bar(xs, [b["agreement"] or 0.0 for b in r["bins"]], width, label=f"{name} ({r['agreement']:.3f})")
    ax.set_xticks(range(len(BINS)),
                  [f"{lo}–{min(hi, 1.0)}\n({results[next(iter(results))]['bins'][i]['share_of_tokens']:.0%} of tokens)"
                   for i, (lo, hi) in enumerate(BINS)])
    ax.set_xlabel("base model's margin on the token (top-1 − top-2 probability)")
    ax.set_ylabel("adapted top-1 = base top-1")
    ax.set_ylim(0.5, 1.0)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", help="a PEFT adapter folder on the base model")
    ap.add_argument("--models-dir", default=".cache/models")
    ap.add_argument("--output", default="reports/consolidation")
    args = ap.parse_args()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.base_model import prepare_embedded
    from trainer.evaluate import generate

    base = str(prepare_embedded(Path(args.models_dir)))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), args.adapter).eval()
    results = {}
    for name, questions in question_sets().items():
        with model.disable_adapter():
            answers = generate(model, tokenizer, questions)
        results[name] = profile(model, tokenizer, questions, answers)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "locality_profile.json").write_text(json.dumps({"adapter": args.adapter, "sets": results}, indent=2))
    text = report(args.adapter, results)
    (out / "locality_profile.md").write_text(text)
    plot(results, out / "locality_profile.png")
    print(text)


if __name__ == "__main__":
    main()
