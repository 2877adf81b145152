"""API keys: open on loopback without keys; with keys, Bearer tokens, roles and user binding."""

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from serving.api import create_app
from serving.auth import ApiKeys, digest
from serving.cli import app as cli

Q = "What university did Watts Humphrey attend?"
runner = CliRunner()


@pytest.fixture
def ratchet(start_ratchet):
    return start_ratchet()


@pytest.fixture
def client(ratchet):
    return TestClient(create_app(ratchet), base_url="http://127.0.0.1")


def chat(client, token=None, **extra):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.post("/v1/chat/completions", headers=headers,
                       json={"messages": [{"role": "user", "content": Q}], **extra})


def test_without_keys_everything_is_open_and_the_body_names_the_user(client, ratchet):
    r = chat(client, user="ann")
    assert r.status_code == 200
    assert ratchet.memory.interactions.get(r.json()["id"])["user"] == "ann"
    assert client.get("/v1/adapters").status_code == 200
    assert client.get("/health").json()["auth"] is False


def test_keys_are_stored_hashed_and_shown_once(ratchet):
    key, token = ratchet.keys.create("ann")
    assert token.startswith("rk-") and len(token) > 40
    row = ratchet.memory.db["api_keys"].get(key.id)
    assert row["hash"] == digest(token) and token not in str(row.values())
    assert ratchet.keys.verify(token).user == "ann" and ratchet.keys.verify(token + "x") is None
    with pytest.raises(ValueError):
        ratchet.keys.create("ann", role="root")


def test_missing_wrong_and_revoked_keys_get_401(client, ratchet):
    key, token = ratchet.keys.create("ann")
    for r in (chat(client), chat(client, token="rk-wrong"), client.get("/v1/models"),
              client.get("/v1/models", headers={"Authorization": token})):  # no "Bearer"
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert chat(client).json()["error"]["code"] == "missing_api_key"
    assert chat(client, token="rk-wrong").json()["error"]["code"] == "invalid_api_key"
    assert chat(client, token=token).status_code == 200
    other, other_token = ratchet.keys.create("bob")
    ratchet.keys.revoke(key.id)
    r = chat(client, token=token)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert chat(client, token=other_token).status_code == 200
    assert client.get("/health").status_code == 200  # health stays open


def test_a_user_key_is_refused_admin_routes_and_an_admin_key_is_not(client, ratchet):
    _, user_token = ratchet.keys.create("ann")
    _, admin_token = ratchet.keys.create("root", role="admin")
    for method, path in (("get", "/v1/adapters"), ("post", "/v1/adapters/rollback"), ("post", "/v1/adapters/1/activate"),
                         ("post", "/v1/consolidations"), ("get", "/v1/consolidations"), ("get", "/v1/consolidations/1")):
        r = getattr(client, method)(path, headers={"Authorization": f"Bearer {user_token}"})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "admin_required"
        assert getattr(client, method)(path).status_code == 401
    assert client.get("/v1/adapters", headers={"Authorization": f"Bearer {admin_token}"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {user_token}"}).status_code == 200


def test_a_keys_user_overrides_the_body_and_owns_the_feedback(client, ratchet):
    _, ann = ratchet.keys.create("ann")
    _, bob = ratchet.keys.create("bob")
    r = chat(client, token=ann, user="bob")  # ann cannot speak for bob
    assert ratchet.memory.interactions.get(r.json()["id"])["user"] == "ann"
    headers = {"Authorization": f"Bearer {bob}"}
    fb = client.post("/v1/feedback", headers=headers, json={"response_id": r.json()["id"], "rating": -1,
                                                             "correction": "Illinois"})
    assert fb.status_code == 404  # bob cannot correct ann's answers (nor learn that they exist)
    fb = client.post("/v1/feedback", headers={"Authorization": f"Bearer {ann}"},
                     json={"response_id": r.json()["id"], "rating": -1, "correction": "Illinois", "user": "bob"})
    assert fb.status_code == 201
    # the correction is ann's: retrieved for her, not for bob, whatever the body says
    assert chat(client, token=ann).json()["choices"][0]["message"]["content"] == "Illinois"
    assert chat(client, token=bob, user="ann").json()["choices"][0]["message"]["content"] == "I do not know"


def test_a_public_server_whose_keys_are_all_revoked_stays_closed(client, ratchet):
    key, token = ratchet.keys.create("ann")
    ratchet.settings.host = "0.0.0.0"  # started with keys on a public address
    ratchet.keys.revoke(key.id)
    assert chat(client, token=token).status_code == 401 and chat(client).status_code == 401
    ratchet.settings.host = "127.0.0.1"  # on loopback, no live key means open
    assert chat(client).status_code == 200


def test_the_official_openai_client_sends_its_key(ratchet, live_server):
    import openai

    _, token = ratchet.keys.create("ann")
    with live_server(create_app(ratchet)) as server:
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token)
        assert good.chat.completions.create(model="ratchet", messages=[{"role": "user", "content": Q}]).id
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="rk-nope").models.list()


def test_the_keys_cli_creates_lists_and_revokes(tmp_path):
    data = ["--data-dir", str(tmp_path)]
    r = runner.invoke(cli, ["keys", "list", *data])
    assert r.exit_code == 0 and "no API keys" in r.stdout
    r = runner.invoke(cli, ["keys", "create", "--user", "ann", *data])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip()
    assert token.startswith("rk-")
    r = runner.invoke(cli, ["keys", "create", "--user", "root", "--admin", *data])
    assert r.exit_code == 0
    listing = runner.invoke(cli, ["keys", "list", *data]).stdout
    assert "ann" in listing and "admin" in listing and token not in listing
    assert runner.invoke(cli, ["keys", "revoke", "1", *data]).exit_code == 0
    assert runner.invoke(cli, ["keys", "revoke", "7", *data]).exit_code == 1
    from memory.db import open_db

    keys = ApiKeys(open_db(tmp_path / "ratchet.db"))
    assert keys.verify(token) is None and [k.live for k in keys.list()] == [False, True]


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    r = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no API keys" in r.output
