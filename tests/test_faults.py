"""The findings of issue 20 that the matrix, the schema fuzzing, the property tests and the kill -9
trials do not reach: limits at their defaults, saturation as the issue saw it (45 held requests),
odd paths and texts, a second `ratchet serve` on one data directory, keys for `local`, adapter
files made durable and the cost of --consolidate-after."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.api import create_app
from serving.service import LOCAL_ADMIN
from trainer.cycle import CycleConfig, Cycles
from trainer.lora import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
LOCAL = "http://127.0.0.1"
Q = "What university did Watts Humphrey attend?"
FAST = CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False,
                   gate_enabled=False)


def client_of(r) -> TestClient:
    return TestClient(create_app(r), base_url=LOCAL, raise_server_exceptions=False)


def shaped(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, f"{response.status_code} (not {status}): {response.text[:300]}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code:
        assert error["code"] == code, error
    return error


def ask(client, content=Q, **extra):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], **extra})


# -- limits, at their defaults: the sizes the issue reported -------------------------------------
def test_the_sizes_the_issue_reported_are_refused_at_the_default_limits(start_ratchet):
    client = client_of(start_ratchet())
    shaped(ask(client, "x" * 8_000_000), 413, "body_too_large")  # an 8 MB chat message
    shaped(client.post("/v1/memories", json={"question": Q, "answer": "y" * 20_000_000}), 413, "body_too_large")
    shaped(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}] * 50_000}), 413)
    shaped(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}] * 65}), 400,
           "too_large")
    shaped(ask(client, "x" * 16_001), 400, "too_large")
    reply = ask(client).json()
    for field in ("comment", "correction"):
        shaped(client.post("/v1/feedback", json={"response_id": reply["id"], "rating": -1, field: "z" * 4_001}), 400,
               "too_large")
    shaped(client.post("/v1/memories", json={"question": Q, "answer": "z" * 4_001}), 400, "too_large")
    shaped(client.post("/v1/agreement", json={"messages": [{"role": "user", "content": Q}],
                                              "completion": "z" * 16_001}), 400, "too_large")


def test_max_tokens_beyond_the_models_length_is_a_400(start_ratchet):
    client = client_of(start_ratchet())
    shaped(ask(client, max_tokens=4096), 400)  # the default max_model_len is 2048
    assert ask(client, max_tokens=16).status_code == 200


# -- odd paths and texts ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [
    ("DELETE", "/v1/memories/99999999999999999999999"),
    ("POST", "/v1/memories/%C2%B2/confirm"),
    ("POST", "/v1/failures/1e400/lesson"),
    ("GET", "/v1/consolidations/-1"),
    ("POST", "/v1/adapters/%C2%B2/activate"),
    ("POST", "/v1/adapters/99999999999999999999999/activate"),
    ("DELETE", "/v1/threads/%ED%A0%80"),  # a lone surrogate, percent-encoded
    ("GET", "/v1/memories?limit=99999999999999999999999"),
])
def test_odd_ids_and_texts_in_paths_are_openai_shaped_4xx(start_ratchet, method, path):
    response = client_of(start_ratchet()).request(method, path, json={"answer": "a"} if "lesson" in path else None)
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    shaped(response, response.status_code)


@pytest.mark.parametrize("field", ["comment", "correction"])
def test_a_lone_surrogate_in_feedback_is_a_400(start_ratchet, field):
    client = client_of(start_ratchet())
    reply = ask(client).json()
    body = '{"response_id": "%s", "rating": -1, "%s": "\\udc80"}' % (reply["id"], field)
    shaped(client.post("/v1/feedback", content=body, headers={"content-type": "application/json"}), 400)


# -- saturation: the issue's 45 held requests ------------------------------------------------------
def test_45_held_chats_leave_health_and_models_answering_and_the_rest_get_429(start_ratchet, echo_model,
                                                                                live_server):
    r = start_ratchet()  # the default limits: 32 chats at once
    echo_model.hold = threading.Event()
    statuses: list[int] = []
    with live_server(create_app(r)) as server:
        def held():
            statuses.append(httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                                       json={"messages": [{"role": "user", "content": Q}]}).status_code)

        threads = [threading.Thread(target=held) for _ in range(45)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while (len(echo_model.calls) < 32 or statuses.count(429) < 13) and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        health = httpx.get(f"{server.url}/health", timeout=5)
        models = httpx.get(f"{server.url}/v1/models", timeout=5)
        answered_in = time.monotonic() - started
        busy = httpx.post(f"{server.url}/v1/chat/completions", timeout=5,
                          json={"messages": [{"role": "user", "content": Q}]})
        echo_model.hold.set()
        for t in threads:
            t.join(60)
    assert health.status_code == 200 and models.status_code == 200 and answered_in < 5
    shaped(busy, 429, "busy")
    assert int(busy.headers["retry-after"]) >= 1
    assert statuses.count(200) == 32 and statuses.count(429) == 13, sorted(statuses)


def test_metrics_count_requests_by_route_and_status_in_prometheus_text(start_ratchet):
    client = client_of(start_ratchet())
    for _ in range(3):
        assert ask(client).status_code == 200
    shaped(client.get("/v1/memories/12345"), 404)
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE ratchet_http_requests_total counter" in text
    assert 'ratchet_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 3.0' in text
    assert 'ratchet_http_requests_total{method="GET",route="/v1/memories/{memory_id}",status="404"} 1.0' in text, \
        text[:2000]


# -- keys for `local` ------------------------------------------------------------------------------
def test_a_key_for_user_local_is_refused_by_the_cli(tmp_path):
    from typer.testing import CliRunner

    from serving.cli import app as cli

    result = CliRunner().invoke(cli, ["keys", "create", "--user", "local", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0 and "local" in result.output
    result = CliRunner().invoke(cli, ["keys", "create", "--user", " local ", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0


def test_a_key_for_local_made_before_the_fix_is_not_trusted(start_ratchet):
    """A key stored for `local` by an older Ratchet: its corrections must not count as the operator's."""
    import hashlib
    import secrets

    r = start_ratchet()
    token = "rk-" + secrets.token_urlsafe(32)
    r.memory.db["api_keys"].insert({"user": "local", "role": "user", "hash": hashlib.sha256(token.encode()).hexdigest(),
                                    "created_at": "2026-01-01T00:00:00+00:00"}, alter=True)
    client = client_of(r)
    response = client.post("/v1/memories", headers={"Authorization": f"Bearer {token}"},
                           json={"question": Q, "answer": "Hogwarts"})
    if response.status_code == 201:  # accepted: then it must stay out of the shared adapter
        assert response.json()["id"] not in [c.id for c in r.cycles.corrections()], "a user key named local is trusted"
    else:
        shaped(response, response.status_code)
        assert response.status_code in (401, 403)


# -- two servers on one data directory ---------------------------------------------------------------
@pytest.mark.slow
def test_a_second_ratchet_serve_on_the_same_data_directory_refuses_to_start(tmp_path, tiny_model):
    from evals.reliability import Server

    with Server(tmp_path / "data", tiny_model) as first:
        second = subprocess.run(
            [sys.executable, "-m", "serving.cli", "serve", "--engine", "transformers", "--port", "0",
             "--data-dir", str(tmp_path / "data"), "--model", tiny_model],
            cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert second.returncode != 0
        assert "served by ratchet pid" in second.stdout + second.stderr, second.stdout[-2000:] + second.stderr[-2000:]
        assert httpx.get(f"{first.url}/health", timeout=10).status_code == 200  # the first is untouched


# -- adapter files are durable ------------------------------------------------------------------------
def test_a_registered_adapters_files_are_fsynced(tmp_path, tiny_model, memory, monkeypatch):
    """An adapter that is served must survive a power cut: its files (and folder) reach the disk
    before it is registered."""
    from trainer.registry import AdapterRegistry

    synced: set[str] = set()
    real_fsync = os.fsync

    def fsync(fd):
        try:  # a file written whole and then renamed counts under its final name
            synced.add(os.readlink(f"/proc/self/fd/{fd}").removesuffix(".tmp"))
        except OSError:
            pass
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    memory.add_correction(Q, "Illinois Institute of Technology")
    registry = AdapterRegistry(memory.db, tmp_path / "adapters")
    cycles = Cycles(memory, registry, tiny_model, FAST, tmp_path, on_promote=lambda a: registry.activate(a.version))
    row = cycles.wait(cycles.submit(), timeout=300)
    assert row["status"] == "succeeded", row
    folder = registry.folder_for(row["adapter_version"])
    files = {str((folder / name).resolve()) for name in ("adapter_config.json", "adapter_model.safetensors",
                                                         "ratchet.json")}
    assert files <= synced, f"not fsynced: {sorted(f.rsplit('/', 1)[-1] for f in files - synced)}"
    assert str(folder.resolve()) in synced, "the folder itself (its entries) is not fsynced"


# -- --consolidate-after --------------------------------------------------------------------------------
def test_consolidate_after_does_not_rescan_every_correction_per_correction(start_ratchet):
    """What --consolidate-after costs per correction must not grow with the corrections stored: SQLite's
    virtual machine steps of the schedule's check for one more correction, with 300 and with 3,000 stored
    (the correction's own writes and its user's quota count are index look-ups, measured elsewhere)."""
    from memory.text import question_key
    from trainer.schedule import ScheduleConfig

    r = start_ratchet(schedule=ScheduleConfig(after_corrections=1_000_000))
    template = r.memory.corrections.get(r.add_correction(LOCAL_ADMIN, "seed?", "seed").id, None, admin=True)
    row = dict(next(r.memory.db["memories"].rows_where("id = ?", [template.id])))

    def store(n: int) -> None:
        rows = []
        for i in range(n):
            question = f"Stored question number {i} {time.monotonic_ns()}?"
            rows.append({**row, "id": None, "question": question, "question_key": question_key(question)})
        r.memory.db["memories"].insert_all(rows)

    def steps_for_one_correction(i: int) -> int:
        steps = [0]

        def count():
            steps[0] += 1
            return 0

        r.memory.add_correction(f"A new question {i}?", "an answer")
        r.memory.db.conn.set_progress_handler(count, 100)
        try:
            r.schedule.on_correction()
        finally:
            r.memory.db.conn.set_progress_handler(None, 0)
        return steps[0]

    store(300)
    few = steps_for_one_correction(1)
    store(2_700)
    many = steps_for_one_correction(2)
    assert many <= 3 * few + 10, f"one correction took {few} steps with 300 stored and {many} with 3,000"
