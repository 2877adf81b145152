"""The `ratchet` command: serve, chat, feedback, consolidate, adapters, and `ratchet memory ...`."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from serving.client import DEFAULT_URL, ApiError, RatchetClient

app = typer.Typer(help="Ratchet: an assistant that learns from every correction.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
out = Console()

URL = typer.Option(os.environ.get("RATCHET_URL", DEFAULT_URL), "--url", help="The Ratchet server.")
DATA_DIR = typer.Option(None, "--data-dir", help="Ratchet's data directory (default: RATCHET_DATA_DIR or ~/.local/share/ratchet)")

keys_app = typer.Typer(help="API keys: made, listed and revoked on the data directory directly.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    engine: str = typer.Option(None, help="vllm (default) or transformers"),
    host: str = typer.Option(None, help="Address to listen on (default 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (default 8000)"),
    data_dir: Optional[Path] = typer.Option(None, help="Where Ratchet keeps its database, index and adapters"),
    model: str = typer.Option(None, help="'embedded' (SmolLM2-135M-Instruct), an HF model id or a local folder"),
    consolidate_every: Optional[str] = typer.Option(None, help="Consolidate on a schedule: 30m, 6h, 1d or a cron line"),
    consolidate_after: Optional[int] = typer.Option(None, min=1, help="Consolidate once this many corrections wait"),
):
    """Start the server: the engine, memory, and the HTTP API."""
    import logging

    import uvicorn

    from serving.api import create_app
    from serving.auth import is_loopback
    from serving.service import Ratchet
    from serving.settings import Settings

    try:
        settings = Settings.load(engine=engine, host=host, port=port, data_dir=data_dir, model=model,
                                 consolidate_every=consolidate_every, consolidate_after=consolidate_after)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    console.print(f"ratchet: data in {settings.data_dir}; starting the {settings.engine} engine ...")
    started = time.monotonic()
    with _offline(settings.data_dir) as (offline, _):
        keyed = offline.keyed()
    if not keyed and not is_loopback(settings.host):
        console.print(f"[red]refusing to listen on {settings.host}: no API keys are configured, "
                      "so Ratchet serves loopback (127.0.0.1) only; make one with `ratchet keys create`[/red]")
        raise typer.Exit(2)
    try:
        ratchet = Ratchet(settings)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    ratchet.start()
    access = ("API keys required on /v1" if keyed
              else "no API keys configured: loopback only, no authentication")
    console.print(f"ratchet: engine ready in {time.monotonic() - started:.0f} s; "
                  f"serving http://{settings.host}:{settings.port} ({access})")
    uvicorn.run(create_app(ratchet, stop_on_shutdown=True), host=settings.host, port=settings.port, log_level="info")


@contextlib.contextmanager
def _offline(data_dir):
    """The application on the data directory alone (no engine, no server), as the local operator."""
    from serving.service import LOCAL_ADMIN, Ratchet
    from serving.settings import Settings

    ratchet = Ratchet(Settings.load(data_dir=data_dir), offline=True)
    try:
        yield ratchet, LOCAL_ADMIN
    finally:
        ratchet.close()


def _client(url: str) -> RatchetClient:
    return RatchetClient(url)


def _call(fn, *args, **kwargs):
    """A client call; an error from the server (or none reached) is printed and ends the command."""
    try:
        return fn(*args, **kwargs)
    except ApiError as e:
        hint = " (is `ratchet serve` running?)" if e.status == 0 else ""
        console.print(f"[red]{e}[/red]{hint}")
        raise typer.Exit(1)


@app.command()
def chat(
    message: Optional[str] = typer.Argument(None, help="Ask once; without it, an interactive chat"),
    url: str = URL,
    user: Optional[str] = typer.Option(None, help="Who is asking"),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Retrieve corrections from memory"),
    model: str = typer.Option("ratchet", help="ratchet, ratchet-base or ratchet-vN"),
    thread: Optional[str] = typer.Option(None, help="Keep the conversation on the server under this thread id"),
):
    """Chat with the assistant; each answer shows the response id to give feedback on."""
    import uuid

    client = _client(url)

    def ask(text: str, thread_id: Optional[str]) -> None:
        r = _call(client.chat, text, model=model, memory=memory, user=user, thread_id=thread_id)
        # The answer as the model wrote it (no markup read, no wrapping), ending its own line.
        typer.echo(r["choices"][0]["message"]["content"].rstrip("\n"))
        used = r.get("ratchet", {}).get("memories") or []
        console.print(f"[dim]{r['id']}" + (f" · {len(used)} correction(s) from memory" if used else "") + "[/dim]")

    if message is not None:
        ask(message, thread)
        return
    thread_id = thread or f"cli-{uuid.uuid4().hex[:8]}"
    console.print(f"[dim]thread {thread_id}; an empty line ends. Correct an answer with "
                  f"`ratchet feedback RESPONSE_ID --correction '...'`[/dim]")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        ask(text, thread_id)


@app.command()
def feedback(
    response_id: str = typer.Argument(..., help="The id shown under the answer"),
    correction: Optional[str] = typer.Option(None, "--correction", "-c", help="The right answer"),
    comment: Optional[str] = typer.Option(None, help="Anything else to say about the answer"),
    good: bool = typer.Option(False, "--good/--bad", help="Thumbs up (--good) or down (--bad, the default)"),
    url: str = URL,
):
    """Rate an answer, and correct it."""
    r = _call(_client(url).feedback, response_id, rating=1 if good else -1, comment=comment, correction=correction)
    out.print(f"feedback {r['id']} recorded" + (" with a correction: it is used from now on" if correction else ""))


@app.command()
def consolidate(
    url: str = URL,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the cycle to its end"),
):
    """Distil the corrections so far into a new adapter (a consolidation cycle)."""
    client = _client(url)
    c = _call(client.consolidate, wait=False)
    out.print(f"consolidation {c['id']} {c['status']}")
    if not wait:
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(c["status"], total=1.0)

        def show(cycle: dict) -> None:
            progress.update(task, completed=cycle["progress"] or 0.0, description=cycle["message"] or cycle["status"])

        c = _call(client.follow, c, poll=0.5, on_progress=show)
    out.print(f"consolidation {c['id']} {c['status']}: {c['message']}")
    if c["status"] not in ("succeeded",):
        raise typer.Exit(1)


adapters_app = typer.Typer(help="Adapter versions: list, activate, roll back.", invoke_without_command=True)
app.add_typer(adapters_app, name="adapters")


@adapters_app.callback()
def adapters(ctx: typer.Context, url: str = URL):
    """List the adapter versions; the active one is marked."""
    if ctx.invoked_subcommand is not None:
        return
    r = _call(_client(url).get, "/v1/adapters")
    table = Table("", "version", "status", "parent", "created", "train s", "loss")
    for v in r["data"]:
        m = v["metrics"]
        table.add_row("*" if v["active"] else "", v["name"], v["status"], str(v["parent"] or "-"), v["created_at"][:19],
                      str(m.get("train_seconds", "")), str(m.get("final_loss", "")))
    out.print(table if r["data"] else "no adapters yet: the base model answers")


@adapters_app.command("activate")
def adapters_activate(version: str = typer.Argument(..., help="N, vN or ratchet-vN"), url: str = URL):
    """Serve VERSION as `ratchet` from now on (requests running on the old one finish first)."""
    r = _call(_client(url).post, f"/v1/adapters/{version}/activate")
    out.print(f"active: {r['active']}")


@adapters_app.command("rollback")
def adapters_rollback(url: str = URL):
    """Back to the promoted version before the active one, or to the base model."""
    r = _call(_client(url).post, "/v1/adapters/rollback")
    out.print(f"active: {r['active'] or 'ratchet-base (no adapter)'}")


@keys_app.command("create")
def keys_create(
    user: str = typer.Option(..., "--user", help="The user the key speaks for"),
    admin: bool = typer.Option(False, "--admin", help="An admin key: consolidations, adapters, memory administration"),
    data_dir: Optional[Path] = DATA_DIR,
):
    """Make a key; its token is printed once and never stored (only its sha256 is)."""
    with _offline(data_dir) as (ratchet, operator):
        try:
            key, token = ratchet.create_key(operator, user, admin=admin)
        except ValueError as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(1)
    out.print(token)
    console.print(f"[dim]key {key.id} for {key.user} ({key.role}); keep the token: it is not shown again. "
                  f"A running server needs it from now on (and may then listen beyond loopback after a restart).[/dim]")


@keys_app.command("list")
def keys_list(data_dir: Optional[Path] = DATA_DIR):
    """The keys (never their tokens)."""
    with _offline(data_dir) as (ratchet, operator):
        keys = ratchet.list_keys(operator)
    table = Table("id", "token", "user", "role", "created", "revoked")
    for k in keys:
        table.add_row(str(k.id), k.prefix + "…", k.user, k.role, k.created_at[:19], (k.revoked_at or "")[:19])
    out.print(table if keys else "no API keys: the server is open on loopback only")


@keys_app.command("revoke")
def keys_revoke(key_id: int = typer.Argument(..., help="The key's id (see `ratchet keys list`)"),
                data_dir: Optional[Path] = DATA_DIR):
    """Revoke a key: refused from the next request on."""
    try:
        with _offline(data_dir) as (ratchet, operator):
            key = ratchet.revoke_key(operator, key_id)
    except KeyError as e:
        console.print(f"[red]{e.args[0]}[/red]")
        raise typer.Exit(1)
    out.print(f"key {key.id} ({key.user}) revoked at {key.revoked_at}")


eval_app = typer.Typer(help="Benchmarks that drive Ratchet through its HTTP API.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("zsre")
def eval_zsre(
    n: int = typer.Option(200, "--n", min=1, help="How many zsRE corrections to stream in"),
    cycle_every: int = typer.Option(50, "--cycle-every", min=1, help="A consolidation after this many corrections"),
    output: Path = typer.Option(None, help="Where to write results.json, report.md and plots"),
    url: Optional[str] = typer.Option(None, "--url", help="A running server; default: start one in a fresh data dir"),
    data: Optional[Path] = typer.Option(None, help="zsRE dev.jsonl (default ../shared/data/zsre/dev.jsonl)"),
    engine: str = typer.Option("vllm", help="Engine of the server it starts"),
    concurrency: int = typer.Option(24, min=1, help="Requests in flight at once (the server answers 32; 24 asked a run 1.3-1.6x faster than 8: reports/zsre-concurrency/report.md)"),
    anchors: str = typer.Option("built-in", help="Replay prompts of the server it starts: 'built-in' (a server's "
                                                 "default) or 'nq' (those and 150 NQ questions disjoint from the "
                                                 "evaluated ones)"),
    merged_lane: bool = typer.Option(False, help="Start the server with RATCHET_MERGED_LANE=1 (vLLM: the active "
                                                 "adapter merged, faster, and token-level locality measurable)"),
    split: str = typer.Option("report", help="tune: dev records 1-2000 (for tuning); report: 2001-3783 (never "
                                             "tuned on)"),
    neighbours: int = typer.Option(6, min=0, help="Neighbour questions (the subject's other relations) per record"),
    corrections: str = typer.Option("short", help="How corrections are written: short (the answer), no-its "
                                                  "(\"No, it's X.\") or sentence"),
    tiers: str = typer.Option("all", help="all, or memory: the memory tier right after each correction only"),
    base_from: Optional[Path] = typer.Option(None, help="An earlier run's results.json on the same records: its "
                                                        "base-model answers, not asked again"),
    sample: Optional[int] = typer.Option(None, min=1, help="Records measured in full (unrelated question, "
                                                           "neighbours, every cycle, every tier), evenly spaced; the "
                                                           "others only as corrected (default: all)"),
    resume: bool = typer.Option(False, help="Continue the unfinished run in --output where it stopped (a crash, a "
                                            "closed session), on its server's data; the same options"),
):
    """The learning benchmark: reliability, generalisation, locality and bleed per tier and per cycle."""
    from evals import zsre

    output = output or Path("reports") / f"zsre-{split}-n{n}-k{cycle_every}"
    try:
        results = zsre.run(n, cycle_every, output, url=url, data=data or zsre.ZSRE, engine=engine,
                           models_dir=os.environ.get("RATCHET_MODELS_DIR"), concurrency=concurrency, anchors=anchors,
                           merged_lane=merged_lane, split=split, neighbours=neighbours, corrections=corrections,
                           tiers=tiers, base_from=base_from, sample=sample, resume=resume)
    except (ValueError, KeyError, FileNotFoundError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    out.print((output / "report.md").read_text())
    console.print(f"wrote {output}/report.md, results.json and plots in {results['seconds']:.0f} s")


# -- ratchet memory ... (over HTTP like the rest; rebuild-index also offline, on --data-dir) ------
memory_app = typer.Typer(help="Search, retract and inspect memories; list failures and turn them into lessons.",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@memory_app.command("search")
def memory_search(
    query: str = typer.Argument(..., help="What to look for"),
    user: Optional[str] = typer.Option(None, help="Search as this user (default: local)"),
    limit: int = typer.Option(5, help="At most this many"),
    threshold: Optional[float] = typer.Option(None, help="Minimum cosine similarity (default: the server's)"),
    url: str = URL,
):
    """The memories a user may see that are nearest to QUERY (newest correction of a question wins)."""
    params = {"query": query, "limit": limit, **({"user": user} if user else {}),
              **({"threshold": threshold} if threshold is not None else {})}
    r = _call(_client(url).get, "/v1/memories", **params)
    table = Table("id", "score", "scope", "question", "answer")
    for m in r["data"]:
        table.add_row(str(m["id"]), f"{m['score']:.3f}", "shared" if m["shared"] else m["user"], m["question"], m["answer"])
    out.print(table if r["data"] else "nothing in memory near that")


@memory_app.command("retract")
def memory_retract(
    memory_id: int = typer.Argument(..., help="The memory's id (see `ratchet memory search`)"),
    user: Optional[str] = typer.Option(None, help="Retract as this user (the one who gave it); admins may omit it"),
    url: str = URL,
):
    """Take a correction out of retrieval at once; the next consolidation takes it out of the weights."""
    r = _call(_client(url).delete, f"/v1/memories/{memory_id}", user=user)
    out.print(f"memory {r['id']} retracted ({r['question']!r} → {r['answer']!r})")


@memory_app.command("confirm")
def memory_confirm(memory_id: int = typer.Argument(..., help="The memory's id"), url: str = URL):
    """Admin: vouch for a correction from an untrusted user, so the next cycle may learn it."""
    r = _call(_client(url).post, f"/v1/memories/{memory_id}/confirm")
    out.print(f"memory {r['id']} confirmed ({r['question']!r} → {r['answer']!r})")


@memory_app.command("failures")
def memory_failures(
    kind: Optional[str] = typer.Option(None, help="engine_error, timeout, abstention, contradiction or repeat"),
    user: Optional[str] = typer.Option(None, help="Only this user's"),
    open_only: bool = typer.Option(False, "--open", help="Only those not yet turned into a lesson"),
    limit: int = typer.Option(50),
    url: str = URL,
):
    """Failures that came without feedback, newest first."""
    params = {"limit": limit, "open": open_only, **({"kind": kind} if kind else {}), **({"user": user} if user else {})}
    r = _call(_client(url).get, "/v1/failures", **params)
    table = Table("id", "kind", "user", "question", "answer", "detail", "lesson")
    for f in r["data"]:
        table.add_row(str(f["id"]), f["kind"], f["user"] or "", (f["prompt"] or "")[:60], (f["response"] or "")[:40],
                      (f["detail"] or "")[:50], str(f["lesson_id"] or ""))
    out.print(table if r["data"] else "no failures")


@memory_app.command("lesson")
def memory_lesson(
    failure_id: int = typer.Argument(..., help="The failure's id (see `ratchet memory failures`)"),
    answer: str = typer.Argument(..., help="The right answer to the question that failed"),
    shared: bool = typer.Option(False, "--shared", help="For every user, not only the one who asked"),
    url: str = URL,
):
    """Turn a failure into a lesson: a correction of its question, used from now on."""
    r = _call(_client(url).post, f"/v1/failures/{failure_id}/lesson", {"answer": answer, "shared": shared})
    out.print(f"memory {r['memory']['id']} made from failure {failure_id}: {r['memory']['question']!r} → {answer!r}")


@memory_app.command("rebuild-index")
def memory_rebuild_index(
    data_dir: Optional[Path] = typer.Option(None, help="Rebuild offline, in this data directory (the server stopped)"),
    url: str = URL,
):
    """Rebuild the FAISS indexes from SQLite: through the server, or offline with --data-dir."""
    if data_dir is None:
        r = _call(_client(url).post, "/v1/memories/rebuild-index")
        out.print(f"index rebuilt: {r['memories']} memories in {r['scopes']} scope(s), {r['seconds']} s")
        return
    with _offline(data_dir) as (ratchet, operator):
        r = ratchet.rebuild_index(operator)
    out.print(f"index rebuilt: {r['memories']} memories in {r['scopes']} scope(s), {r['seconds']:.1f} s")


if __name__ == "__main__":
    app()
