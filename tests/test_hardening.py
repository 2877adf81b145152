"""Safe with many users and under faults: each finding of the audit (issue 20), on a fast echo engine."""

from __future__ import annotations

import argparse
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.api import create_app
from serving.engines import EngineError
from serving.engines.vllm import VLLMEngine, VLLMOptions
from serving.service import LOCAL_ADMIN, DataDirInUse
from serving.settings import Limits

Q = "What university did Watts Humphrey attend?"
LOCAL = "http://127.0.0.1"


def client_of(r, **kwargs) -> TestClient:
    return TestClient(create_app(r), base_url=LOCAL, **kwargs)


def chat(client, text=Q, **extra):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **extra})


def shaped(response, status: int, code: str | None = None) -> dict:
    """The response is an OpenAI-shaped error with this status (and code)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code, error
    return error


# -- threads ------------------------------------------------------------------------------------
def test_the_same_thread_id_from_another_user_is_another_thread(start_ratchet, echo_model):
    client = client_of(start_ratchet())
    assert chat(client, "My card number is 1234.", user="ann", thread_id="support").status_code == 200
    assert chat(client, "What did I say?", user="bob", thread_id="support").status_code == 200
    seen_by_bob = [m["content"] for m in echo_model.calls[-1]["messages"]]
    assert seen_by_bob == ["What did I say?"]  # not ann's turns
    assert chat(client, "And now?", user="ann", thread_id="support").status_code == 200
    assert "My card number is 1234." in [m["content"] for m in echo_model.calls[-1]["messages"]]


def test_a_thread_is_capped_and_can_be_deleted_by_its_user_only(start_ratchet):
    client = client_of(start_ratchet(limits=Limits(thread_messages=4)))
    for text in ("one", "two"):
        assert chat(client, text, user="ann", thread_id="t").status_code == 200
    shaped(chat(client, "three", user="ann", thread_id="t"), 400, "thread_full")
    shaped(client.delete("/v1/threads/t", params={"user": "bob"}), 404, "thread_not_found")
    assert client.delete("/v1/threads/t", params={"user": "ann"}).json()["deleted"] is True
    assert chat(client, "three", user="ann", thread_id="t").status_code == 200


# -- trust ---------------------------------------------------------------------------------------
def test_an_untrusted_correction_cannot_displace_a_trusted_one_from_training(start_ratchet):
    r = start_ratchet()
    client = client_of(r)
    shared = client.post("/v1/memories", json={"question": Q, "answer": "Illinois Institute of Technology",
                                               "shared": True}).json()
    client.post("/v1/memories", json={"question": Q, "answer": "Hogwarts", "user": "mallory"})  # newer, untrusted
    assert [c.id for c in r.cycles.corrections()] == [shared["id"]]


def test_a_key_cannot_be_made_for_the_keyless_operator(start_ratchet):
    with pytest.raises(ValueError, match="local"):
        start_ratchet().create_key(LOCAL_ADMIN, "local")


# -- keyless mode: only this machine's own pages -------------------------------------------------
@pytest.mark.parametrize("headers", [{"host": "evil.example"}, {"origin": "http://evil.example"},
                                     {"origin": "null"}, {"origin": "http://127.0.0.1:9999"}])
def test_keyless_mode_refuses_foreign_hosts_and_origins(start_ratchet, headers):
    client = client_of(start_ratchet())
    shaped(client.get("/v1/failures", headers=headers), 403, "foreign_origin")
    shaped(client.post("/v1/consolidations", headers=headers), 403, "foreign_origin")
    assert client.get("/v1/failures", headers={"origin": LOCAL}).status_code == 200  # its own page


# -- limits ---------------------------------------------------------------------------------------
def test_requests_beyond_the_limits_get_clear_errors(start_ratchet):
    client = client_of(start_ratchet(limits=Limits(body_bytes=4000, messages=3, message_chars=100, note_chars=50,
                                                   memories_per_user=2)))
    shaped(chat(client, "x" * 5000), 413, "body_too_large")
    chunked = iter([b"x" * 3000, b"x" * 3000])  # no length declared: counted as it arrives
    shaped(client.post("/v1/chat/completions", content=chunked, headers={"content-type": "application/json"}), 413,
           "body_too_large")
    shaped(chat(client, "x" * 101), 400, "too_large")
    many = [{"role": "user", "content": "hi"}] * 4
    shaped(client.post("/v1/chat/completions", json={"messages": many}), 400, "too_large")
    reply = chat(client).json()
    shaped(client.post("/v1/feedback", json={"response_id": reply["id"], "rating": -1, "comment": "y" * 51}), 400,
           "too_large")
    for n in range(2):
        assert client.post("/v1/memories", json={"question": f"q{n}?", "answer": "a"}).status_code == 201
    shaped(client.post("/v1/memories", json={"question": "q3?", "answer": "a"}), 429, "quota_exceeded")


def test_max_tokens_beyond_the_model_is_a_400_not_a_503(start_ratchet):
    client = client_of(start_ratchet(vllm=VLLMOptions(max_model_len=64)))
    shaped(chat(client, max_tokens=64), 400, "too_large")
    assert chat(client, max_tokens=32).status_code == 200


@pytest.mark.parametrize("path", ["/v1/memories/99999999999999999999999999", "/v1/memories/%C2%B2",
                                  "/v1/failures/99999999999999999999999", "/v1/consolidations/%C2%B2"])
def test_odd_ids_are_openai_shaped_400s(start_ratchet, path):
    shaped(client_of(start_ratchet(), raise_server_exceptions=False).get(path), 400)


def test_a_lone_surrogate_is_refused(start_ratchet):
    client = client_of(start_ratchet(), raise_server_exceptions=False)
    body = '{"messages": [{"role": "user", "content": "\\ud800 hi"}]}'
    shaped(client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}), 400)


# -- saturation ------------------------------------------------------------------------------------
def test_a_saturated_server_says_429_and_still_answers_health(start_ratchet, echo_model):
    client = client_of(start_ratchet(limits=Limits(concurrent_requests=1)))
    echo_model.hold = threading.Event()
    first = threading.Thread(target=lambda: chat(client))
    first.start()
    assert echo_model.entered.wait(10)
    busy = chat(client)
    shaped(busy, 429, "busy")
    assert busy.headers["retry-after"] == "1"
    assert client.get("/health").status_code == 200 and client.get("/v1/models").status_code == 200
    echo_model.hold.set()
    first.join(10)
    assert chat(client).status_code == 200


# -- streams ---------------------------------------------------------------------------------------
def test_a_dropped_stream_stops_generating_records_what_was_said_and_releases_its_adapter(
        start_ratchet, echo_model, live_server, monkeypatch):
    from agent.protocol import Completion

    generated = []

    def slow_stream(messages, **options):
        for i in range(200):
            time.sleep(0.02)
            generated.append(i)
            yield f"w{i} "
        yield Completion(text="never reached")

    monkeypatch.setattr(echo_model, "stream", slow_stream)
    r = start_ratchet()
    with live_server(create_app(r)) as server:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": Q}], "stream": True}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            next(lines), next(lines)
        response_id = httpx.Response(200, content=first[6:]).json()["id"]
        deadline = time.monotonic() + 10  # the server notices the client is gone at its next piece
        while (r.memory.interactions.get(response_id) is None or r.inflight()) and time.monotonic() < deadline:
            time.sleep(0.05)
    row = r.memory.interactions.get(response_id)
    assert row is not None and row["response"].startswith("w0") and "never reached" not in row["response"]
    assert len(generated) < 100 and r.inflight() == {}


# -- the engine and the data directory -------------------------------------------------------------
def test_a_second_server_on_the_same_data_directory_refuses_to_start(start_ratchet):
    start_ratchet()
    with pytest.raises(DataDirInUse, match="served by ratchet pid"):
        start_ratchet()


def test_an_active_adapter_that_fails_to_load_falls_back_to_the_base_model(start_ratchet, echo_model, tmp_path):
    r = start_ratchet()
    folder = r.registry.folder_for(1)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    r.registry.register(1, parent=None, cycle_id=None, manifest={})
    r.activate(LOCAL_ADMIN, 1)
    r.stop()

    def broken(name, path):
        raise EngineError(f"cannot load {name}")

    echo_model.load_adapter = broken
    r = start_ratchet()
    assert r.active is None and r.health()["status"] == "ok"
    assert [f["kind"] for f in r.failures(LOCAL_ADMIN)] == ["engine_error"]
    assert chat(client_of(r)).status_code == 200


def test_a_running_but_hung_vllm_is_not_alive(monkeypatch):
    engine = VLLMEngine("unused", VLLMOptions(unhealthy_checks=3))
    monkeypatch.setattr(engine, "running", lambda: True)
    monkeypatch.setattr(engine, "healthy", lambda: False)
    assert [engine.alive() for _ in range(3)] == [True, True, False]


def _dropping_server(drops: int):
    """A local HTTP server that reads the first `drops` requests and closes their connection
    without answering (as vLLM's server closing a reused keep-alive connection), then answers a
    chat completion; returns (port, the number of requests read so far)."""
    import json
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    seen = [0]
    body = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "base",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "Paris"}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    def serve():
        while True:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(rest) < length:
                    rest += conn.recv(65536)
                seen[0] += 1
                if seen[0] > drops:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], seen


@pytest.mark.parametrize("drops, answered", [(1, True), (2, True), (3, False)])
def test_vllm_asks_again_when_its_connection_is_dropped_before_an_answer(monkeypatch, drops, answered):
    import openai

    port, seen = _dropping_server(drops)
    engine = VLLMEngine("unused", VLLMOptions(enable_lora=False))
    engine.port = port
    engine._client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="k", max_retries=0, timeout=10)
    monkeypatch.setattr(engine, "running", lambda: True)
    if answered:
        assert engine.complete([{"role": "user", "content": "Capital of France?"}]).text == "Paris"
    else:
        with pytest.raises(EngineError, match="Connection error"):
            engine.complete([{"role": "user", "content": "Capital of France?"}])
    assert seen[0] == min(drops + 1, 3)  # the first and at most two more


def test_vllm_does_not_ask_again_after_a_timeout_or_once_its_process_is_gone(monkeypatch):
    import openai

    engine = VLLMEngine("unused", VLLMOptions(enable_lora=False))
    engine.port = 1
    engine._client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="k", max_retries=0)
    calls = []

    def create(error):
        def fail(**_):
            calls.append(error)
            raise error(request=httpx.Request("POST", engine.url))
        return fail

    monkeypatch.setattr(engine._client.chat.completions, "create", create(openai.APITimeoutError))
    monkeypatch.setattr(engine, "running", lambda: True)
    with pytest.raises(EngineError):
        engine.complete([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(engine._client.chat.completions, "create", create(openai.APIConnectionError))
    monkeypatch.setattr(engine, "running", lambda: False)  # vLLM died: the engine's monitor restarts it
    with pytest.raises(EngineError):
        engine.complete([{"role": "user", "content": "hi"}])
    assert calls == [openai.APITimeoutError, openai.APIConnectionError]


def test_vllm_listens_behind_its_own_key_and_its_reserved_arguments_are_refused():
    engine = VLLMEngine("unused")
    engine.port = 1234
    engine._key = "-Fw3" + engine._key  # token_urlsafe keys begin with "-" one time in 64
    command = engine.command()
    assert command[command.index("--host") + 1] == "127.0.0.1" and len(engine._key) > 20
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-key", nargs="+")  # as vLLM's parser takes it
    assert parser.parse_known_args(command)[0].api_key == [engine._key]
    with pytest.raises(ValueError, match="--host"):
        VLLMOptions(extra_args=["--host", "0.0.0.0"])


# -- observability ---------------------------------------------------------------------------------
def test_metrics_are_prometheus_text(start_ratchet):
    client = client_of(start_ratchet())
    assert chat(client).status_code == 200
    text = client.get("/metrics").text
    assert 'ratchet_http_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'ratchet_chats_total{adapter="base",model="ratchet"} 1.0' in text
    assert "ratchet_active_version 0.0" in text and "ratchet_corrections_pending" in text
