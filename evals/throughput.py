"""Engine speed through Ratchet's HTTP API: completion tokens/s of one request at a time, on the
base model and on an adapter, for each engine. Run: python -m evals.throughput [--engine ...]"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from evals.server import RatchetServer

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle in detail.",
    "Write a letter to a friend about a trip to the mountains.",
    "List ten ideas for a birthday party and explain each.",
]


def measure(server: RatchetServer, model: str, max_tokens: int, rounds: int) -> dict:
    server.ask("Warm up.", max_tokens=8, model=model, memory=False)
    tokens, seconds, latencies = 0, 0.0, []
    for _ in range(rounds):
        for prompt in PROMPTS:
            started = time.perf_counter()
            reply = server.ask(prompt, max_tokens=max_tokens, model=model, memory=False)
            elapsed = time.perf_counter() - started
            tokens += reply["usage"]["completion_tokens"]
            seconds += elapsed
            latencies.append(elapsed)
    return {"tokens_per_second": round(tokens / seconds, 2), "completion_tokens": tokens,
            "p50_latency_s": round(statistics.median(latencies), 3), "requests": len(latencies)}


def run(engine: str, models_dir: str | None, max_tokens: int, rounds: int) -> dict:
    # the adapter answers every question (no scope), so that its cost is what is measured
    with tempfile.TemporaryDirectory() as tmp, RatchetServer(tmp, engine=engine, models_dir=models_dir,
                                                             env={"RATCHET_ADAPTER_SCOPE": "off"}) as server:
        first = server.ask("What university did Watts Humphrey attend?", max_tokens=32)
        server.correct(first["id"], "Illinois Institute of Technology")
        cycle = server.consolidate()
        result = {
            "engine": engine,
            "base": measure(server, "ratchet-base", max_tokens, rounds),
            "adapter": measure(server, "ratchet", max_tokens, rounds),
            "consolidation": cycle["metrics"],
        }
    result["adapter_over_base"] = round(result["adapter"]["tokens_per_second"] / result["base"]["tokens_per_second"], 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engine", action="append", choices=["vllm", "transformers"])
    ap.add_argument("--models-dir", default=None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--output", default="reports")
    args = ap.parse_args()
    results = [run(e, args.models_dir, args.max_tokens, args.rounds) for e in args.engine or ["transformers", "vllm"]]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(results, indent=2))
    lines = ["# Engine throughput (one request at a time, through Ratchet's HTTP API)", "",
             "| engine | base tok/s | adapter tok/s | adapter/base | base p50 s | adapter p50 s | cycle s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} | {r['base']['tokens_per_second']} | {r['adapter']['tokens_per_second']} | "
                     f"{r['adapter_over_base']} | {r['base']['p50_latency_s']} | {r['adapter']['p50_latency_s']} | "
                     f"{r['consolidation'].get('cycle_seconds')} |")
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
