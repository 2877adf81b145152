"""Reliability under faults (issue 20), on a real server process: kill -9 during bursts of writes,
kill -9 during consolidation, and 32 concurrent chats through a consolidation, a promotion and a
rollback. tests/test_reliability.py runs a few trials of each; this runs the full count:

    python -m evals.reliability --trials 20        # writes reports/reliability.md and .json

The server runs the transformers engine on a tiny random model (SmolLM2's tokenizer, 2 layers):
what is measured is bookkeeping under faults, not answers. `python -m evals.reliability serve`
is `ratchet serve` with a consolidation small enough to finish in seconds (no setting or
variable of `ratchet serve` makes a cycle that small).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from evals.server import RatchetServer

ROOT = Path(__file__).resolve().parents[1]
USERS = ("ann", "bob", "cy", "dee")
WORDS = ("river", "violin", "copper", "glacier", "orchid", "lantern", "falcon", "quartz", "meadow", "harbor",
         "saffron", "tundra", "marble", "comet", "thistle", "canyon", "ember", "walnut", "cobalt", "prairie")


# -- the server ------------------------------------------------------------------------------------
def tiny_cycle_config():
    """A consolidation that trains for a second and promotes without a gate (a random model fails any gate)."""
    from trainer.cycle import CycleConfig
    from trainer.lora import TrainingConfig

    return CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False,
                       gate_enabled=False)


def serve(data_dir: str, port: int, model: str, engine: str) -> None:
    """What `ratchet serve` does, with tiny consolidation cycles."""
    import logging

    import uvicorn

    from serving.api import create_app
    from serving.service import Ratchet
    from serving.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.load(engine=engine, port=port, data_dir=data_dir, model=model, cycle=tiny_cycle_config())
    ratchet = Ratchet(settings)
    ratchet.start()
    uvicorn.run(create_app(ratchet, stop_on_shutdown=True), host="127.0.0.1", port=port, log_level="warning")


class Server(RatchetServer):
    """One server process on a data directory, started again after each kill -9.
    `tiny_cycles`: this module's `serve`; else the real `ratchet serve` command."""

    def __init__(self, data_dir: Path, model: str, *, tiny_cycles: bool = False, engine: str = "transformers"):
        super().__init__(data_dir, engine=engine, model=model, startup_timeout=600, env={"PYTHONPATH": str(ROOT)})
        self.tiny_cycles = tiny_cycles
        self.starts = 0

    def command(self) -> list[str]:
        if not self.tiny_cycles:
            return super().command()
        return [sys.executable, "-m", "evals.reliability", "serve", "--data-dir", str(self.data_dir),
                "--port", str(self.port), "--model", self.model, "--engine", self.engine]

    def start(self) -> "Server":
        """Start it (again), with a log of its own per start."""
        self.starts += 1
        self.log_path = self.data_dir / f"serve-{self.starts}.log"
        return self.__enter__()

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.__exit__(None, None, None)


def database(data_dir: Path) -> sqlite3.Connection:
    """The server's SQLite, read beside it (WAL: readers do not block the writer)."""
    return sqlite3.connect(f"file:{data_dir / 'ratchet.db'}?mode=ro", uri=True, timeout=30)


# -- figures ---------------------------------------------------------------------------------------
@dataclass
class Figures:
    """What one scenario measured over its trials."""

    scenario: str
    trials: int = 0
    requests: int = 0  # answered requests (a kill's dropped connections excluded)
    acknowledged_writes: int = 0
    lost_writes: int = 0  # acknowledged, then missing or different after the restart
    resurrected_retractions: int = 0  # acknowledged retractions live again after the restart
    index_disagreements: int = 0  # a search answered with a memory SQLite does not hold live, or missed one
    server_errors: int = 0  # 5xx answers
    failed_requests: int = 0  # non-2xx answers or broken streams (concurrency scenario)
    bad_adapters: int = 0  # servable versions whose folder is not a whole adapter
    active_not_served: int = 0  # restarts after which the active adapter did not answer
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def merge(self, other: "Figures") -> None:
        for name, value in asdict(other).items():
            if isinstance(value, (int, float)) and name != "trials":
                setattr(self, name, getattr(self, name) + value)
        self.notes += other.notes


# -- a: kill -9 during bursts of writes ------------------------------------------------------------
@dataclass
class Ledger:
    """What the server acknowledged, across every trial on one data directory."""

    memories: dict = field(default_factory=dict)  # id -> (user, question, answer)
    feedback: dict = field(default_factory=dict)  # feedback id -> (user, response id, correction)
    retracted: set = field(default_factory=set)  # acknowledged retractions
    tried_retract: set = field(default_factory=set)  # sent, answer unknown (the kill)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _writer(url: str, user: str, ledger: Ledger, figures: Figures, stop: threading.Event, rng: random.Random) -> None:
    """One client: chats and corrects them, gives corrections directly and retracts its own, until stopped."""
    with httpx.Client(base_url=url, timeout=30) as client:
        n = 0
        while not stop.is_set():
            n += 1
            words = rng.sample(WORDS, 3)
            question = f"Which {words[0]} is kept in the {words[1]} of {user} {rng.randrange(10**9)}?"
            answer = f"the {words[2]} {rng.randrange(10**9)}"
            op = rng.random()
            try:
                if op < 0.35:
                    reply = client.post("/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": question}], "user": user, "max_tokens": 4})
                    figures.requests += 1
                    figures.server_errors += reply.status_code >= 500
                    if reply.status_code != 200:
                        continue
                    response_id = reply.json()["id"]
                    fb = client.post("/v1/feedback", json={"response_id": response_id, "rating": -1,
                                                           "correction": answer, "user": user})
                    figures.requests += 1
                    figures.server_errors += fb.status_code >= 500
                    if fb.status_code == 201:
                        with ledger.lock:
                            ledger.feedback[fb.json()["id"]] = (user, response_id, answer)
                elif op < 0.8 or not ledger.memories:
                    added = client.post("/v1/memories", json={"question": question, "answer": answer, "user": user})
                    figures.requests += 1
                    figures.server_errors += added.status_code >= 500
                    if added.status_code == 201:
                        with ledger.lock:
                            ledger.memories[added.json()["id"]] = (user, question, answer)
                else:
                    with ledger.lock:
                        mine = [i for i, (u, _, _) in ledger.memories.items()
                                if u == user and i not in ledger.retracted | ledger.tried_retract]
                        memory_id = rng.choice(mine) if mine else None
                        if memory_id is not None:
                            ledger.tried_retract.add(memory_id)
                    if memory_id is None:
                        continue
                    gone = client.delete(f"/v1/memories/{memory_id}", params={"user": user})
                    figures.requests += 1
                    figures.server_errors += gone.status_code >= 500
                    if gone.status_code == 200:
                        with ledger.lock:
                            ledger.retracted.add(memory_id)
                            ledger.tried_retract.discard(memory_id)
            except httpx.HTTPError:
                if not stop.is_set():
                    time.sleep(0.05)  # the server is gone (the kill): the answer never came


def check_writes(server: Server, ledger: Ledger, figures: Figures, rng: random.Random, sample: int = 40) -> None:
    """After a restart: every acknowledged write is there, retractions hold, searches agree with SQLite."""
    db = database(server.data_dir)
    try:
        rows = {r[0]: r[1:] for r in db.execute("select id, user, question, answer, retracted_at from memories")}
        feedback = {r[0]: r[1:] for r in db.execute("select id, response_id, correction from feedback")}
        by_feedback = {r[0] for r in db.execute("select feedback_id from memories where feedback_id is not null")}
    finally:
        db.close()
    with ledger.lock:
        memories, given, retracted = dict(ledger.memories), dict(ledger.feedback), set(ledger.retracted)
    figures.acknowledged_writes = len(memories) + len(given) + len(retracted)
    for memory_id, (user, question, answer) in memories.items():
        row = rows.get(memory_id)
        if row is None or row[:3] != (user, question, answer):
            figures.lost_writes += 1
            figures.notes.append(f"memory {memory_id} of {user} lost: {row}")
        elif memory_id in retracted and row[3] is None:
            figures.resurrected_retractions += 1
            figures.notes.append(f"memory {memory_id}: its retraction was lost")
    for feedback_id, (user, response_id, correction) in given.items():
        if feedback.get(feedback_id) != (response_id, correction) or feedback_id not in by_feedback:
            figures.lost_writes += 1
            figures.notes.append(f"feedback {feedback_id} on {response_id} lost or without its memory")
    # Searches through the HTTP API against SQLite: a live memory is found (or a newer live one of
    # the same user that reads the same), a retracted one never.
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for memory_id in rng.sample(sorted(rows), min(sample, len(rows))):
            user, question, answer, retracted_at = rows[memory_id]
            hits = client.get("/v1/memories", params={"query": question, "user": user, "limit": 5,
                                                      "threshold": 0.9}).json()["data"]
            figures.requests += 1
            for hit in hits:
                live = rows.get(hit["id"])
                if live is None or live[3] is not None or live[0] not in (None, user):
                    figures.index_disagreements += 1
                    figures.notes.append(f"search for memory {memory_id} answered {hit['id']}, not live for {user}")
            if retracted_at is None and not any(h["id"] >= memory_id for h in hits):
                figures.index_disagreements += 1
                figures.notes.append(f"live memory {memory_id} of {user} not found by its own question")


def kill_during_writes(trials: int, model: str, work: Path, seed: int = 0, writers: int = 4) -> Figures:
    """`trials` kill -9s of `ratchet serve` in bursts of writes from `writers` clients, each followed
    by a restart on the same data directory and a check of everything acknowledged so far."""
    figures, ledger, rng = Figures("kill -9 during writes"), Ledger(), random.Random(seed)
    started = time.monotonic()
    server = Server(work / "writes", model).start()
    with httpx.Client(base_url=server.url, timeout=120) as client:  # the embedder and the model loaded
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        client.get("/v1/memories", params={"query": "Hi"})
    try:
        for trial in range(trials):
            stop = threading.Event()
            threads = [threading.Thread(target=_writer, args=(server.url, USERS[i % len(USERS)], ledger, figures,
                                                              stop, random.Random(rng.random())), daemon=True)
                       for i in range(writers)]
            acked = len(ledger.memories) + len(ledger.feedback) + len(ledger.retracted)
            target = acked + rng.randint(5, 40)  # the kill lands after this many acknowledged writes
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while len(ledger.memories) + len(ledger.feedback) + len(ledger.retracted) < target and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))  # and at any moment of the next writes
            server.kill()
            stop.set()
            for t in threads:
                t.join(60)
            server.start()
            check_writes(server, ledger, figures, rng)
            figures.trials = trial + 1
    finally:
        server.stop()
    figures.seconds = round(time.monotonic() - started, 1)
    return figures


# -- b: kill -9 during consolidation ---------------------------------------------------------------
def adapter_is_whole(path: str) -> str | None:
    """Why the folder is not a whole, loadable PEFT adapter with its manifest (None: it is)."""
    from safetensors.torch import load_file

    folder = Path(path)
    try:
        json.loads((folder / "adapter_config.json").read_text())
        json.loads((folder / "ratchet.json").read_text())
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001  (any way of being broken is the answer)
        return f"{type(e).__name__}: {e}"
    return None if weights else "no weights"


def check_adapters(server: Server, question: str, figures: Figures) -> None:
    """After a restart: every servable version is whole, and the active one answers."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        listed = client.get("/v1/adapters").json()
        figures.requests += 1
        for version in listed["data"]:
            if version["status"] in ("promoted", "candidate"):
                db = database(server.data_dir)
                path = db.execute("select path from adapters where version = ?", [version["version"]]).fetchone()[0]
                db.close()
                broken = adapter_is_whole(path)
                if broken:
                    figures.bad_adapters += 1
                    figures.notes.append(f"{version['name']} ({version['status']}) is servable but {broken}")
        if listed["active"]:
            reply = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 4})
            figures.requests += 1
            figures.server_errors += reply.status_code >= 500
            served = reply.status_code == 200 and reply.json()["ratchet"]["adapter"] == listed["active"]
            if not served:
                figures.active_not_served += 1
                figures.notes.append(f"active {listed['active']} not served: {reply.status_code} {reply.text[:200]}")


def _cycle(client: httpx.Client, rng: random.Random, tag: str) -> dict:
    """Two new corrections and a cycle queued for them: the cycle as queued."""
    for n in range(2):
        words = rng.sample(WORDS, 3)
        client.post("/v1/memories", json={"question": f"Which {words[0]} is kept in the {words[1]}? ({tag}, {n})",
                                          "answer": f"the {words[2]} {rng.randrange(10**6)}"})
    return client.post("/v1/consolidations").json()


def _finished(client: httpx.Client, cycle_id: int) -> dict:
    while (row := client.get(f"/v1/consolidations/{cycle_id}").json())["status"] in ("queued", "running"):
        time.sleep(0.02)
    return row


def _wait_for_stage(client: httpx.Client, cycle_id: int, aim: str, figures: Figures) -> None:
    """Return as the cycle reaches `aim`: its last training step done (the folder is then written and
    registered), or "promoting" (the version loaded into the engine and made active)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = client.get(f"/v1/consolidations/{cycle_id}").json()
        figures.requests += 1
        step = re.match(r"training step (\d+)/(\d+)", row["message"] or "")
        if row["status"] not in ("queued", "running") or (aim == "promoting" and row["message"] == "promoting") \
                or (aim != "promoting" and step and step.group(1) == step.group(2)):
            return
        time.sleep(0.002)


def kill_during_consolidation(trials: int, model: str, work: Path, seed: int = 0) -> Figures:
    """`trials` kill -9s at a random moment of a consolidation cycle (training, registration,
    activation), each followed by a restart and a check of the adapters."""
    figures, rng = Figures("kill -9 during consolidation"), random.Random(seed)
    started = time.monotonic()
    server = Server(work / "cycles", model, tiny_cycles=True).start()
    question = "Which violin is kept in the harbor?"
    stages: dict[str, int] = {}
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            client.post("/v1/memories", json={"question": question, "answer": "the copper one"})
            first = _finished(client, client.post("/v1/consolidations").json()["id"])  # from the base model
            t0 = time.monotonic()  # a cycle as the trials run them: continuing the active adapter
            second = _finished(client, _cycle(client, rng, "warm-up")["id"])
            cycle_seconds = time.monotonic() - t0
        figures.notes.append(f"cycles before the trials: {first['status']}, {second['status']}; "
                             f"one took {cycle_seconds:.1f} s, so kills land in 0-{1.3 * cycle_seconds:.1f} s")
        for trial in range(trials):
            with httpx.Client(base_url=server.url, timeout=120) as client:
                cycle = _cycle(client, rng, f"trial {trial}")
                figures.requests += 3
                aim = ("random", "last training step", "promoting")[trial % 3]
                if aim == "random":
                    time.sleep(rng.uniform(0, cycle_seconds * 1.3))
                else:  # the adapter being saved and registered, or being loaded and activated
                    _wait_for_stage(client, cycle["id"], aim, figures)
                server.kill()
            db = database(server.data_dir)
            row = db.execute("select status, message from cycles where id = ?", [cycle["id"]]).fetchone()
            db.close()
            stage = row[0] if row[0] != "running" else row[1].split(" step")[0]
            stages[stage] = stages.get(stage, 0) + 1
            server.start()
            check_adapters(server, question, figures)
            figures.trials = trial + 1
    finally:
        server.stop()
    figures.notes.append("the cycle when killed: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))
    figures.seconds = round(time.monotonic() - started, 1)
    return figures


# -- c: 32 concurrent chats through a consolidation, a promotion and a rollback ----------------------
def _chatter(url: str, streaming: bool, stop: threading.Event, figures: Figures, lock: threading.Lock) -> None:
    """One client chatting until stopped; every answer must be whole (a stream ends with [DONE])."""
    body = {"messages": [{"role": "user", "content": "Which violin is kept in the harbor?"}], "max_tokens": 8,
            "stream": streaming}
    with httpx.Client(base_url=url, timeout=300) as client:
        while not stop.is_set():
            ok, why = False, ""
            try:
                if streaming:
                    with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                    ok = response.status_code == 200 and lines[-1] == "data: [DONE]" and \
                        not any('"error"' in line for line in lines)
                    why = f"{response.status_code} {lines[-2:] if lines else ''}"
                else:
                    response = client.post("/v1/chat/completions", json=body)
                    ok, why = response.status_code == 200, f"{response.status_code} {response.text[:200]}"
                server_error = response.status_code >= 500
            except httpx.HTTPError as e:
                why, server_error = f"{type(e).__name__}: {e}", False
            with lock:
                figures.requests += 1
                figures.server_errors += server_error
                if not ok:
                    figures.failed_requests += 1
                    figures.notes.append(f"{'stream' if streaming else 'chat'} failed: {why}")


def chats_through_swaps(model: str, work: Path, clients: int = 32, rounds: int = 1) -> Figures:
    """`clients` chatting at once (half streaming) while an admin consolidates (which promotes the new
    version), activates the previous one and rolls back, `rounds` times."""
    figures, lock, rng = Figures("32 concurrent chats through swaps"), threading.Lock(), random.Random(0)
    started = time.monotonic()
    with Server(work / "swaps", model, tiny_cycles=True) as server, \
            httpx.Client(base_url=server.url, timeout=300) as admin:
        stop = threading.Event()
        threads = [threading.Thread(target=_chatter, args=(server.url, i % 2 == 0, stop, figures, lock), daemon=True)
                   for i in range(clients)]
        for t in threads:
            t.start()
        try:
            for round_ in range(rounds):
                time.sleep(1)
                row = _finished(admin, _cycle(admin, rng, f"round {round_}")["id"])
                if row["status"] != "succeeded":
                    figures.notes.append(f"cycle {row['id']} {row['status']}: {row['message']}")
                time.sleep(1)
                versions = [v for v in admin.get("/v1/adapters").json()["data"] if v["status"] == "promoted"]
                if len(versions) > 1:  # promote an earlier version by hand, then roll back from it
                    swap = admin.post(f"/v1/adapters/{versions[-2]['version']}/activate")
                    if swap.status_code != 200:
                        figures.notes.append(f"activation: {swap.status_code} {swap.text[:200]}")
                    time.sleep(1)
                back = admin.post("/v1/adapters/rollback")
                if back.status_code != 200:
                    figures.notes.append(f"rollback: {back.status_code} {back.text[:200]}")
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(300)
        figures.trials = rounds
    figures.seconds = round(time.monotonic() - started, 1)
    return figures


# -- the report ------------------------------------------------------------------------------------
def tiny_model(folder: Path) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer (as tests/conftest.py makes it)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trainer.base_model import prepare_embedded

    base = prepare_embedded(Path(os.environ.get("RATCHET_MODELS_DIR", ROOT / ".cache" / "models")))
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _name(f: Figures) -> str:
    """The scenario's short name (--only)."""
    return {"kill -9 during writes": "writes", "kill -9 during consolidation": "cycles"}.get(f.scenario, "swaps")


def write_report(results: list[Figures], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps([asdict(f) for f in results], indent=2))
    columns = ("trials", "requests", "acknowledged_writes", "lost_writes", "resurrected_retractions",
               "index_disagreements", "server_errors", "failed_requests", "bad_adapters", "active_not_served",
               "seconds")
    lines = ["# Reliability under faults", "",
             "`python -m evals.reliability`: a real server process (transformers engine, a tiny random model) "
             "killed with SIGKILL during bursts of writes and during consolidation, and 32 concurrent chats "
             "(half streaming) through a consolidation, a promotion and a rollback.", "",
             "Trials: kill -9s and restarts on one data directory (for the chats: rounds of consolidate, "
             "activate the previous version, roll back, under 32 clients). Requests: answered ones (a kill's "
             "dropped connections are not counted). After each restart every acknowledged memory, feedback and "
             "retraction is looked up in SQLite, and searches through GET /v1/memories?query= are checked against "
             "it; every servable adapter folder is loaded from disk, and the active one must answer a chat.", "",
             "| scenario | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for f in results:
        lines.append(f"| {f.scenario} | " + " | ".join(str(getattr(f, c)) for c in columns) + " |")
    for f in results:
        if f.notes:
            lines += ["", f"## {f.scenario}: notes", ""] + [f"- {n}" for n in f.notes[:50]]
    (out / "reliability.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="ratchet serve with tiny consolidation cycles")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--engine", default="transformers")
    parser.add_argument("--trials", type=int, default=20, help="kill -9 trials per scenario")
    parser.add_argument("--rounds", type=int, default=3, help="consolidate/activate/rollback rounds under 32 chats")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--only", choices=("writes", "cycles", "swaps"), action="append",
                        help="run only these scenarios; the report keeps the others' figures")
    args = parser.parse_args()
    if args.command == "serve":
        return serve(args.data_dir, args.port, args.model, args.engine)
    with tempfile.TemporaryDirectory(prefix="ratchet-reliability-") as tmp:
        work = Path(tmp)
        model = tiny_model(work / "tiny-llama")
        runs = {"writes": lambda: kill_during_writes(args.trials, model, work),
                "cycles": lambda: kill_during_consolidation(args.trials, model, work),
                "swaps": lambda: chats_through_swaps(model, work, rounds=args.rounds)}
        kept = Path(args.out) / "reliability.json"
        results = [Figures(**f) for f in json.loads(kept.read_text())] if args.only and kept.exists() else []
        for name, run in runs.items():
            if args.only and name not in args.only:
                continue
            figures = run()
            results = [f for f in results if f.scenario != figures.scenario] + [figures]
            print(json.dumps(asdict(figures))[:2000], flush=True)
            write_report(sorted(results, key=lambda f: list(runs).index(_name(f))), Path(args.out))


if __name__ == "__main__":
    main()
