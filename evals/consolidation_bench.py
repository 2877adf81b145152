"""Which consolidation recipe learns without forgetting, and at what cost.

Trains LoRA adapters on N zsRE corrections with several recipes (replay or not, layers, epochs)
and measures, with retrieval out of the picture (the adapter alone): efficacy on the corrected
questions, generalisation to zsRE's paraphrases, locality on zsRE's unrelated questions (strict:
the greedy answer identical to the base model's; token-level: the share of the base answer's
tokens the adapted model predicts when teacher-forced), time and peak memory.

    python -m evals.consolidation_bench --n 100 --variants no-replay,replay
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from evals.zsre_data import ZSRE, nq_anchor_prompts

# Each recipe: TrainingConfig overrides; anchors replayed ("none", "general": the 48 built-in
# prompts, "general+nq": those and NQ questions from zsRE records after the evaluated ones, never
# one of the evaluated locality questions); question phrasings trained per correction; length of
# the replayed anchor answers in tokens.
VARIANTS = {
    "no-replay": dict(training={"epochs": 4, "learning_rate": 1e-3, "layers_from": 0.0}, anchors="none",
                      templates=2, anchor_tokens=0),
    "replay-text": dict(training={"epochs": 4, "learning_rate": 1e-3, "layers_from": 0.0, "distill_weight": 0.0},
                        anchors="general", templates=2, anchor_tokens=32),
    "replay": dict(training={"epochs": 4, "learning_rate": 1e-3, "layers_from": 0.0}, anchors="general",
                   templates=2, anchor_tokens=32),
    # the default recipe (TrainingConfig's defaults), with the NQ anchors of `ratchet eval zsre`
    "replay-nq-upper": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5}, anchors="general+nq",
                            templates=2, anchor_tokens=16),
    # cheaper: 2 epochs, one phrasing per correction; and the same without any replay
    "replay-nq-upper-2ep": dict(training={"epochs": 2, "min_steps": 0, "learning_rate": 2e-3, "layers_from": 0.5},
                                anchors="general+nq", templates=1, anchor_tokens=16),
    "no-replay-upper-2ep": dict(training={"epochs": 2, "min_steps": 0, "learning_rate": 2e-3, "layers_from": 0.5},
                                anchors="none", templates=1, anchor_tokens=0),
}


def load_records(n: int, path: Path = ZSRE) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def base_reference(base: str, records: list[dict], out: Path) -> dict:
    """The base model's greedy answers to the locality questions (cached)."""
    cache = out / f"base_answers_{len(records)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluate import generate

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    ref = {
        "locality": generate(model, tok, [r["locality_question"] for r in records]),
        "question": generate(model, tok, [r["question"] for r in records]),
    }
    cache.write_text(json.dumps(ref))
    return ref


def run_variant(name: str, n: int, base: str, out: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memory import Correction
    from trainer.anchors import base_answers
    from trainer.dataset import TEMPLATES, examples_for
    from trainer.evaluate import agreement, generate, is_correct
    from trainer.lora import TrainingConfig, train_lora

    from trainer.anchors import GENERAL_PROMPTS

    v = VARIANTS[name]
    records = load_records(n)
    ref = base_reference(base, records, out)
    corrections = [Correction(i + 1, r["question"], r["answer"], None, "") for i, r in enumerate(records)]
    examples = examples_for(corrections, TEMPLATES[: v["templates"]])
    if v["anchors"] != "none":
        prompts = GENERAL_PROMPTS + (nq_anchor_prompts(records) if v["anchors"] == "general+nq" else ())
        examples += base_answers(base, out / "anchors.json", prompts, max_new_tokens=v["anchor_tokens"])
    config = replace(TrainingConfig(), **v["training"])
    started = time.monotonic()
    result = train_lora(base, examples, out / f"adapter-{name}", config)
    train_seconds = time.monotonic() - started

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / f"adapter-{name}").eval()
    answers_q = generate(model, tok, [r["question"] for r in records])
    answers_p = generate(model, tok, [r["paraphrase"] for r in records])
    answers_l = generate(model, tok, [r["locality_question"] for r in records])
    return {
        "variant": name,
        "n": n,
        "config": asdict(config),
        "anchors": v["anchors"],
        "anchor_tokens": v["anchor_tokens"],
        "examples": len(examples),
        "train_seconds": round(train_seconds, 1),
        "steps": result.steps,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "efficacy": sum(is_correct(r["answer"], a) for r, a in zip(records, answers_q)) / n,
        "paraphrase": sum(is_correct(r["answer"], a) for r, a in zip(records, answers_p)) / n,
        "base_efficacy": sum(is_correct(r["answer"], a) for r, a in zip(records, ref["question"])) / n,
        "locality_strict": sum(a == b for a, b in zip(answers_l, ref["locality"])) / n,
        "locality_token": round(agreement(model, tok, [r["locality_question"] for r in records], ref["locality"]), 4),
        "samples": [{"q": r["locality_question"], "base": b, "adapted": a}
                    for r, a, b in list(zip(records, answers_l, ref["locality"]))[:5]],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--models-dir", default=".cache/models")
    ap.add_argument("--output", default="reports/consolidation")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from trainer.base_model import prepare_embedded

    base = str(prepare_embedded(Path(args.models_dir)))
    if args.one:
        print(json.dumps(run_variant(args.one, args.n, base, out)))
        return
    results = []
    for name in args.variants.split(","):
        # one process per variant, so that its peak memory is its own
        proc = subprocess.run([sys.executable, "-m", "evals.consolidation_bench", "--one", name, "--n", str(args.n),
                               "--models-dir", args.models_dir, "--output", str(out)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {name} failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{name}: efficacy {r['efficacy']:.2f} paraphrase {r['paraphrase']:.2f} "
              f"locality strict {r['locality_strict']:.2f} token {r['locality_token']:.3f} "
              f"train {r['train_seconds']} s peak {r['peak_rss_mb']} MB", flush=True)
    (out / f"results_{args.n}.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Consolidation recipes on {args.n} zsRE corrections (adapter alone, no retrieval)", "",
             "| recipe | examples | steps | train s | tok/s | peak MB | efficacy | paraphrase | locality strict | locality token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['examples']} | {r['steps']} | {r['train_seconds']} | {r['tokens_per_second']} | "
                     f"{r['peak_rss_mb']} | {r['efficacy']:.2f} | {r['paraphrase']:.2f} | {r['locality_strict']:.2f} | "
                     f"{r['locality_token']:.3f} |")
    (out / f"results_{args.n}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
