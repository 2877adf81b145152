"""Shared fixtures: the embedded model (prepared once per run), the embedder, a tiny model and
a fake chat model for fast tests, and a real server on a free loopback port."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from evals.server import free_port
from serving.engines import Capabilities

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
from evals.zsre_data import ZSRE  # noqa: E402  (../shared/data/zsre/dev.jsonl, or RATCHET_ZSRE)


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return Path(os.environ.get("RATCHET_MODELS_DIR", ROOT / ".cache" / "models"))


@pytest.fixture(scope="session")
def base_model(models_dir) -> str:
    """The embedded SmolLM2-135M-Instruct as a float32 safetensors folder."""
    from trainer.base_model import prepare_embedded

    return str(prepare_embedded(models_dir))


@pytest.fixture(scope="session")
def embedder():
    from memory.embed import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def tiny_model(base_model, tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer: trains in a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class EchoModel:
    """A chat model that answers with the memories it was shown, or 'I do not know'."""

    name = "echo"
    capabilities = Capabilities()

    def __init__(self):
        self.calls: list[dict] = []
        self.loaded: dict[str, str] = {}
        self.running = True
        self.restarts = 0
        self.preparing = None  # the candidate it was told of (prepare)
        self.hold: threading.Event | None = None  # when set up, each answer waits for it
        self.entered = threading.Event()  # set when an answer starts
        self.strict = False  # True: an adapter that is not loaded fails the request, as in a real engine
        self.refuse = False  # True: alive, but every answer fails (an engine error, not a dead engine)
        self.taught: dict[str, str] = {}  # adapter → what it answers, whatever it is asked

    def complete(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        from agent.protocol import Completion
        from serving.engines import EngineError

        if not self.running:
            raise EngineError("the echo engine is down")
        if self.refuse:
            raise EngineError("the echo engine refuses")
        self.calls.append({"messages": messages, "adapter": adapter})
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(30)
        if self.strict and adapter is not None and adapter not in self.loaded:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        shots = [m["content"] for m in messages[:-1] if m["role"] == "assistant"]
        text = self.taught.get(adapter) or (shots[-1] if shots else "I do not know")
        return Completion(text=text, prompt_tokens=len(messages), completion_tokens=len(text.split()))

    def stream(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        c = self.complete(messages, adapter=adapter, max_tokens=max_tokens, temperature=temperature)
        words = c.text.split(" ")
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word
        yield c

    # the engine's side
    def start(self):
        self.running = True

    def stop(self):
        self.running = False

    def alive(self):
        return self.running

    def healthy(self):
        return self.running

    def restart(self):
        self.restarts += 1
        self.running = True

    def load_adapter(self, name, path):
        self.loaded[name] = path

    def unload_adapter(self, name):
        self.loaded.pop(name, None)

    def adapters(self):
        return list(self.loaded)

    def follow(self, adapter, path):
        self.following = adapter

    def prepare(self, adapter, path):
        self.preparing = adapter

    def status(self):
        return {}

    def agreement(self, prompt_ids, answer_ids, adapter=None):
        return len(answer_ids) if adapter is None else 0


@pytest.fixture
def echo_model() -> EchoModel:
    return EchoModel()


@pytest.fixture
def memory(tmp_path, embedder):
    from memory import Memory

    m = Memory(tmp_path / "data", embedder=embedder)
    yield m
    m.close()


class LiveServer:
    """The real app under uvicorn on a loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def live_server():
    return LiveServer


@pytest.fixture
def start_ratchet(tmp_path, tiny_model, echo_model):
    """Start a Ratchet on the echo model in this test's folder: `start_ratchet(**settings)`; the
    test's client is `TestClient(create_app(r), base_url="http://127.0.0.1")`. Everything started is stopped afterwards."""
    from serving.service import Ratchet
    from serving.settings import Settings

    started = []

    def start(**settings):
        r = Ratchet(Settings(data_dir=tmp_path, model=tiny_model, **settings), engine=echo_model)
        r.start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()
