"""Memories and failures over HTTP and the CLI, on the fast echo model."""

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from serving.api import create_app
from serving.cli import app as cli
from serving.engines import EngineError
from serving.service import Ratchet
from serving.settings import Settings

Q = "What university did Watts Humphrey attend?"
PARAPHRASE = "What university did Watts Humphrey take part in?"
LOOPBACK = ("127.0.0.1", 50000)


class FlakyEcho:
    """The echo model, but the next call can be made to fail."""

    def __init__(self, echo):
        self.echo, self.fail_with = echo, None
        self.name = "flaky"

    def complete(self, messages, **kw):
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return self.echo.complete(messages, **kw)

    def __getattr__(self, name):
        return getattr(self.echo, name)


@pytest.fixture
def engine(echo_model):
    return FlakyEcho(echo_model)


@pytest.fixture
def ratchet(tmp_path, tiny_model, engine, embedder, monkeypatch):
    import memory.store

    monkeypatch.setattr(memory.store, "Embedder", lambda **kw: embedder)  # the session's, not a new one
    r = Ratchet(Settings(data_dir=tmp_path, model=tiny_model, engine="transformers"), engine=engine)
    r.start()
    yield r
    r.stop()


@pytest.fixture
def client(ratchet):
    return TestClient(create_app(ratchet), base_url="http://127.0.0.1", client=LOOPBACK)


@pytest.fixture
def keyed(ratchet):
    """Clients that speak with an API key (once a key exists, the server needs one from everyone)."""

    def make(user: str, admin: bool = False) -> TestClient:
        _, token = ratchet.keys.create(user, "admin" if admin else "user")
        return TestClient(create_app(ratchet), base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {token}"})

    return make


def ask(client, text, **extra):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r.json()


def correct(client, user, answer="Illinois Institute of Technology"):
    rid = ask(client, Q, user=user)["id"]
    assert client.post("/v1/feedback", json={"response_id": rid, "rating": -1, "correction": answer}).status_code == 201


def test_memories_are_searched_within_what_the_caller_may_see(client):
    correct(client, "ann")
    found = client.get("/v1/memories", params={"query": PARAPHRASE, "user": "ann"}).json()["data"]
    assert [(m["answer"], m["user"], m["shared"]) for m in found] == [("Illinois Institute of Technology", "ann", False)]
    assert found[0]["score"] > 0.9
    assert client.get("/v1/memories", params={"query": PARAPHRASE, "user": "bob"}).json()["data"] == []
    assert client.get("/v1/memories", params={"query": PARAPHRASE}).json()["data"] == []  # `local`
    assert [m["id"] for m in client.get("/v1/memories", params={"user": "ann"}).json()["data"]] == [found[0]["id"]]
    r = client.get(f"/v1/memories/{found[0]['id']}", params={"user": "bob"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "memory_not_found"


def test_a_user_retracts_their_own_correction_and_it_is_gone_at_once(keyed):
    ann, bob = keyed("ann"), keyed("bob")
    correct(ann, "ann")
    memory_id = ann.get("/v1/memories").json()["data"][0]["id"]
    r = bob.delete(f"/v1/memories/{memory_id}")
    assert r.status_code == 404  # another user's memory does not exist for bob
    r = ann.delete(f"/v1/memories/{memory_id}")
    assert r.status_code == 200 and r.json()["deleted"] is True and r.json()["retracted_at"]
    assert ask(ann, Q)["choices"][0]["message"]["content"] == "I do not know"
    assert ann.get("/v1/memories", params={"query": Q}).json()["data"] == []


def test_retracted_memories_are_listed_when_asked_for_and_only_the_callers(keyed):
    ann, bob = keyed("ann"), keyed("bob")
    kept = ann.post("/v1/memories", json={"question": "What is the capital of Peru?", "answer": "Lima"}).json()
    gone = ann.post("/v1/memories", json={"question": Q, "answer": "IIT"}).json()
    bobs = bob.post("/v1/memories", json={"question": Q, "answer": "Harvard"}).json()
    assert ann.delete(f"/v1/memories/{gone['id']}").status_code == 200
    assert bob.delete(f"/v1/memories/{bobs['id']}").status_code == 200

    def listed(client, **params):
        return [(m["id"], m["state"]) for m in client.get("/v1/memories", params=params).json()["data"]]

    assert listed(ann) == [(kept["id"], "memory")]  # live ones by default, as before
    assert listed(ann, state="retracted") == [(gone["id"], "retracted")]
    assert listed(ann, state="all") == [(gone["id"], "retracted"), (kept["id"], "memory")]
    assert listed(bob, state="retracted") == [(bobs["id"], "retracted")]
    assert listed(bob, user="ann", state="all") == [(bobs["id"], "retracted")]  # a user key sees only its own
    ops = keyed("ops", admin=True)
    assert listed(ops, user="ann", state="all") == listed(ann, state="all")  # an admin, as ann sees them
    found = ops.get("/v1/memories", params={"user": "ann", "query": "What is the capital of Peru?"}).json()["data"]
    assert [m["id"] for m in found] == [kept["id"]]
    r = ann.get("/v1/memories", params={"state": "gone"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "state"
    r = ann.get("/v1/memories", params={"state": "retracted", "query": Q})  # retrieval never finds them
    assert r.status_code == 400 and r.json()["error"]["param"] == "state"


def test_shared_memories_need_an_admin_to_add_and_retract(keyed):
    zoe, admin = keyed("zoe"), keyed("ops", admin=True)
    r = zoe.post("/v1/memories", json={"question": Q, "answer": "IIT", "shared": True})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = admin.post("/v1/memories", json={"question": Q, "answer": "IIT", "shared": True})
    assert r.status_code == 201 and r.json()["shared"] is True
    shared_id = r.json()["id"]
    assert ask(zoe, PARAPHRASE)["choices"][0]["message"]["content"] == "IIT"
    r = zoe.delete(f"/v1/memories/{shared_id}")
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_allowed"
    assert admin.delete(f"/v1/memories/{shared_id}").status_code == 200
    assert ask(zoe, PARAPHRASE)["choices"][0]["message"]["content"] == "I do not know"


def test_abstentions_and_repeats_are_failures_that_become_lessons(client, ratchet, keyed):
    first = ask(client, Q, user="ann")  # the echo model says "I do not know"
    ask(client, PARAPHRASE, user="ann")  # ... and ann asks again at once
    failures = client.get("/v1/failures").json()["data"]
    kinds = sorted((f["kind"], f["response_id"] == first["id"]) for f in failures)
    assert kinds == [("abstention", False), ("abstention", True), ("repeat", True)]
    repeat = next(f for f in failures if f["kind"] == "repeat")
    assert repeat["prompt"] == Q and repeat["user"] == "ann"
    r = client.post(f"/v1/failures/{repeat['id']}/lesson", json={"answer": "Illinois Institute of Technology"})
    assert r.status_code == 201 and r.json()["memory"]["user"] == "ann" and r.json()["failure"]["lesson_id"]
    assert ask(client, PARAPHRASE, user="ann")["choices"][0]["message"]["content"] == "Illinois Institute of Technology"
    assert ask(client, PARAPHRASE, user="bob")["choices"][0]["message"]["content"] == "I do not know"
    still_open = client.get("/v1/failures", params={"open": True, "kind": "repeat"}).json()["data"]
    assert repeat["id"] not in [f["id"] for f in still_open]  # (ann asked the paraphrase twice: a new repeat)
    assert client.get("/v1/failures", params={"kind": "nonsense"}).status_code == 400
    assert client.get("/v1/failures/999").json()["error"]["code"] == "failure_not_found"
    assert keyed("ann").get("/v1/failures").status_code == 403  # failures are for admins


def test_asking_again_after_correcting_the_answer_is_not_a_repeat(client):
    first = ask(client, Q, user="ann")
    r = client.post("/v1/feedback", json={"response_id": first["id"], "rating": -1, "user": "ann",
                                          "correction": "Illinois Institute of Technology"})
    assert r.status_code == 201
    again = ask(client, Q, user="ann")  # the console's "Ask again": the corrected answer, from memory
    assert again["choices"][0]["message"]["content"] == "Illinois Institute of Technology"
    assert client.get("/v1/failures", params={"kind": "repeat"}).json()["data"] == []
    rated = ask(client, "Who wrote Hamlet?", user="ann")  # only thumbs down, no correction: still a repeat
    assert client.post("/v1/feedback", json={"response_id": rated["id"], "rating": -1, "user": "ann"}).status_code == 201
    ask(client, "Who wrote Hamlet?", user="ann")
    repeats = client.get("/v1/failures", params={"kind": "repeat"}).json()["data"]
    assert [f["response_id"] for f in repeats] == [rated["id"]]


def test_engine_errors_and_timeouts_are_recorded_as_failures(client, engine):
    engine.fail_with = EngineError("the engine crashed")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "user": "ann"})
    assert r.status_code == 503
    engine.fail_with = EngineError("request timed out after 600 s")
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}]}).status_code == 503
    failures = client.get("/v1/failures").json()["data"]
    assert [(f["kind"], f["prompt"]) for f in failures] == [("timeout", Q), ("engine_error", Q)]
    assert failures[1]["user"] == "ann" and "crashed" in failures[1]["detail"]


def test_an_answer_that_contradicts_an_active_correction_is_a_failure(client, ratchet):
    ratchet.memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    ask(client, Q, user="ann", memory=False)  # "I do not know": an abstention, not a contradiction
    from agent.protocol import Completion

    ratchet.engine.echo.complete = lambda messages, **kw: Completion("Harvard University", 1, 2)
    reply = ask(client, Q, user="bob")  # bob has no correction: nothing to contradict
    reply = ask(client, "What university did Watts Humphrey go to?", user="ann", memory=False)
    contradictions = client.get("/v1/failures", params={"kind": "contradiction"}).json()["data"]
    assert [f["response_id"] for f in contradictions] == [reply["id"]]
    assert "Illinois Institute of Technology" in contradictions[0]["detail"]


def test_the_memory_cli(client, ratchet, live_server, tmp_path):
    runner = CliRunner(env={"COLUMNS": "200"})
    correct(client, "ann")
    ask(client, "Which family does Ramalinaceae belong to?", user="bob")
    with live_server(create_app(ratchet)) as server:
        url = ["--url", server.url]
        r = runner.invoke(cli, ["memory", "search", PARAPHRASE, "--user", "ann", *url])
        assert r.exit_code == 0 and "Illinois Institute of Technology" in r.stdout, r.output
        memory_id = ratchet.memory.corrections.visible("ann")[0].id
        assert f"│ {memory_id} " in r.stdout
        r = runner.invoke(cli, ["memory", "search", PARAPHRASE, "--user", "bob", *url])
        assert "nothing in memory" in r.stdout
        r = runner.invoke(cli, ["memory", "failures", "--kind", "abstention", *url])
        assert r.exit_code == 0 and "Ramalinaceae" in r.stdout
        failure_id = ratchet.memory.failures.list(kind="abstention", user="bob")[0]["id"]
        r = runner.invoke(cli, ["memory", "lesson", str(failure_id), "Lecanorales", *url])
        assert r.exit_code == 0 and "Lecanorales" in r.stdout
        r = runner.invoke(cli, ["memory", "retract", str(memory_id), "--user", "ann", *url])
        assert r.exit_code == 0 and "retracted" in r.stdout
        assert ratchet.memory.search(Q, "ann") == []
        r = runner.invoke(cli, ["memory", "rebuild-index", *url])
        assert r.exit_code == 0 and "index rebuilt: 1 memories" in r.stdout
        r = runner.invoke(cli, ["memory", "retract", "999", *url])
        assert r.exit_code == 1 and "404" in r.output


def test_the_index_is_rebuilt_offline_after_its_files_are_deleted(tmp_path, embedder, monkeypatch):
    import shutil

    import memory.store
    from memory import Memory

    m = Memory(tmp_path, embedder=embedder)
    m.add_correction(Q, "Illinois Institute of Technology", user="ann")
    m.add_correction("Which family does Ramalinaceae belong to?", "Lecanorales", user=None)
    m.close()
    shutil.rmtree(tmp_path / "index")
    monkeypatch.setattr(memory.store, "Embedder", lambda **kw: embedder)
    r = CliRunner().invoke(cli, ["memory", "rebuild-index", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and "index rebuilt: 2 memories in 2 scope(s)" in r.stdout, r.output
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "index").glob("*.faiss")) == ["shared.faiss", "user"]
