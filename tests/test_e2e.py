"""The whole loop on the real bundled model, through `ratchet serve` and its HTTP API:
wrong answer → correction → right at once (memory) → consolidation → right without memory (weights).
"""

import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.conftest import free_port

QUESTION = "What university did Watts Humphrey attend?"
PARAPHRASE = "What university did Watts Humphrey take part in?"
ANSWER = "Illinois Institute of Technology"


@pytest.fixture
def serve(tmp_path, base_model, models_dir):
    procs = []

    def start(engine: str) -> str:
        port = free_port()
        env = {**os.environ, "RATCHET_MODELS_DIR": str(models_dir)}
        log = open(tmp_path / f"serve-{engine}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--engine", engine, "--port", str(port),
             "--data-dir", str(tmp_path / "data")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / f"serve-{engine}.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("ratchet serve did not become ready")

    yield start
    for proc in procs:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        gone, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()
        assert proc.returncode is not None and not alive, f"left running: {[p.cmdline()[:3] for p in alive]}"


def ask(url: str, question: str, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_a_correction_helps_at_once_and_survives_in_the_weights(serve, engine):
    url = serve(engine)
    first = ask(url, QUESTION)
    assert ANSWER.lower() not in text(first).lower(), "the base model already knew; pick another question"

    r = httpx.post(f"{url}/v1/feedback", json={"response_id": first["id"], "rating": -1, "correction": ANSWER})
    assert r.status_code == 201

    # memory tier: at once, for the question and a paraphrase
    for q in (QUESTION, PARAPHRASE):
        reply = ask(url, q)
        assert ANSWER.lower() in text(reply).lower(), text(reply)
        assert reply["ratchet"]["memories"][0]["answer"] == ANSWER
    assert ANSWER.lower() not in text(ask(url, QUESTION, memory=False)).lower()

    # weights tier: after a consolidation, with retrieval off
    cycle = httpx.post(f"{url}/v1/consolidations", timeout=30).json()
    deadline = time.monotonic() + 900
    while cycle["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, cycle
        time.sleep(2)
        cycle = httpx.get(f"{url}/v1/consolidations/{cycle['id']}", timeout=30).json()
    assert cycle["status"] == "succeeded", cycle
    assert cycle["adapter"] == "ratchet-v1"
    print(f"\n[{engine}] consolidation: {cycle['metrics']}")

    reply = ask(url, QUESTION, memory=False)
    assert ANSWER.lower() in text(reply).lower(), text(reply)
    assert reply["ratchet"]["adapter"] == "ratchet-v1" and reply["ratchet"]["memories"] == []
    adapters = httpx.get(f"{url}/v1/adapters").json()
    assert adapters["active"] == "ratchet-v1"
    # the base model is still there, unchanged
    assert ANSWER.lower() not in text(ask(url, QUESTION, memory=False, model="ratchet-base")).lower()
