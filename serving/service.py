"""Ratchet composed: memory, agent, engine, registry and cycles, from one Settings."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

from agent import Agent, Reply
from memory import Memory
from serving.engines import Engine, EngineError, make_engine
from serving.engines.vllm import BASE_NAME
from serving.settings import Settings
from trainer.base_model import resolve_model
from trainer.cycle import Cycles
from trainer.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger("ratchet")

ACTIVE_NAME = "ratchet"  # the model name that means "the active adapter"


class UnknownModel(LookupError):
    pass


class Ratchet:
    def __init__(self, settings: Settings, engine: Engine | None = None):
        from langgraph.checkpoint.sqlite import SqliteSaver

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = resolve_model(settings.model, settings.models_dir)
        self.memory = Memory(settings.data_dir)
        self.registry = AdapterRegistry(self.memory.db, settings.data_dir / "adapters")
        self.engine = engine or make_engine(settings.engine, self.model_path, settings)
        self._threads_db = sqlite3.connect(str(settings.data_dir / "threads.db"), check_same_thread=False)
        checkpointer = SqliteSaver(self._threads_db)
        checkpointer.setup()
        self.agent = Agent(
            self.memory, self.engine, k=settings.memory_k, threshold=settings.memory_threshold,
            checkpointer=checkpointer,
        )
        self.cycles = Cycles(
            self.memory, self.registry, self.model_path, settings.cycle, settings.data_dir, on_promote=self.promote
        )
        self._swap = threading.Lock()
        self._stopped = False
        active = self.registry.active()
        self.active: str | None = active.name if active else None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        active = self.registry.active()
        if active is not None:
            self.engine.load_adapter(active.name, active.path)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.engine.stop()
        self.memory.close()
        self._threads_db.close()

    # -- models --------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [ACTIVE_NAME, BASE_NAME, *[v.name for v in self.registry.versions() if v.status == "promoted"]]

    def adapter_for(self, model: str | None) -> str | None:
        """The engine adapter that answers for `model`: 'ratchet', 'ratchet-base' or 'ratchet-vN'."""
        if model in (None, "", ACTIVE_NAME):
            return self.active
        if model == BASE_NAME:
            return None
        for v in self.registry.versions():
            if v.name == model and v.status == "promoted":
                self.engine.load_adapter(v.name, v.path)
                return v.name
        raise UnknownModel(model)

    # -- chat ----------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, model: str | None = None, **kwargs) -> Reply:
        adapter = self.adapter_for(model)
        kwargs.setdefault("max_tokens", self.settings.max_tokens)
        started = time.perf_counter()
        try:
            return self.agent.chat(messages, adapter=adapter, model_name=model or ACTIVE_NAME, **kwargs)
        except (EngineError, TimeoutError) as e:
            self._record_engine_failure(e, messages, model, adapter, kwargs, (time.perf_counter() - started) * 1000)
            raise

    def _record_engine_failure(self, error, messages, model, adapter, kwargs, latency_ms) -> None:
        """An answer that never came is a failure too (engine_error or timeout), listed with the rest."""
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        try:
            self.memory.record_engine_failure(error, prompt=prompt, user=kwargs.get("user"), model=model or ACTIVE_NAME,
                                              adapter=adapter, thread_id=kwargs.get("thread_id"), messages=messages,
                                              latency_ms=latency_ms)
        except Exception:
            log.exception("could not record the engine failure")

    # -- adapters ------------------------------------------------------------------------
    def promote(self, adapter: AdapterVersion) -> None:
        """Load `adapter` into the engine, then make it the active one (the switch is atomic)."""
        with self._swap:
            self.engine.load_adapter(adapter.name, adapter.path)
            self.registry.activate(adapter.version)
            previous, self.active = self.active, adapter.name
            # Keep the previous version loaded for a quick rollback; unload older ones.
            keep = {adapter.name, previous}
            for name in self.engine.adapters():
                if name not in keep:
                    try:
                        self.engine.unload_adapter(name)
                    except EngineError:
                        log.warning("could not unload %s", name, exc_info=True)
        log.info("promoted %s (was %s)", adapter.name, previous)
