"""Serving benchmark (a benchmark, not a test): `ratchet serve` with the vLLM engine, driven over
HTTP from 127.0.0.1 only.

1. Gateway overhead: the same requests sent straight to vLLM and through Ratchet, at 1 and 8
   concurrent clients, interleaved round by round; the overhead is gateway/direct latency.
2. Hot-swap under load: clients keep asking `ratchet` (half of them streaming) while the active
   adapter is switched 5 times in a row; p50/p99 latency and failed requests.
3. Mixed load: clients asking `ratchet-base` and the active adapter at once. The vLLM engine
   runs one adapter (or the base model) at a time (serving/engines/turns.py); the aggregate
   tokens/s of the mixed load against that of each kind alone is what the turns cost.
4. Tokens/s of one request at a time on the base model and on the active adapter.

Run: python -m evals.serving_bench  → reports/serving.json, reports/serving.md
The adapters swapped between are synthetic (random LoRA weights of the trainer's shape), put in
the data directory's registry before the server starts: training real ones costs ~90 s each and
changes nothing about serving them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from evals.server import RatchetServer, free_port

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What does a bicycle chain do?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
]
STORY = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works, step by step.",
         "Describe the water cycle in detail."]


def seed_adapters(data_dir: Path, base_model: str, versions: int) -> None:
    """Synthetic adapters registered as promoted versions, v1 active, before the server starts."""
    from evals.lora_overhead import synthetic_adapter
    from memory.db import open_db
    from trainer.registry import AdapterRegistry

    db = open_db(data_dir / "ratchet.db")
    registry = AdapterRegistry(db, data_dir / "adapters")
    for n in range(1, versions + 1):
        synthetic_adapter(base_model, registry.folder_for(n), seed=n)
        registry.register(n, parent=n - 1 or None, cycle_id=None, manifest={"synthetic": True})
        registry.set_status(n, "promoted")
    registry.activate(1)
    db.conn.close()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict:
    return {"n": len(latencies), "mean_s": round(statistics.fmean(latencies), 4),
            "p50_s": round(percentile(latencies, 50), 4), "p99_s": round(percentile(latencies, 99), 4)}


# -- 1. direct vs gateway ------------------------------------------------------------------
def overhead(gateway: str, direct: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """Each round sends the same batch of `clients` requests (one per client) to vLLM, then to
    Ratchet (the order alternates), so both see the same questions under the same load."""
    lat = {"direct": [], "gateway": []}
    failed = {"direct": 0, "gateway": 0}
    tokens = {"direct": 0, "gateway": 0}

    def one(target: str, question: str, http: httpx.Client) -> None:
        messages = [{"role": "user", "content": question}]
        if target == "direct":  # what the gateway sends vLLM for this request (no memories)
            url, body = f"{direct}/v1/chat/completions", {"model": "ratchet-base", "messages": messages}
        else:
            url, body = f"{gateway}/v1/chat/completions", {"model": "ratchet-base", "messages": messages,
                                                           "memory": False}
        body.update(max_tokens=max_tokens, temperature=0)
        started = time.perf_counter()
        try:
            r = http.post(url, json=body, timeout=300)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if ok:
            lat[target].append(time.perf_counter() - started)
            tokens[target] += r.json()["usage"]["completion_tokens"]
        else:
            failed[target] += 1

    with httpx.Client() as http, ThreadPoolExecutor(clients) as pool:
        for i in range(rounds):
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            for target in order:
                batch = [QUESTIONS[(i * clients + c) % len(QUESTIONS)] for c in range(clients)]
                list(pool.map(lambda q: one(target, q, http), batch))
    d, g = summary(lat["direct"]), summary(lat["gateway"])
    return {"clients": clients, "direct": d, "gateway": g, "failed": failed, "completion_tokens": tokens,
            "ratio_mean": round(g["mean_s"] / d["mean_s"], 4), "ratio_p50": round(g["p50_s"] / d["p50_s"], 4)}


# -- 2. swaps under load -------------------------------------------------------------------
def swaps_under_load(gateway: str, clients: int, swaps: int, max_tokens: int, settle: float,
                     baseline: float) -> dict:
    """The load alone for `baseline` seconds, then `swaps` activations `settle` seconds apart."""
    stop = threading.Event()
    records: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        stream = i % 2 == 1
        n = 0
        with httpx.Client() as http:
            while not stop.is_set() and n < 500:  # bounded
                question = QUESTIONS[(i + n) % len(QUESTIONS)]
                n += 1
                body = {"model": "ratchet", "messages": [{"role": "user", "content": question}], "memory": False,
                        "max_tokens": max_tokens, "temperature": 0, "stream": stream}
                started, error, adapter = time.perf_counter(), None, None
                try:
                    if stream:
                        with http.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=300) as r:
                            if r.status_code != 200:
                                error = f"HTTP {r.status_code}"
                            done = False
                            for line in r.iter_lines():
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    event = json.loads(line[6:])
                                    if "error" in event:
                                        error = event["error"]["message"]
                                    adapter = (event.get("ratchet") or {}).get("adapter", adapter)
                            if not done and error is None:
                                error = "stream ended without [DONE]"
                    else:
                        r = http.post(f"{gateway}/v1/chat/completions", json=body, timeout=300)
                        if r.status_code != 200:
                            error = f"HTTP {r.status_code}: {r.text[:200]}"
                        else:
                            adapter = r.json()["ratchet"]["adapter"]
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                with lock:
                    records.append({"t": time.perf_counter(), "latency_s": time.perf_counter() - started,
                                    "stream": stream, "error": error, "adapter": adapter})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    loaded = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(baseline)
    began = time.perf_counter()
    swap_log = []
    with httpx.Client() as http:
        for k in range(swaps):
            version = [2, 3, 1, 2, 3, 1][k % 6]
            started = time.perf_counter()
            r = http.post(f"{gateway}/v1/adapters/{version}/activate", timeout=600)
            body = r.json() if r.status_code == 200 else {}
            swap_log.append({"to": f"ratchet-v{version}", "status": r.status_code,
                             "seconds": round(time.perf_counter() - started, 3),
                             "switched_in_s": body.get("switched_in_s"), "drained_in_s": body.get("drained_in_s")})
            time.sleep(settle)
    ended = time.perf_counter()
    stop.set()
    for t in threads:
        t.join()
    during = [x for x in records if x["t"] >= began and x["t"] - x["latency_s"] <= ended]  # overlapping the swaps
    before = [x for x in records if x["t"] < began and x["t"] - x["latency_s"] >= loaded]
    failures = [x for x in records if x["error"]]
    return {
        "clients": clients, "swaps": swap_log, "requests": len(records), "requests_during_swaps": len(during),
        "failed": len(failures), "failures": [x["error"] for x in failures[:10]],
        "latency": summary([x["latency_s"] for x in during]),
        "baseline": summary([x["latency_s"] for x in before]) if before else None,
        "adapters_seen": sorted({str(x["adapter"]) for x in records}),
    }


# -- 3. mixed load ------------------------------------------------------------------------
def closed_loop(gateway: str, models: list[str], seconds: float, max_tokens: int) -> dict:
    """One client per entry of `models`, each asking again as soon as it is answered."""
    stop = time.perf_counter() + seconds
    done: dict[str, list] = {m: [] for m in set(models)}  # model -> [(latency, completion tokens)]
    failed = 0
    lock = threading.Lock()

    def client(i: int, model: str) -> None:
        nonlocal failed
        n = 0
        with httpx.Client() as http:
            while time.perf_counter() < stop:
                question = QUESTIONS[(i + n) % len(QUESTIONS)]
                n += 1
                started = time.perf_counter()
                try:
                    r = http.post(f"{gateway}/v1/chat/completions", timeout=300, json={
                        "model": model, "memory": False, "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": question}]})
                    r.raise_for_status()
                    with lock:
                        done[model].append((time.perf_counter() - started, r.json()["usage"]["completion_tokens"]))
                except httpx.HTTPError:
                    with lock:
                        failed += 1

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i, m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    tokens = sum(n for runs in done.values() for _, n in runs)
    return {"clients": dict(collections.Counter(models)), "seconds": round(wall, 2), "failed": failed,
            "tokens_per_second": round(tokens / wall, 2),
            "by_model": {m: {**summary([lat for lat, _ in runs]), "tokens": sum(n for _, n in runs)}
                         for m, runs in done.items() if runs}}


def mixed_load(gateway: str, clients: int, seconds: float, max_tokens: int) -> dict:
    half = clients // 2
    result = {"base": closed_loop(gateway, ["ratchet-base"] * clients, seconds, max_tokens),
              "adapter": closed_loop(gateway, ["ratchet"] * clients, seconds, max_tokens),
              "mixed": closed_loop(gateway, ["ratchet-base", "ratchet"] * half, seconds, max_tokens)}
    alone = (result["base"]["tokens_per_second"] + result["adapter"]["tokens_per_second"]) / 2
    result["mixed_over_alone"] = round(result["mixed"]["tokens_per_second"] / alone, 3)
    return result


# -- 4. tokens/s ---------------------------------------------------------------------------
def tokens_per_second(gateway: str, model: str, max_tokens: int) -> dict:
    with httpx.Client() as http:
        http.post(f"{gateway}/v1/chat/completions", json={"model": model, "memory": False, "max_tokens": 8,
                                                          "messages": [{"role": "user", "content": "Hi"}]}, timeout=300)
        tokens, seconds = 0, 0.0
        for prompt in STORY:
            started = time.perf_counter()
            r = http.post(f"{gateway}/v1/chat/completions", timeout=300, json={
                "model": model, "memory": False, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]})
            seconds += time.perf_counter() - started
            tokens += r.json()["usage"]["completion_tokens"]
    return {"tokens_per_second": round(tokens / seconds, 2), "completion_tokens": tokens}


def wait_for_lane(gateway: str, timeout: float = 400) -> float | None:
    """With a merged lane: seconds until the active adapter's lane serves (None: no lanes)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        health = httpx.get(f"{gateway}/health", timeout=10).json()
        if "merged_lanes" not in health:
            return None
        if health["active"] in health["merged_lanes"]:
            return round(time.perf_counter() - started, 1)
        time.sleep(2)
    raise TimeoutError("the merged lane did not come up")


def report(result: dict) -> str:
    o1, o8 = result["overhead"]
    s = result["swaps"]
    t = result["tokens_per_second"]
    m = result.get("mixed")
    lines = [
        "# Serving benchmark", "",
        f"vLLM options: `{result['vllm_options']}`; merged lane: {result['merged_lane']}; "
        f"machine: {os.cpu_count()} cores. Latency in seconds.", "",
        "## Gateway overhead (same requests, straight to vLLM vs through Ratchet, `ratchet-base`, memory off)", "",
        "| clients | direct p50 | gateway p50 | direct mean | gateway mean | gateway/direct (mean) | (p50) | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in (o1, o8):
        lines.append(f"| {o['clients']} | {o['direct']['p50_s']} | {o['gateway']['p50_s']} | {o['direct']['mean_s']} | "
                     f"{o['gateway']['mean_s']} | {o['ratio_mean']} | {o['ratio_p50']} | "
                     f"{o['failed']['direct']} / {o['failed']['gateway']} |")
    lines += [
        "", f"## {len(s['swaps'])} consecutive adapter swaps under load ({s['clients']} clients, half streaming)", "",
        f"- requests: {s['requests']} in all, {s['requests_during_swaps']} during the swaps; "
        f"**failed: {s['failed']}**",
        f"- latency during the swaps: p50 {s['latency']['p50_s']} s, p99 {s['latency']['p99_s']} s",
        "- swaps (HTTP status; pointer switched after, s; old versions drained and unloaded after, s): "
        + ", ".join(f"{x['to']} ({x['status']}; {x.get('switched_in_s')}; {x.get('drained_in_s')})" for x in s["swaps"]),
        f"- the same load without swaps: p50 {s['baseline']['p50_s']} s, p99 {s['baseline']['p99_s']} s "
        f"({s['baseline']['n']} requests)" if s.get("baseline") else "",
        f"- adapters that answered: {', '.join(s['adapters_seen'])}",
    ]
    if m:
        lines += [
            "", f"## Mixed load: {sum(m['mixed']['clients'].values())} clients asking again as soon as answered, "
            f"{m['mixed']['seconds']:.0f} s each", "",
            "| clients | aggregate tok/s | base p50 s | adapter p50 s | failed |", "|---|---|---|---|---|",
        ]
        for label, x in (("all `ratchet-base`", m["base"]), ("all `ratchet` (adapter)", m["adapter"]),
                         ("half and half", m["mixed"])):
            p50 = {k: v["p50_s"] for k, v in x["by_model"].items()}
            lines.append(f"| {label} | {x['tokens_per_second']} | {p50.get('ratchet-base', '—')} | "
                         f"{p50.get('ratchet', '—')} | {x['failed']} |")
        lines.append(f"\nHalf and half over the mean of the two alone: **{m['mixed_over_alone']}**.")
    lines += [
        "", "## Tokens/s, one request at a time, through Ratchet", "",
        f"- base (`ratchet-base`): {t['base']['tokens_per_second']} tok/s",
        f"- active adapter (`ratchet`): {t['adapter']['tokens_per_second']} tok/s "
        f"({round(t['adapter']['tokens_per_second'] / t['base']['tokens_per_second'], 3)} of base)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from serving.settings import Settings
    from trainer.base_model import resolve_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=6, help="rounds per concurrency level in the overhead test")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--swap-clients", type=int, default=4)
    ap.add_argument("--settle", type=float, default=4.0, help="seconds of load between and after swaps")
    ap.add_argument("--baseline", type=float, default=40.0, help="seconds of the same load before the swaps")
    ap.add_argument("--mixed-clients", type=int, default=8)
    ap.add_argument("--mixed-seconds", type=float, default=40.0, help="seconds of each load in the mixed test")
    ap.add_argument("--output", default="reports")
    args = ap.parse_args()
    settings = Settings.load()
    base_model = resolve_model(settings.model, settings.models_dir)
    vllm_port = free_port()
    os.environ["RATCHET_VLLM_PORT"] = str(vllm_port)  # to reach the engine directly, from here only
    result: dict = {"vllm_options": Settings.load().vllm.__dict__, "merged_lane": settings.merged_lane}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        seed_adapters(data, base_model, versions=3)
        # the adapter answers every question (no scope), so that its cost is what is measured
        with RatchetServer(data, engine="vllm", models_dir=settings.models_dir,
                           env={"RATCHET_ADAPTER_SCOPE": "off"}) as server:
            direct = f"http://127.0.0.1:{vllm_port}"
            result["lane_ready_s"] = [wait_for_lane(server.url)]
            overhead(server.url, direct, 2, 1, args.max_tokens)  # warm-up
            result["overhead"] = [overhead(server.url, direct, c, args.rounds, args.max_tokens) for c in (1, 8)]
            print(json.dumps(result["overhead"]), flush=True)
            result["swaps"] = swaps_under_load(server.url, args.swap_clients, 5, args.max_tokens, args.settle,
                                              args.baseline)
            print(json.dumps(result["swaps"]), flush=True)
            result["lane_ready_s"].append(wait_for_lane(server.url))
            result["mixed"] = mixed_load(server.url, args.mixed_clients, args.mixed_seconds, args.max_tokens)
            print(json.dumps(result["mixed"]), flush=True)
            result["tokens_per_second"] = {"base": tokens_per_second(server.url, "ratchet-base", 96),
                                           "adapter": tokens_per_second(server.url, "ratchet", 96)}
        result["left_running"] = server.left_running
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    name = "serving-merged-lane" if settings.merged_lane else "serving"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
