"""Ratchet composed: memory, agent, engine, registry and cycles, from one Settings."""

from __future__ import annotations

import logging
import sqlite3
import threading

from agent import Agent, Reply
from memory import Memory
from serving.engines import Engine, EngineError, make_engine
from serving.engines.vllm import BASE_NAME
from serving.settings import Settings
from trainer.base_model import resolve_model
from trainer.cycle import Cycles
from trainer.registry import AdapterRegistry, AdapterVersion
from trainer.schedule import Schedule

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
        self.schedule = Schedule(self.cycles, settings.schedule)
        self._swap = threading.Lock()
        self._stopped = False
        self._tokenizer = None
        active = self.registry.active()
        self.active: str | None = active.name if active else None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        active = self.registry.active()
        if active is not None:
            self.engine.load_adapter(active.name, active.path)
        self.schedule.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.schedule.stop()
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
        return self.agent.chat(messages, adapter=adapter, model_name=model or ACTIVE_NAME, **kwargs)

    def feedback(self, response_id: str, rating: int, *, comment=None, correction=None, user=None) -> int:
        """Record feedback (committed when this returns); a correction may trigger a cycle."""
        feedback_id = self.memory.record_feedback(response_id, rating, comment=comment, correction=correction,
                                                  user=user)
        if correction:
            self.schedule.on_correction()
        return feedback_id

    def agreement(self, messages: list[dict], completion: str, *, model: str | None = None) -> tuple[int, int]:
        """(matched, total): how many of `completion`'s tokens the model predicts as its top
        token when teacher-forced after `messages` (token-level locality, as editing benchmarks
        compute it)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        prompt_ids = list(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"])
        answer_ids = self._tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            return 0, 0
        return self.engine.agreement(prompt_ids, answer_ids, adapter=self.adapter_for(model)), len(answer_ids)

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
