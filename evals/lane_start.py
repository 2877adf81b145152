"""A merged lane's start and speed, compiled (vLLM's torch.compile) against eager: seconds to serve,
then completion tokens/s of zsRE report-split questions asked 8 at a time (as `ratchet eval zsre
--concurrency 8` asks them) and 16 one at a time, on the base weights (a merged lane is a plain model).

Run: python -m evals.lane_start [--output reports] (heavy: one vLLM at a time, ~5 min).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evals.lora_overhead import started, tokens_per_second

CONFIGS = {"eager": ["--enforce-eager"], "compiled": []}


def measure(base_model: str, extra_args: list[str], questions: list[str], log_path: Path) -> dict:
    from serving.engines.vllm import VLLMOptions

    options = VLLMOptions(enable_lora=False, extra_args=extra_args)
    with started(base_model, options, log_path) as (engine, startup_s):
        serial = tokens_per_second(engine, None, 32, questions[:16])

        def tokens(q: str) -> int:
            return engine.complete([{"role": "user", "content": q}], max_tokens=32).completion_tokens

        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            n = sum(pool.map(tokens, questions))
        seconds = time.perf_counter() - began
    return {"startup_s": startup_s, "concurrent8_tokens": n, "concurrent8_s": round(seconds, 1),
            "concurrent8_tokens_per_s": round(n / seconds, 1), "serial_tokens_per_s": serial["tokens_per_second"]}


def main() -> None:
    from evals.zsre import load_records
    from serving.settings import Settings
    from trainer.base_model import resolve_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--questions", type=int, default=160)
    ap.add_argument("--output", default="reports")
    args = ap.parse_args()
    settings = Settings.load()
    base_model = resolve_model(settings.model, settings.models_dir)
    questions = [r["question"] for r in load_records(args.questions, split="report")]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as logs:
        for name, extra in CONFIGS.items():
            results.append({"config": name, **measure(base_model, extra, questions, Path(logs) / f"vllm-{name}.log")})
            print(json.dumps(results[-1]), flush=True)
    (out / "lane_start.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
