"""Which consolidation recipe learns without forgetting, and at what cost.

Trains LoRA adapters on N zsRE corrections with several recipes (replay or not, layers, epochs)
and measures, with retrieval out of the picture (the adapter alone): efficacy on the corrected
questions, generalisation to zsRE's paraphrases, locality on zsRE's unrelated questions (strict:
the greedy answer identical to the base model's; token-level: the share of the base answer's
tokens the adapted model predicts when teacher-forced), time and peak memory.

    python -m evals.consolidation_bench --n 100 --variants no-replay,replay

With `--cycles C` each recipe runs as the server runs it: C consolidation cycles of N new
corrections each (zsRE facts about distinct subjects) through `trainer.cycle.Cycles` on a real
memory, every cycle timed whole (training set, training, gate, registration), the gate's figures
kept (its verdict by the default thresholds reported, every candidate promoted so that the next
cycle has something to keep), and after each cycle the adapter measured on zsRE as above plus the
retention of the earlier cycles' corrections.

    python -m evals.consolidation_bench --n 100 --cycles 2 --variants replay-everyday-quarter-w3-mem-4ep,no-replay-quarter
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

# Each recipe: TrainingConfig overrides; anchors replayed ("none", "general": the 48 general
# prompts, "general+everyday": those and the 150 everyday questions, a server's built-in anchors,
# "general+nq": the 48 and NQ questions from zsRE records after the evaluated ones, never one of
# the evaluated locality questions); question phrasings trained per correction; length of the
# replayed anchor answers in tokens.
VARIANTS = {
    "no-replay": dict(training={"epochs": 4, "learning_rate": 1e-3, "layers_from": 0.0}, anchors="none",
                      templates=2, anchor_tokens=0),
    "replay-text": dict(training={"epochs": 4, "learning_rate": 1e-3, "layers_from": 0.0, "distill_weight": 0.0},
                        anchors="general", templates=2, anchor_tokens=32),
    "replay": dict(training={"epochs": 4, "learning_rate": 1e-3, "layers_from": 0.0, "distill_weight": 1.0},
                   anchors="general", templates=2, anchor_tokens=32),
    # the defaults of 2026-11-30, with the NQ anchors of `ratchet eval zsre`; in --cycles, replay 1:1
    # and no memory examples (the server's recipe before reports/consolidation/results_30x3.md)
    "replay-nq-upper": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 1.0},
                            anchors="general+nq", templates=2, anchor_tokens=16),
    # cheaper: 2 epochs, one phrasing per correction; and the same without any replay
    "replay-nq-upper-2ep": dict(training={"epochs": 2, "min_steps": 0, "learning_rate": 2e-3, "layers_from": 0.5,
                                          "distill_weight": 1.0}, anchors="general+nq", templates=1, anchor_tokens=16),
    "no-replay-upper-2ep": dict(training={"epochs": 2, "min_steps": 0, "learning_rate": 2e-3, "layers_from": 0.5},
                                anchors="none", templates=1, anchor_tokens=0),
    # replay-nq-upper with no replay at all: no anchors, no earlier corrections, no memory examples
    "no-replay-upper": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5}, anchors="none",
                            templates=2, anchor_tokens=0),
    # replay-nq-upper with 96 anchors an epoch, drawn in turn from the 198 (cheaper)
    "replay-nq-upper-96": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 1.0,
                                         "anchors_per_epoch": 96}, anchors="general+nq", templates=2, anchor_tokens=16),
    # replay-nq-upper's cost (198 anchors an epoch), drawn in turn from 48 + 450 NQ questions (more varied)
    "replay-nq450-upper": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 1.0,
                                         "anchors_per_epoch": 198}, anchors="general+nq", nq=450, templates=2,
                               anchor_tokens=16),
    # the server's recipe of reports/consolidation/results_30x3.md (--cycles only): replay-nq-upper,
    # and earlier corrections replayed up to 3 per new one, and memory examples (dataset.memory_examples)
    "replay-nq-upper-mem": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 1.0},
                                anchors="general+nq", templates=2, anchor_tokens=16,
                                cycle={"replay_earlier": 3.0, "memory_examples": True}),
    # replay-nq-upper with the anchors weighted 3 times (TrainingConfig's defaults since 2026-12-01) and
    # 10 times; 3 times with 2 epochs (cheaper)
    "replay-nq-upper-w3": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 3.0},
                               anchors="general+nq", templates=2, anchor_tokens=16),
    "replay-nq-upper-w10": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 10.0},
                                anchors="general+nq", templates=2, anchor_tokens=16),
    "replay-nq-upper-w3-2ep": dict(training={"epochs": 2, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 3.0},
                                   anchors="general+nq", templates=2, anchor_tokens=16),
    # replay-nq-upper with anchor answers of 24 tokens, as long as the answers locality is measured on
    "replay-nq-upper-a24": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5, "distill_weight": 1.0},
                                anchors="general+nq", templates=2, anchor_tokens=24),
    # the upper quarter of the layers, anchors weighted 3 times (cheapest and most local adapter alone,
    # but efficacy 0.86 in a server cycle of 100: reports/consolidation/results_100x2_2026-12-01a.md)
    "replay-nq-quarter-w3": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75, "distill_weight": 3.0},
                                 anchors="general+nq", templates=2, anchor_tokens=16),
    # the same replaying only the 48 built-in prompts (a server's anchors without RATCHET_ANCHOR_PROMPTS)
    "replay-general-quarter-w3": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75,
                                                "distill_weight": 3.0}, anchors="general", templates=2, anchor_tokens=16),
    # the same replaying the built-in prompts and the built-in everyday questions (198 anchors)
    "replay-everyday-quarter-w3": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75,
                                                 "distill_weight": 3.0}, anchors="general+everyday", templates=2,
                                       anchor_tokens=16),
    # the same with LoRA on the MLPs only, on attention only, at rank 4 (2026-12-01 (6))
    "replay-nq-quarter-w3-mlp": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75,
                                               "distill_weight": 3.0, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
                                     anchors="general+nq", templates=2, anchor_tokens=16),
    "replay-nq-quarter-w3-attn": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75,
                                                "distill_weight": 3.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                                      anchors="general+nq", templates=2, anchor_tokens=16),
    "replay-nq-quarter-w3-r4": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75, "distill_weight": 3.0,
                                              "r": 4, "alpha": 8},
                                    anchors="general+nq", templates=2, anchor_tokens=16),
    # --cycles only: replay-nq-quarter-w3, earlier corrections replayed up to 3 per new one, memory
    # examples; and the same recipe with no replay at all
    "replay-nq-quarter-w3-mem": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75,
                                               "distill_weight": 3.0}, anchors="general+nq", templates=2,
                                     anchor_tokens=16, cycle={"replay_earlier": 3.0, "memory_examples": True}),
    # replay-nq-quarter-w3-mem with 4 epochs (its first cycle's efficacy was 0.86 with 3): the server's
    # default recipe (compare with no-replay-quarter)
    "replay-nq-quarter-w3-mem-4ep": dict(training={"epochs": 4, "learning_rate": 2e-3, "layers_from": 0.75,
                                                   "distill_weight": 3.0}, anchors="general+nq", templates=2,
                                         anchor_tokens=16, cycle={"replay_earlier": 3.0, "memory_examples": True}),
    # the same replaying the server's built-in anchors (48 general prompts and 150 everyday questions)
    # instead of NQ queries: what a server runs by default since 2026-12-01 (7)
    "replay-everyday-quarter-w3-mem-4ep": dict(training={"epochs": 4, "learning_rate": 2e-3, "layers_from": 0.75,
                                                         "distill_weight": 3.0}, anchors="general+everyday",
                                               templates=2, anchor_tokens=16,
                                               cycle={"replay_earlier": 3.0, "memory_examples": True}),
    # the same with 120 anchors an epoch, drawn in turn from the 198 (cheaper; the default of
    # 2026-12-01 (3)-(5), whose cycle 2 answered exactly 0.80 of the paraphrases)
    "replay-nq-quarter-w3-mem-4ep-a120": dict(training={"epochs": 4, "learning_rate": 2e-3, "layers_from": 0.75,
                                                        "distill_weight": 3.0, "anchors_per_epoch": 120},
                                              anchors="general+nq", templates=2, anchor_tokens=16,
                                              cycle={"replay_earlier": 3.0, "memory_examples": True}),
    # the default with half as many earlier corrections replayed as new ones (cycle 2 is the slow one)
    "replay-nq-quarter-w3-mem-4ep-a120-r05": dict(training={"epochs": 4, "learning_rate": 2e-3, "layers_from": 0.75,
                                                            "distill_weight": 3.0, "anchors_per_epoch": 120},
                                                  anchors="general+nq", templates=2, anchor_tokens=16,
                                                  cycle={"replay_earlier": 0.5, "memory_examples": True}),
    # the server's default recipe with neighbour anchors: per new correction's subject, 2 or 4 other
    # questions about it (trainer.neighbours.ANCHOR_TEMPLATES) replayed with the base's answers
    "replay-everyday-quarter-w3-mem-4ep-nb2": dict(training={"epochs": 4, "learning_rate": 2e-3, "layers_from": 0.75,
                                                             "distill_weight": 3.0}, anchors="general+everyday",
                                                   templates=2, anchor_tokens=16,
                                                   cycle={"replay_earlier": 3.0, "memory_examples": True,
                                                          "neighbour_anchors": 2}),
    "replay-everyday-quarter-w3-mem-4ep-nb4": dict(training={"epochs": 4, "learning_rate": 2e-3, "layers_from": 0.75,
                                                             "distill_weight": 3.0}, anchors="general+everyday",
                                                   templates=2, anchor_tokens=16,
                                                   cycle={"replay_earlier": 3.0, "memory_examples": True,
                                                          "neighbour_anchors": 4}),
    # the default with the upper half of the layers and 3 epochs: does the adapter carry its corrections
    # to other wordings better (weights-only generalisation), and at what training cost?
    "replay-everyday-half-w3-mem-3ep-nb2": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5,
                                                          "distill_weight": 3.0}, anchors="general+everyday",
                                                templates=2, anchor_tokens=16,
                                                cycle={"replay_earlier": 3.0, "memory_examples": True,
                                                       "neighbour_anchors": 2}),
    "no-replay-quarter": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.75}, anchors="none",
                              templates=2, anchor_tokens=0),
    # the server's default recipe of 2026-12-01 (--cycles only): replay-nq-upper-w3, earlier corrections
    # replayed up to 3 per new one, memory examples (compare with no-replay-upper)
    "replay-nq-upper-w3-mem": dict(training={"epochs": 3, "learning_rate": 2e-3, "layers_from": 0.5,
                                             "distill_weight": 3.0}, anchors="general+nq", templates=2,
                                   anchor_tokens=16, cycle={"replay_earlier": 3.0, "memory_examples": True}),
}


def training_config(variant: dict):
    """A recipe's TrainingConfig. A recipe that does not say draws every anchor every epoch, as
    all did when they were measured (as the default does up to 256 anchors)."""
    from trainer.lora import TrainingConfig

    return replace(TrainingConfig(), **{"anchors_per_epoch": 0, **variant["training"]})


def load_records(n: int, path: Path = ZSRE) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def distinct_records(n: int, path: Path = ZSRE) -> list[dict]:
    """The first `n` records about distinct subjects (zsRE repeats a fact in several phrasings,
    which the memory merges into one correction)."""
    seen, out = set(), []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["subject"] not in seen:
                seen.add(r["subject"])
                out.append(r)
                if len(out) == n:
                    break
    return out


def base_reference(base: str, records: list[dict], out: Path, tag: str = "") -> dict:
    """The base model's greedy answers to the locality questions (cached)."""
    cache = out / f"base_answers_{len(records)}{tag}.json"
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


def anchor_prompts(variant: dict, records: list[dict]) -> tuple[str, ...]:
    """The prompts a recipe replays: none; the 48 general prompts ("general"); those and the 150
    everyday questions ("general+everyday": a server's built-in anchors); or the 48 and NQ
    questions ("general+nq")."""
    from trainer.anchors import BUILT_IN_ANCHORS, GENERAL_PROMPTS

    if variant["anchors"] == "none":
        return ()
    if variant["anchors"] == "general+everyday":
        return BUILT_IN_ANCHORS
    nq = nq_anchor_prompts(records, variant.get("nq", 150)) if variant["anchors"] == "general+nq" else ()
    return GENERAL_PROMPTS + nq


def run_variant(name: str, n: int, base: str, out: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memory import Correction
    from trainer.anchors import base_answers
    from trainer.dataset import TEMPLATES, examples_for
    from memory.text import is_correct
    from trainer.evaluate import agreement, generate
    from trainer.lora import train_lora

    v = VARIANTS[name]
    records = load_records(n)
    ref = base_reference(base, records, out)
    corrections = [Correction(i + 1, r["question"], r["answer"], None, "") for i, r in enumerate(records)]
    examples = examples_for(corrections, TEMPLATES[: v["templates"]])
    if v["anchors"] != "none":
        examples += base_answers(base, out / "anchors.json", anchor_prompts(v, records),
                                 max_new_tokens=v["anchor_tokens"])
    config = training_config(v)
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


# Adapter scopes swept when serving is replayed: a question reaches the adapter when a stored
# correction is at least this similar (agent.graph; memory.ADAPTER_SCOPE is the one in use).
SCOPES = (0.0, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.925, 0.95)


def neighbour_figures(model, tok, memory, batch: list[dict], answers_p: list[str], k: int = 6) -> dict:
    """The adapter on its corrections' neighbourhoods (trainer.neighbours.NEIGHBOUR_TEMPLATES about
    each corrected subject, once; the base model's answers as reference), alone and as served: for each
    scope in SCOPES, the adapter answers a question whose nearest stored correction is at least
    that similar and the base model the rest (generalisation, neighbour strict locality, bleed)."""
    from memory import LOCAL_USER
    from memory.text import gives
    from trainer.evaluate import agreement, generate
    from trainer.neighbours import bleed, first_per_subject, record_neighbours

    firsts = first_per_subject([r["subject"] for r in batch])
    near = [(r, q) for i, r in enumerate(batch) if i in firsts
            for q in record_neighbours(r, k)]
    questions = [q for _, q in near]
    adapted = generate(model, tok, questions)
    with model.disable_adapter():
        base = generate(model, tok, questions)
        base_p = generate(model, tok, [r["paraphrase"] for r in batch])

    def nearest(q: str) -> float:
        hits = memory.search(q, LOCAL_USER, k=1, threshold=0.0)
        return hits[0].score if hits else 0.0

    score_n, score_p = [nearest(q) for q in questions], [nearest(r["paraphrase"]) for r in batch]
    out = {
        "neighbour_strict": sum(a == b for a, b in zip(adapted, base)) / len(near),
        "neighbour_bleed": sum(bleed(r["answer"], b, a) for (r, _), a, b in zip(near, adapted, base)) / len(near),
        "neighbour_token": round(agreement(model, tok, questions, base), 4),
        "served": [],
    }
    for t, check in [(t, check) for t in SCOPES for check in (False, True)]:
        # check (agent.repair.steered): the adapter's answer stands only when it gives the
        # subject's correction; otherwise the base model's is served
        served_n = [a if s >= t and (not check or gives(r["answer"], a)) else b
                    for (r, _), a, b, s in zip(near, adapted, base, score_n)]
        served_p = [a if s >= t and (not check or gives(r["answer"], a)) else b
                    for r, a, b, s in zip(batch, answers_p, base_p, score_p)]
        out["served"].append({
            "checked": check,
            "scope": t,
            "paraphrase": sum(gives(r["answer"], a) for r, a in zip(batch, served_p)) / len(batch),
            "paraphrase_in_scope": sum(s >= t for s in score_p) / len(batch),
            "neighbour_strict": sum(a == b for a, b in zip(served_n, base)) / len(near),
            "neighbour_bleed": sum(bleed(r["answer"], b, a) for (r, _), a, b in zip(near, served_n, base)) / len(near),
            "neighbour_in_scope": sum(s >= t for s in score_n) / len(near),
        })
    out["samples"] = [{"q": q, "base": b, "adapter": a, "score": round(s, 3)}
                      for (_, q), a, b, s in list(zip(near, adapted, base, score_n))[:12]]
    return out


def run_cycles(name: str, n: int, cycles: int, base: str, out: Path) -> dict:
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memory.text import with_memories
    from memory import Memory
    from memory import ADAPTER_SCOPE, LOCAL_USER
    from trainer.cycle import CycleConfig, Cycles
    from memory.text import is_correct
    from trainer.evaluate import agreement, generate
    from trainer.gate import GateConfig
    from trainer.registry import AdapterRegistry

    v = VARIANTS[name]
    # the facts trained on, and after them facts never trained on, each shown as a memory the way
    # the agent shows retrieved ones: is the memory still followed with the adapter on?
    pool = distinct_records(n * cycles + n)
    records, unseen = pool[: n * cycles], pool[n * cycles :]
    ref = base_reference(base, records, out, tag="-distinct")
    with_memory = [with_memories([{"role": "user", "content": r[key]}], [r]) for key in ("question", "paraphrase")
                   for r in unseen]
    replay = v["anchors"] != "none"
    config = CycleConfig(
        training=training_config(v),
        templates=v["templates"],
        anchors=replay,
        anchor_prompts=anchor_prompts(v, records),
        anchor_tokens=v["anchor_tokens"] or 16,
        replay_earlier=1.0 if replay else 0.0,
        replay_at_least=0,  # the recorded variants replay per new correction only
        memory_examples=False,
        # every candidate is promoted, so that the next cycle continues from it; the verdict of
        # the default thresholds is reported
        gate=GateConfig(min_efficacy=0, min_paraphrase=0, min_retention=0, min_locality=0, max_negative_flips=1,
                        max_memory_drop=1),
    )
    config = replace(config, **v.get("cycle", {}))
    data = out / f"cycles-{name}"
    shutil.rmtree(data, ignore_errors=True)
    memory = Memory(data)
    registry = AdapterRegistry(memory.db, data / "adapters")
    runner = Cycles(memory, registry, base, config, data, on_promote=lambda a: registry.activate(a.version))
    tok = AutoTokenizer.from_pretrained(base)

    def in_scope(question: str) -> bool:  # as agent.graph decides who answers
        return bool(memory.search(question, LOCAL_USER, k=1, threshold=ADAPTER_SCOPE))

    rows = []
    for c in range(cycles):
        batch = records[c * n : (c + 1) * n]
        for r in batch:
            memory.add_correction(r["question"], r["answer"])
        row = runner.wait(runner.submit(), timeout=4 * 3600)
        if row["status"] != "succeeded":
            raise SystemExit(f"cycle {c + 1} of {name}: {row['status']}: {row['message']}")
        m = row["metrics"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                          registry.folder_for(row["adapter_version"])).eval()
        earlier = records[: c * n]
        answers_q = generate(model, tok, [r["question"] for r in batch + earlier])
        answers_p = generate(model, tok, [r["paraphrase"] for r in batch])
        answers_l = generate(model, tok, [r["locality_question"] for r in records[:n]])
        hits = [is_correct(r["answer"], a) for r, a in zip(batch + earlier, answers_q)]
        answers_m = generate(model, tok, with_memory)
        # As served (agent.graph): the adapter answers a question within its scope of a stored
        # correction, the base model any other.
        paraphrases = [r["paraphrase"] for r in batch]
        locality_qs = [r["locality_question"] for r in records[:n]]
        routed_p = [in_scope(q) for q in paraphrases]
        routed_l = [in_scope(q) for q in locality_qs]
        outside = [q for q, routed in zip(paraphrases, routed_p) if not routed]
        with model.disable_adapter():
            base_p = iter(generate(model, tok, outside) if outside else [])
        served_p = [a if routed else next(base_p) for a, routed in zip(answers_p, routed_p)]
        if c == 0:
            with model.disable_adapter():
                base_m = generate(model, tok, with_memory)
                base_u = generate(model, tok, [r["question"] for r in unseen])
            base_memory_use = sum(is_correct(r["answer"], a) for r, a in zip(unseen + unseen, base_m)) / len(base_m)
        # Questions of other zsRE subjects, never stored: closer to the stored ones than NQ's, so
        # some fall in scope, and there the adapter's own locality is what is served.
        routed_u = [in_scope(r["question"]) for r in unseen]
        inside_u = [r["question"] for r, routed in zip(unseen, routed_u) if routed]
        adapter_u = iter(generate(model, tok, inside_u) if inside_u else [])
        kept_u = [not routed or next(adapter_u) == b for routed, b in zip(routed_u, base_u)]
        gate = {k[len("gate_"):]: value for k, value in m.items() if k.startswith("gate_")}
        rows.append({
            "cycle": c + 1,
            "n_corrections": row["n_corrections"],
            "examples": row["n_examples"],
            "cycle_seconds": m["cycle_seconds"],
            "train_seconds": m["train_seconds"],
            "gate_seconds": m["gate_seconds"],
            "steps": m["train_steps"],
            "tokens_per_second": m["train_tokens_per_second"],
            "peak_rss_mb": m["peak_rss_mb"],
            "efficacy": sum(hits[: len(batch)]) / len(batch),
            "paraphrase": sum(is_correct(r["answer"], a) for r, a in zip(batch, answers_p)) / len(batch),
            "retention": sum(hits[len(batch):]) / len(earlier) if earlier else None,
            "locality_strict": sum(a == b for a, b in zip(answers_l, ref["locality"][:n])) / n,
            "locality_token": round(agreement(model, tok, [r["locality_question"] for r in records[:n]],
                                              ref["locality"][:n]), 4),
            "scope_paraphrase_share": sum(routed_p) / len(batch),
            "scope_locality_share": sum(routed_l) / n,
            "served_paraphrase": sum(is_correct(r["answer"], a) for r, a in zip(batch, served_p)) / len(batch),
            "served_locality_strict": sum(a == b or not routed for a, b, routed in
                                          zip(answers_l, ref["locality"][:n], routed_l)) / n,
            "scope_unseen_share": sum(routed_u) / len(unseen),
            "served_unseen_strict": sum(kept_u) / len(unseen),
            "memory_use": sum(is_correct(r["answer"], a) for r, a in zip(unseen + unseen, answers_m)) / len(answers_m),
            "base_memory_use": base_memory_use,
            "gate": gate,
            "default_gate_failures": list(GateConfig().failures(gate).values()),
            "neighbours": neighbour_figures(model, tok, memory, batch, answers_p),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    memory.close()
    return {"variant": name, "n": n, "cycles": rows, "config": asdict(config.training), "anchors": v["anchors"],
            "templates": v["templates"], "anchor_tokens": v["anchor_tokens"]}


def cycles_report(results: list[dict], n: int, cycles: int) -> str:
    lines = [f"# Consolidation cycles of {n} zsRE corrections each, as the server runs them (adapter alone)", "",
             "Each cycle timed whole: training set, training, gate, registration. Efficacy, paraphrase, retention "
             "(the earlier cycles' corrections) and locality (zsRE's unrelated questions of the first cycle's "
             "records; strict and token-level) measured on the adapter with retrieval off; the gate's figures are "
             "its own (its held-out phrasing, its 32 probes, negative flips against the previous version). Memory "
             "followed: N facts never trained on, each asked (as is and paraphrased) with its correction shown as a "
             "retrieved memory, as the agent shows them; in brackets the base model. The gate's memory followed: "
             "new corrections' questions shown a memory carrying another new correction's answer. Served: as the "
             "agent answers with retrieval off, the adapter for questions within memory.ADAPTER_SCOPE of a "
             "stored correction and the base model for the rest; in brackets the share of questions in scope.", "",
             "| recipe | cycle | cycle s | train s | gate s | steps | tok/s | peak MB | efficacy | paraphrase | "
             "retention | locality strict | locality token | memory followed (base) | gate: negative flips | "
             "gate: probe locality | gate: memory followed (base) | default gate | served paraphrase (in scope) | "
             "served locality strict (in scope) | served, other zsRE subjects' questions: strict (in scope) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["cycles"]:
            g = c["gate"]
            verdict = "pass" if not c["default_gate_failures"] else "reject: " + "; ".join(c["default_gate_failures"])
            retention = "—" if c["retention"] is None else f"{c['retention']:.2f}"
            lines.append(f"| {r['variant']} | {c['cycle']} | {c['cycle_seconds']} | {c['train_seconds']} | "
                         f"{c['gate_seconds']} | {c['steps']} | {c['tokens_per_second']} | {c['peak_rss_mb']} | "
                         f"{c['efficacy']:.2f} | {c['paraphrase']:.2f} | {retention} | {c['locality_strict']:.2f} | "
                         f"{c['locality_token']:.3f} | {c['memory_use']:.2f} ({c['base_memory_use']:.2f}) | {g['negative_flips']:.2f} | {g['locality_token']:.3f} | "
                         f"{g['memory_followed']:.2f} ({g['base_memory_followed']:.2f}) | {verdict} | "
                         f"{_served(c, 'paraphrase')} | {_served(c, 'locality_strict', 'locality')} | "
                         f"{_served(c, 'unseen_strict', 'unseen')} |")
    return "\n".join(lines) + "\n"


def _served(c: dict, figure: str, share: str | None = None) -> str:
    if f"served_{figure}" not in c:
        return "—"  # a run from before the adapter's scope
    return f"{c[f'served_{figure}']:.2f} ({c[f'scope_{share or figure}_share']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cycles", type=int, default=0, help="run each recipe as C server cycles of N corrections")
    ap.add_argument("--models-dir", default=".cache/models")
    ap.add_argument("--output", default="reports/consolidation")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    args = ap.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from trainer.base_model import prepare_embedded

    base = str(prepare_embedded(Path(args.models_dir)))
    if args.one:
        run = run_cycles(args.one, args.n, args.cycles, base, out) if args.cycles else run_variant(args.one, args.n, base, out)
        print(json.dumps(run))
        return
    results = []
    for name in args.variants.split(","):
        # one process per variant, so that its peak memory is its own
        proc = subprocess.run([sys.executable, "-m", "evals.consolidation_bench", "--one", name, "--n", str(args.n),
                               "--cycles", str(args.cycles), "--models-dir", args.models_dir, "--output", str(out)],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"variant {name} failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if args.cycles:
            (out / f"results_{args.n}x{args.cycles}.json").write_text(json.dumps(results, indent=2))
            continue
        r = results[-1]
        print(f"{name}: efficacy {r['efficacy']:.2f} paraphrase {r['paraphrase']:.2f} "
              f"locality strict {r['locality_strict']:.2f} token {r['locality_token']:.3f} "
              f"train {r['train_seconds']} s peak {r['peak_rss_mb']} MB", flush=True)
    if args.cycles:
        report = cycles_report(results, args.n, args.cycles)
        (out / f"results_{args.n}x{args.cycles}.md").write_text(report)
        print(report)
        return
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
