"""Ratchet composed: memory, agent, engine, registry and cycles, from one Settings.

Adapters go live without a failed request: a new version is loaded under its own name, the
active pointer is switched under a lock, requests already running on the old version finish
(each request holds its adapter for as long as it runs), and only then is the old one unloaded.
A monitor thread restarts a crashed engine; requests meanwhile get a 503 at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator

from agent import Agent, Reply
from agent.graph import new_response_id
from memory import Memory
from serving.auth import ApiKeys
from serving.engines import Engine, EngineError, make_engine
from serving.engines.vllm import BASE_NAME
from serving.settings import Settings
from trainer.base_model import resolve_model
from trainer.cycle import Cycles
from trainer.registry import AdapterRegistry, AdapterVersion
from trainer.schedule import Schedule

log = logging.getLogger("ratchet")

ACTIVE_NAME = "ratchet"  # the model name that means "the active adapter"
SERVABLE = ("promoted", "candidate")  # statuses an admin may activate; a rejected version never is


class UnknownModel(LookupError):
    pass


class UnknownAdapter(LookupError):
    pass


class NotServable(ValueError):
    """The version exists but may not be served (rejected, or its folder is gone)."""


class EngineUnavailable(EngineError):
    """The engine is restarting; the request may be retried shortly."""


class Ratchet:
    def __init__(self, settings: Settings, engine: Engine | None = None):
        from langgraph.checkpoint.sqlite import SqliteSaver

        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.model_path = resolve_model(settings.model, settings.models_dir)
        self.memory = Memory(settings.data_dir)
        self.registry = AdapterRegistry(self.memory.db, settings.data_dir / "adapters")
        self.keys = ApiKeys(self.memory.db)
        self.engine = engine or make_engine(settings.engine, self.model_path, settings)
        self._threads_db = sqlite3.connect(str(settings.data_dir / "threads.db"), check_same_thread=False)
        checkpointer = SqliteSaver(self._threads_db)
        checkpointer.setup()
        self.agent = Agent(
            self.memory, self.engine, k=settings.memory_k, threshold=settings.memory_threshold,
            scope=settings.adapter_scope or None, checkpointer=checkpointer,
        )
        self.cycles = Cycles(
            self.memory, self.registry, self.model_path, settings.cycle, settings.data_dir, on_promote=self.promote,
            admits=self.trusted,
        )
        self.schedule = Schedule(self.cycles, settings.schedule)
        self._tokenizer = None
        self._swap = threading.RLock()  # one adapter change (load, switch, drain, unload) at a time
        self._inflight: collections.Counter = collections.Counter()  # running requests per adapter (None: base)
        self._changed = threading.Condition()  # guards `active` and `_inflight`
        self._stopped = threading.Event()
        self._ready = threading.Event()  # the engine answers; cleared while it restarts
        self._monitor: threading.Thread | None = None
        self.restarts = 0
        self.last_switch: dict = {}
        active = self.registry.active()
        self.active: str | None = active.name if active else None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        active = self.registry.active()
        if active is not None:
            self.engine.load_adapter(active.name, active.path)
        self._follow(active)
        self._ready.set()
        if self.settings.monitor_interval > 0:
            # Also the thread that restarts the engine: it lives as long as the server, as the
            # engine's PR_SET_PDEATHSIG (tied to the spawning thread) needs.
            self._monitor = threading.Thread(target=self._watch, name="ratchet-engine-monitor", daemon=True)
            self._monitor.start()
        self.schedule.start()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.schedule.stop()
        self._ready.clear()
        self.engine.stop()  # first: a restart under way in the monitor then fails at once
        if self._monitor is not None:
            self._monitor.join(timeout=60)
        self.engine.stop()
        self.memory.close()
        self._threads_db.close()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.settings.monitor_interval):
            alive = getattr(self.engine, "alive", None)
            if alive is None or alive():
                continue
            self.restart_engine()

    def restart_engine(self) -> None:
        """The engine died: start it again with the adapters it had; 503s meanwhile."""
        self._ready.clear()
        log.error("the %s engine died; restarting it", self.engine.name)
        with self._swap:
            while not self._stopped.is_set():
                try:
                    self.engine.restart()
                    break
                except Exception:
                    log.exception("restarting the engine failed; trying again")
                    self._stopped.wait(self.settings.monitor_interval)
        if not self._stopped.is_set():
            self.restarts += 1
            self._ready.set()
            log.info("the %s engine is back (restart %d)", self.engine.name, self.restarts)

    # -- models --------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [ACTIVE_NAME, BASE_NAME, *[v.name for v in self.registry.versions() if v.status == "promoted"]]

    def adapter_for(self, model: str | None) -> str | None:
        """The engine adapter that answers for `model` now: 'ratchet', 'ratchet-base' or 'ratchet-vN'."""
        if model in (None, "", ACTIVE_NAME):
            return self.active
        if model == BASE_NAME:
            return None
        return self._promoted(model).name

    def _promoted(self, model: str) -> AdapterVersion:
        for v in self.registry.versions():
            if v.name == model and v.status == "promoted":
                return v
        raise UnknownModel(model)

    @contextlib.contextmanager
    def _holding(self, model: str | None):
        """The adapter for `model`, held (not unloaded) until the block ends."""
        if not self._ready.is_set():
            raise EngineUnavailable("the engine is restarting; retry in a few seconds")
        if model in (None, "", ACTIVE_NAME, BASE_NAME):
            with self._changed:
                adapter = self.active if model != BASE_NAME else None
                self._inflight[adapter] += 1
        else:  # a pinned version: loaded on demand, under the swap lock so no unload races it
            version = self._promoted(model)
            with self._swap:
                self.engine.load_adapter(version.name, version.path)
                with self._changed:
                    adapter = version.name
                    self._inflight[adapter] += 1
        try:
            yield adapter
        finally:
            with self._changed:
                self._inflight[adapter] -= 1
                self._changed.notify_all()

    def inflight(self) -> dict:
        with self._changed:
            return {k: v for k, v in self._inflight.items() if v}

    # -- chat ----------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, model: str | None = None, **kwargs) -> Reply:
        kwargs.setdefault("max_tokens", self.settings.max_tokens)
        with self._holding(model) as adapter:
            started = time.perf_counter()
            try:
                return self.agent.chat(messages, adapter=adapter, model_name=model or ACTIVE_NAME, **kwargs)
            except (EngineError, TimeoutError) as e:
                self._record_engine_failure(e, messages, model, adapter, kwargs,
                                            (time.perf_counter() - started) * 1000)
                raise

    def chat_stream(self, messages: list[dict], *, model: str | None = None, **kwargs) -> tuple[str, str | None, Iterator]:
        """(response id, adapter, pieces): the pieces are text, then the Reply. Errors about the
        request itself (unknown model, engine restarting) are raised here, before any piece."""
        kwargs.setdefault("max_tokens", self.settings.max_tokens)
        response_id = new_response_id()
        holding = self._holding(model)
        adapter = holding.__enter__()
        pieces = self.agent.stream(messages, adapter=adapter, model_name=model or ACTIVE_NAME,
                                   response_id=response_id, **kwargs)
        return response_id, adapter, _Held(pieces, lambda: holding.__exit__(None, None, None))

    def trusted(self, c) -> bool:
        """May this correction enter the shared adapter? Shared or admin-confirmed ones, and those
        of trusted users and of admin-key users."""
        if c.user is None or c.confirmed_at or c.user in self.settings.trusted_users:
            return True
        return any(k.live and k.role == "admin" and k.user == c.user for k in self.keys.list())

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
        self._switch(adapter)

    def activate(self, version: int) -> AdapterVersion:
        """Serve `version` as `ratchet`: any earlier promoted (or candidate) version still on disk."""
        try:
            adapter = self.registry.get(version)
        except KeyError:
            raise UnknownAdapter(version) from None
        if adapter.status not in SERVABLE:
            raise NotServable(f"{adapter.name} is {adapter.status}; it may not be served")
        if not (Path(adapter.path) / "adapter_config.json").exists():
            raise NotServable(f"{adapter.name}'s folder {adapter.path} is gone")
        self._switch(adapter)
        return self.registry.get(version)

    def rollback(self) -> AdapterVersion | None:
        """Back to the promoted version before the active one, or to the base model; returns it."""
        with self._swap:
            current = self.registry.active()
            earlier = [v for v in self.registry.versions() if v.status == "promoted"
                       and (current is None or v.version < current.version)
                       and (Path(v.path) / "adapter_config.json").exists()]
            if current is None:
                raise NotServable("the base model is already active; there is nothing to roll back to")
            target = earlier[-1] if earlier else None
            self._switch(target)
            return self.registry.get(target.version) if target else None

    def _switch(self, adapter: AdapterVersion | None) -> dict:
        """Returns how long it took: to load the new version, to switch, to drain and unload old ones."""
        started = time.perf_counter()
        with self._swap:
            if adapter is not None:
                self.engine.load_adapter(adapter.name, adapter.path)  # under its own name, beside the old
            with self._changed:  # the switch: new requests get the new version from here on
                previous, self.active = self.active, adapter.name if adapter else None
                self.registry.activate(adapter.version if adapter else None)
                self._changed.notify_all()
            switched = time.perf_counter()
            self._follow(adapter)
            # Keep the previous version loaded for a quick rollback; unload older ones once the
            # requests still running on them are done.
            keep = {self.active, previous}
            for name in self.engine.adapters():
                if name not in keep:
                    self._unload_when_idle(name)
        self.last_switch = {"switched_in_s": round(switched - started, 3),
                            "drained_in_s": round(time.perf_counter() - switched, 3)}
        log.info("active adapter: %s (was %s) %s", self.active or BASE_NAME, previous or BASE_NAME, self.last_switch)
        return self.last_switch

    def _follow(self, adapter: AdapterVersion | None) -> None:
        """Tell an engine with a merged lane (serving/engines/lanes.py) which adapter is active."""
        follow = getattr(self.engine, "follow", None)
        if follow is not None:
            follow(adapter.name if adapter else None, adapter.path if adapter else None)

    def _unload_when_idle(self, name: str) -> None:
        with self._changed:
            idle = self._changed.wait_for(lambda: self._inflight[name] == 0,
                                          timeout=self.settings.vllm.request_timeout)
        if not idle:
            log.warning("%s still has requests after %.0f s; left loaded", name, self.settings.vllm.request_timeout)
            return
        try:
            self.engine.unload_adapter(name)
        except EngineError:
            log.warning("could not unload %s", name, exc_info=True)


class _Held:
    """A stream that holds its adapter until it is exhausted, closed or dropped — also when it
    never started (a generator's own `finally` would not run then)."""

    def __init__(self, pieces: Iterator, release):
        self._pieces, self._release, self._lock = pieces, release, threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._pieces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            try:
                self._pieces.close()
            finally:
                release()

    def __del__(self):
        self.close()
