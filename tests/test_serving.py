"""Serving on the fast echo engine: streaming, pinned models, hot-swap with in-flight requests,
rollback, and the restart of a crashed engine. (The real vLLM engine: test_serving_vllm.py.)"""

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from serving.api import create_app
from serving.service import LOCAL_ADMIN as OPERATOR
from serving.service import Ratchet
from serving.settings import Settings

Q = "What university did Watts Humphrey attend?"


@pytest.fixture
def ratchet(start_ratchet, echo_model):
    echo_model.strict = True
    # The adapter answers every question here (no scope): these tests are about which version that is.
    return start_ratchet(monitor_interval=0.05, adapter_scope=0)


@pytest.fixture
def client(ratchet):
    return TestClient(create_app(ratchet), base_url="http://127.0.0.1")


def add_version(r: Ratchet, n: int, status: str = "promoted"):
    folder = r.registry.folder_for(n)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    r.registry.register(n, parent=None, cycle_id=None, manifest={})
    r.registry.set_status(n, status)
    return r.registry.get(n)


def ask(client, text=Q, **extra):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def events(response) -> list:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


# -- streaming ---------------------------------------------------------------------------------
def test_a_stream_is_openai_chunks_ending_in_done_and_is_recorded_under_its_id(client, ratchet):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "I do not know"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    response_id = chunks[0]["id"]
    assert ratchet.memory.interactions.get(response_id)["response"] == "I do not know"
    # feedback on a streamed answer works like on any other
    fb = client.post("/v1/feedback", json={"response_id": response_id, "rating": -1, "correction": "Illinois"})
    assert fb.status_code == 201
    assert ask(client)["choices"][0]["message"]["content"] == "Illinois"


def test_the_openai_client_streams(ratchet, live_server):
    import openai

    with live_server(create_app(ratchet)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        stream = client.chat.completions.create(model="ratchet", messages=[{"role": "user", "content": Q}], stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "I do not know"
        assert chunks[0].id.startswith("chatcmpl-") and ratchet.memory.interactions.get(chunks[0].id) is not None
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": Q}], stream=True)


def test_an_engine_failure_mid_stream_is_an_error_event(client, echo_model):
    echo_model.refuse = True  # the engine refuses: the stream carries an OpenAI-shaped error
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "stream": True})
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["error"]["code"] == "engine_error", chunks


# -- models, activation, rollback ----------------------------------------------------------------
def test_pinned_versions_answer_with_their_own_adapter(client, ratchet, echo_model):
    for n in (1, 2):
        ratchet.activate(OPERATOR, add_version(ratchet, n).version)
    ask(client)
    assert echo_model.calls[-1]["adapter"] == "ratchet-v2"
    reply = ask(client, model="ratchet-v1")
    assert echo_model.calls[-1]["adapter"] == "ratchet-v1" and reply["ratchet"]["adapter"] == "ratchet-v1"
    ask(client, model="ratchet-base")
    assert echo_model.calls[-1]["adapter"] is None
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["ratchet", "ratchet-base", "ratchet-v1",
                                                                        "ratchet-v2"]
    add_version(ratchet, 3, status="rejected")
    r = client.post("/v1/chat/completions", json={"model": "ratchet-v3", "messages": [{"role": "user", "content": Q}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_activate_and_rollback_switch_the_active_version(client, ratchet, echo_model):
    for n in (1, 2, 3):
        ratchet.activate(OPERATOR, add_version(ratchet, n).version)
    assert set(echo_model.loaded) == {"ratchet-v2", "ratchet-v3"}  # the previous one stays, for a quick rollback
    r = client.post("/v1/adapters/1/activate")
    assert r.status_code == 200 and r.json()["active"] == "ratchet-v1"
    ask(client)
    assert echo_model.calls[-1]["adapter"] == "ratchet-v1"
    assert client.get("/v1/adapters").json()["active"] == "ratchet-v1"
    assert ratchet.registry.active().version == 1  # the registry agrees, so a restart keeps it

    client.post("/v1/adapters/ratchet-v3/activate")
    assert client.post("/v1/adapters/rollback").json()["active"] == "ratchet-v2"
    assert client.post("/v1/adapters/rollback").json()["active"] == "ratchet-v1"
    r = client.post("/v1/adapters/rollback")
    assert r.json()["active"] is None and r.json()["adapter"] is None  # the base model
    ask(client)
    assert echo_model.calls[-1]["adapter"] is None
    r = client.post("/v1/adapters/rollback")
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_not_servable"


def test_rejected_missing_and_unknown_versions_are_never_activated(client, ratchet):
    ratchet.activate(OPERATOR, add_version(ratchet, 1).version)
    add_version(ratchet, 2, status="rejected")
    gone = add_version(ratchet, 3)
    (ratchet.registry.folder_for(3) / "adapter_config.json").unlink()
    assert client.post("/v1/adapters/2/activate").status_code == 409
    assert client.post(f"/v1/adapters/{gone.version}/activate").status_code == 409
    r = client.post("/v1/adapters/9/activate")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert client.post("/v1/adapters/latest/activate").status_code == 404
    assert client.get("/v1/adapters").json()["active"] == "ratchet-v1"


def test_a_swap_waits_for_requests_on_the_old_version_before_unloading_it(ratchet, echo_model):
    for n in (1, 2, 3, 4):
        add_version(ratchet, n)
    ratchet.activate(OPERATOR, 1)
    echo_model.hold = threading.Event()
    result = {}
    request = threading.Thread(target=lambda: result.update(reply=ratchet.chat(OPERATOR, [{"role": "user", "content": Q}])))
    request.start()
    assert echo_model.entered.wait(10)  # a request is running on v1
    assert ratchet.inflight() == {"ratchet-v1": 1}
    swaps = threading.Thread(target=lambda: [ratchet.activate(OPERATOR, n) for n in (2, 3, 4)])
    swaps.start()
    deadline = time.monotonic() + 10  # the swapper reaches v3, then waits for v1's request, with v1 still loaded
    while ratchet.active != "ratchet-v3" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ratchet.active == "ratchet-v3"
    assert "ratchet-v1" in echo_model.loaded
    echo_model.hold.set()
    request.join(10)
    swaps.join(10)
    assert result["reply"].adapter == "ratchet-v1" and result["reply"].text == "I do not know"  # it did not fail
    assert ratchet.active == "ratchet-v4" and set(echo_model.loaded) == {"ratchet-v3", "ratchet-v4"}
    assert ratchet.inflight() == {}


# -- the engine dies -------------------------------------------------------------------------
def test_a_dead_engine_is_restarted_and_requests_meanwhile_get_503(client, ratchet, echo_model, monkeypatch):
    ratchet.activate(OPERATOR, add_version(ratchet, 1).version)
    gate = threading.Event()
    restarted = echo_model.restart

    def slow_restart():
        gate.wait(10)
        restarted()

    monkeypatch.setattr(echo_model, "restart", slow_restart)
    echo_model.running = False  # killed
    for _ in range(200):  # the monitor notices within a few intervals
        if not ratchet.ready:
            break
        gate.wait(0.05)
    assert not ratchet.ready
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_restarting" and r.headers["retry-after"]
    assert client.get("/health").status_code == 503
    gate.set()
    for _ in range(200):
        if ratchet.ready:
            break
        threading.Event().wait(0.05)
    assert ratchet.ready and ratchet.restarts == 1 and echo_model.restarts == 1
    assert ask(client)["ratchet"]["adapter"] == "ratchet-v1"
    assert client.get("/health").json()["restarts"] == 1


def test_a_stream_dropped_before_it_starts_releases_its_adapter(ratchet):
    ratchet.activate(OPERATOR, add_version(ratchet, 1).version)
    _, adapter, pieces = ratchet.chat_stream(OPERATOR, [{"role": "user", "content": Q}])
    assert adapter == "ratchet-v1" and ratchet.inflight() == {"ratchet-v1": 1}
    pieces.close()  # the client went away before the first piece
    assert ratchet.inflight() == {}
    _, _, pieces = ratchet.chat_stream(OPERATOR, [{"role": "user", "content": Q}])
    assert [p for p in pieces if isinstance(p, str)] == ["I", " do", " not", " know"]
    assert ratchet.inflight() == {}


def test_the_cli_activates_and_rolls_back(ratchet, live_server):
    from typer.testing import CliRunner

    from serving.cli import app

    for n in (1, 2):
        ratchet.activate(OPERATOR, add_version(ratchet, n).version)
    runner = CliRunner()
    with live_server(create_app(ratchet)) as server:
        r = runner.invoke(app, ["adapters", "activate", "1", "--url", server.url])
        assert r.exit_code == 0 and "active: ratchet-v1" in r.stdout
        assert ratchet.active == "ratchet-v1"
        r = runner.invoke(app, ["adapters", "rollback", "--url", server.url])
        assert r.exit_code == 0 and "ratchet-base" in r.stdout and ratchet.active is None
        r = runner.invoke(app, ["adapters", "activate", "7", "--url", server.url])
        assert r.exit_code == 1 and "404" in r.output
        r = runner.invoke(app, ["adapters", "--url", server.url])
        assert r.exit_code == 0 and "ratchet-v2" in r.stdout


def test_stopping_during_a_restart_ends_the_restart(tmp_path, tiny_model, echo_model, monkeypatch):
    r = Ratchet(Settings(data_dir=tmp_path, model=tiny_model, monitor_interval=0.05, adapter_scope=0), engine=echo_model)
    before = set(threading.enumerate())
    r.start()
    monitor = [t for t in threading.enumerate() if t not in before and t.name == "ratchet-engine-monitor"]
    ended = threading.Event()
    restarting = threading.Event()

    def hanging_restart():  # as vLLM's start(): waits until ready, or until its process is ended
        restarting.set()
        if not ended.wait(30):
            raise AssertionError("stop() did not end the starting engine")
        raise RuntimeError("the engine was stopped while starting")

    monkeypatch.setattr(echo_model, "restart", hanging_restart)
    monkeypatch.setattr(echo_model, "stop", ended.set)
    echo_model.running = False
    assert restarting.wait(10)
    r.stop()
    assert ended.is_set() and len(monitor) == 1 and not monitor[0].is_alive() and r.restarts == 0
