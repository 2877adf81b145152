"""Ratchet, the application: the one door every interface calls.

Each use case is one method taking the `Caller`; who may do what is decided here and nowhere
else. The HTTP API (serving/api.py), the CLI (serving/cli.py), the console and the benchmarks
only translate to and from these calls. `Ratchet(settings)` opens the data directory (storage
only: keys, memories, failures, adapters' records); `start()` adds the engine, the agent and the
consolidation worker.

The engine as the server runs it — watched, restarted, adapters switched without a failed
request — is serving/runtime.py's EngineRuntime.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from agent import Agent, Reply
from agent.graph import new_response_id
from memory import LOCAL_USER, Correction, Hit, Memory, UnknownResponse
from memory.matcher import Matcher
from serving.auth import ApiKey, ApiKeys, is_loopback
from serving.engines import Engine, EngineError, make_engine
from serving.metrics import Metrics
from serving.reports import LearningReport, LearningReports
from serving.runtime import EngineRuntime
from serving.settings import Settings
from trainer.base_model import resolve_model
from trainer.cycle import Cycles
from trainer.registry import AdapterRegistry, AdapterVersion
from trainer.schedule import Schedule

log = logging.getLogger("ratchet")

ACTIVE_NAME = "ratchet"  # the model name that means "the active adapter"
BASE_NAME = "ratchet-base"  # the model name that means "no adapter"
SERVABLE = ("promoted", "candidate")  # statuses an admin may activate; a rejected version never is


@dataclass(frozen=True)
class Caller:
    """Who asks: the user everything is done as, whether they may administer, and how they came."""

    user: str
    admin: bool = False
    key_id: int | None = None  # the API key the request carried; None: keyless (loopback) or in-process
    named: bool = True  # False: nobody was named and `user` is the default (feedback then goes to the answer's user)


LOCAL_ADMIN = Caller(LOCAL_USER, admin=True, named=False)  # the operator at this machine (keyless mode, the CLI)


class Forbidden(PermissionError):
    """The caller may not do this (an admin's use case, or another user's thing)."""


class UnknownModel(LookupError):
    pass


class UnknownAdapter(LookupError):
    pass


class UnknownCycle(LookupError):
    pass


class UnknownThread(LookupError):
    pass


class NotServable(ValueError):
    """The version exists but may not be served (rejected, or its folder is gone)."""


class TooLarge(ValueError):
    """A request beyond the server's limits (settings.limits): too many messages, too long a text."""


class Busy(RuntimeError):
    """Every request slot is taken (settings.limits.concurrent_requests); retry in a moment."""


class QuotaExceeded(RuntimeError):
    """The user keeps as many memories as one user may (settings.limits.memories_per_user)."""


class Invalid(ValueError):
    """The request cannot be carried out as asked (e.g. a lesson for a failure that has no question)."""


class DataDirInUse(ValueError):
    """Another Ratchet serves this data directory."""


class Ratchet:
    def __init__(self, settings: Settings, engine: Engine | None = None, *, offline: bool = False):
        """`offline`: the database only (no index loaded, never started): what the CLI needs to
        manage keys or rebuild the index while no server runs."""
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._matcher = matcher = Matcher() if settings.same_question and not offline else None
        self.memory = Memory(settings.data_dir, open_index=not offline, embedder_dir=settings.embedder_dir,
                             matcher=matcher)
        self.registry = AdapterRegistry(self.memory.db, settings.data_dir / "adapters")
        self.keys = ApiKeys(self.memory.db)
        self.reports = LearningReports(settings.reports_dir)
        self.offline = offline
        self.engine = engine
        self.model_path: str | None = None
        self.agent: Agent | None = None
        self.cycles: Cycles | None = None
        self.schedule: Schedule | None = None
        self._threads_db: sqlite3.Connection | None = None
        self.runtime: EngineRuntime | None = None
        self._tokenizer = None
        self._stopped = False
        self._slots = threading.BoundedSemaphore(settings.limits.concurrent_requests)
        self._lock_file = None
        self._admins: tuple[float, frozenset[str]] = (0.0, frozenset())  # (when read, admin-key users)
        self.metrics = Metrics(self)
        if not offline:
            self._lock_data_dir()
            self._compose()

    def _lock_data_dir(self) -> None:
        """One server per data directory: a second one would remove the first one's cycle's folder."""
        import fcntl

        path = self.settings.data_dir / "ratchet.lock"
        self._lock_file = open(path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self.memory.close()
            raise DataDirInUse(f"{self.settings.data_dir} is served by {holder} already; stop it, or use "
                               f"another --data-dir") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"ratchet pid {os.getpid()}\n")
        self._lock_file.flush()

    def _compose(self) -> None:
        """The parts a server needs beyond storage: the model, the engine, the agent, cycles, schedule."""
        from langgraph.checkpoint.sqlite import SqliteSaver

        settings = self.settings
        self.model_path = resolve_model(settings.model, settings.models_dir)
        self.engine = self.engine or make_engine(settings.engine, self.model_path, settings)
        self.runtime = EngineRuntime(self.engine, self.registry, monitor_interval=settings.monitor_interval,
                                     drain_timeout=settings.vllm.request_timeout)
        self._threads_db = sqlite3.connect(str(settings.data_dir / "threads.db"), check_same_thread=False)
        checkpointer = SqliteSaver(self._threads_db)
        checkpointer.setup()
        self.agent = Agent(self.memory, self.engine, k=settings.memory_k, threshold=settings.memory_threshold,
                           scope=settings.adapter_scope or None, same=settings.same_question or None,
                           checkpointer=checkpointer,
                           history=settings.limits.history_messages, max_thread=settings.limits.thread_messages)
        self.cycles = Cycles(self.memory, self.registry, self.model_path, settings.cycle, settings.data_dir,
                             on_promote=self.runtime.switch, on_candidate=self.runtime.prepare,
                             admits=self.trusted)
        self.schedule = Schedule(self.cycles, settings.schedule)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self.offline:
            raise RuntimeError("an offline Ratchet opens the database only; it cannot serve")

        def listed(version: AdapterVersion, error: EngineError) -> None:
            self.memory.failures.record_engine_error(new_response_id(), error, prompt=f"load {version.name}",
                                                     model=ACTIVE_NAME, adapter=version.name)

        self.runtime.start(on_load_failure=listed)
        if self._matcher is not None:
            self._matcher.load()
        self.schedule.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if not self.offline:
            self.schedule.stop()
            self.runtime.stop()
            self._threads_db.close()
        self.memory.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the data directory

    close = stop

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.runtime.ready

    @property
    def restarts(self) -> int:
        return self.runtime.restarts if self.runtime else 0

    @property
    def last_switch(self) -> dict:
        """How long the last adapter switch took: to load and switch, to drain and unload."""
        return self.runtime.last_switch

    def health(self) -> dict:
        """What /health tells: ready or restarting, the engine, the active version, restarts."""
        return {"status": "ok" if self.ready else "restarting", "engine": self.engine.name, "active": self.active,
                "restarts": self.restarts, "auth": self.keys.any_live(), **self.engine.status()}

    # -- who may ---------------------------------------------------------------------------
    def whoami(self, caller: Caller) -> dict:
        """Who the server takes the caller for: their user, whether an admin, and by a key or keyless."""
        return {"user": caller.user, "admin": caller.admin, "keyed": caller.key_id is not None}

    @staticmethod
    def _admin(caller: Caller, what: str) -> None:
        if not caller.admin:
            raise Forbidden(f"{what} needs an admin key")

    def trusted(self, c: Correction) -> bool:
        """May this correction enter the shared adapter? Shared or admin-confirmed ones, and those
        of trusted users and of admin-key users."""
        if c.user is None or c.confirmed_at or c.user in self.settings.trusted_users:
            return True
        return c.user in self._admin_users()

    def _admin_users(self, ttl: float = 5.0) -> frozenset[str]:
        """The users of live admin keys, read at most every `ttl` seconds (a cycle asks per correction)."""
        read_at, users = self._admins
        if time.monotonic() - read_at > ttl:
            users = frozenset(k.user for k in self.keys.list() if k.live and k.role == "admin")
            self._admins = (time.monotonic(), users)
        return users

    # -- models --------------------------------------------------------------------------
    @property
    def active(self) -> str | None:
        """The engine name of the version served as `ratchet` (None: the base model)."""
        version = self.registry.active()
        return version.name if version else None

    def models(self, caller: Caller) -> list[str]:
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

    def _holding(self, model: str | None):
        """The adapter for `model`, held (not unloaded) until the block ends."""
        if model in (None, "", ACTIVE_NAME, BASE_NAME):
            return self.runtime.holding(base=model == BASE_NAME)
        return self.runtime.holding(self._promoted(model))

    def inflight(self) -> dict:
        """Requests running now, per adapter (None: the base model)."""
        return self.runtime.inflight()

    # -- chat ----------------------------------------------------------------------------
    def _within_limits(self, messages: list[dict], options: dict) -> None:
        limits = self.settings.limits
        if len(messages) > limits.messages:
            raise TooLarge(f"{len(messages)} messages in one request; at most {limits.messages}")
        for m in messages:
            if len(m["content"]) > limits.message_chars:
                raise TooLarge(f"a message of {len(m['content'])} characters; at most {limits.message_chars}")
        if options["max_tokens"] >= self.settings.vllm.max_model_len:
            raise TooLarge(f"max_tokens {options['max_tokens']} does not fit the model's context of "
                           f"{self.settings.vllm.max_model_len} tokens")

    def _take_slot(self):
        """A request slot, or Busy at once (the caller retries): its release function."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"all {self.settings.limits.concurrent_requests} request slots are busy; retry in a moment")
        return self._slots.release

    def chat(self, caller: Caller, messages: list[dict], *, model: str | None = None, **options) -> Reply:
        """Answer `messages` as `caller.user` (options: use_memory, max_tokens, temperature, thread_id)."""
        options = {"max_tokens": self.settings.max_tokens, **options, "user": caller.user}
        self._within_limits(messages, options)
        release = self._take_slot()
        try:
            reply = self._chat(messages, model, options)
        finally:
            release()
        self.metrics.observe_chat(model or ACTIVE_NAME, reply)
        return reply

    def _chat(self, messages: list[dict], model: str | None, options: dict) -> Reply:
        with self._holding(model) as adapter:
            started = time.perf_counter()
            try:
                return self.agent.chat(messages, adapter=adapter, model_name=model or ACTIVE_NAME, **options)
            except (EngineError, TimeoutError) as e:
                self._record_engine_failure(e, messages, model, adapter, options,
                                            (time.perf_counter() - started) * 1000)
                raise

    def chat_stream(self, caller: Caller, messages: list[dict], *, model: str | None = None,
                    **options) -> tuple[str, str | None, Iterator]:
        """(response id, adapter, pieces): the pieces are text, then the Reply. Errors about the
        request itself (unknown model, engine restarting) are raised here, before any piece."""
        options = {"max_tokens": self.settings.max_tokens, **options, "user": caller.user}
        self._within_limits(messages, options)
        release = self._take_slot()
        try:
            response_id = new_response_id()
            holding = self._holding(model)
            adapter = holding.__enter__()
        except BaseException:
            release()
            raise
        pieces = self._observed(model or ACTIVE_NAME, self.agent.stream(
            messages, adapter=adapter, model_name=model or ACTIVE_NAME, response_id=response_id, **options))

        def done() -> None:
            holding.__exit__(None, None, None)
            release()

        return response_id, adapter, self.runtime.held(pieces, done)

    def _observed(self, model: str, pieces: Iterator) -> Iterator:
        """A stream's pieces, its Reply counted in the metrics."""
        try:
            for piece in pieces:
                if isinstance(piece, Reply):
                    self.metrics.observe_chat(model, piece)
                yield piece
        finally:
            pieces.close()

    def metrics_text(self, caller: Caller) -> bytes:
        """The Prometheus metrics, in its text format."""
        self._admin(caller, "the metrics")
        return self.metrics.text()

    def delete_thread(self, caller: Caller, thread_id: str) -> None:
        """Forget one of the caller's threads (UnknownThread when they have none of that id)."""
        if not self.agent.delete_thread(caller.user, thread_id):
            raise UnknownThread(thread_id)

    def agreement(self, caller: Caller, messages: list[dict], completion: str, *,
                  model: str | None = None) -> tuple[int, int]:
        """(matched, total): how many of `completion`'s tokens the model predicts as its top
        token when teacher-forced after `messages` (token-level locality, as editing benchmarks
        compute it)."""
        self._within_limits([*messages, {"content": completion}], {"max_tokens": 1})
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        prompt_ids = list(self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=True)["input_ids"])
        answer_ids = self._tokenizer(completion, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            return 0, 0
        return self.engine.agreement(prompt_ids, answer_ids, adapter=self.adapter_for(model)), len(answer_ids)

    def _record_engine_failure(self, error, messages, model, adapter, options, latency_ms) -> None:
        """An answer that never came is a failure too (engine_error or timeout), listed with the rest."""
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        try:
            self.memory.failures.record_engine_error(
                new_response_id(), error, prompt=prompt, user=options.get("user"), model=model or ACTIVE_NAME,
                adapter=adapter, thread_id=options.get("thread_id"), messages=messages, latency_ms=latency_ms)
        except Exception:
            log.exception("could not record the engine failure")

    # -- feedback and memories -------------------------------------------------------------
    def feedback(self, caller: Caller, response_id: str, rating: int, *, comment: str | None = None,
                 correction: str | None = None) -> int:
        """Record feedback on an answer (committed when this returns); a correction becomes a
        memory at once and may trigger a cycle. A key's user may rate only their own answers."""
        self._note_within_limits(comment=comment, correction=correction)
        interaction = self.memory.interactions.get(response_id)
        if interaction is None or (caller.key_id is not None and (interaction["user"] or LOCAL_USER) != caller.user):
            raise UnknownResponse(response_id)
        user = caller.user if caller.named else (interaction["user"] or LOCAL_USER)
        if correction and correction.strip():
            self._within_quota(user)
        feedback_id = self.memory.record_feedback(response_id, rating, comment=comment, correction=correction,
                                                  user=user)
        if correction and correction.strip():
            self._corrected()
        return feedback_id

    def add_correction(self, caller: Caller, question: str, answer: str, *, shared: bool = False) -> Correction:
        """A correction given directly, for the caller (or, by an admin, shared with everyone)."""
        if shared:
            self._admin(caller, "a shared memory")
        self._within_quota(None if shared else caller.user)
        if len(question) > self.settings.limits.message_chars:
            raise TooLarge(f"a question of {len(question)} characters; at most {self.settings.limits.message_chars}")
        self._note_within_limits(answer=answer)
        memory_id = self.memory.add_correction(question, answer, user=None if shared else caller.user)
        self._corrected()
        return self.memory.corrections.get(memory_id, None, admin=True)

    def _note_within_limits(self, **texts: str | None) -> None:
        most = self.settings.limits.note_chars
        for name, text in texts.items():
            if text is not None and len(text) > most:
                raise TooLarge(f"a {name} of {len(text)} characters; at most {most}")

    def _within_quota(self, user: str | None) -> None:
        most = self.settings.limits.memories_per_user
        if user is not None and self.memory.corrections.count(user) >= most:
            raise QuotaExceeded(f"{user} keeps {most} memories, the most one user may; retract some first")

    def _corrected(self) -> None:
        """A correction arrived (by any door): a cycle may be due (--consolidate-after)."""
        if self.schedule is not None:
            self.schedule.on_correction()

    def memory_of(self, caller: Caller, memory_id: int) -> Correction:
        """One memory the caller may see: theirs or a shared one."""
        return self.memory.corrections.get(memory_id, caller.user)

    def search_memories(self, caller: Caller, query: str, *, limit: int = 20, threshold: float | None = None,
                        user: str | None = None) -> list[Hit]:
        """The memories the caller may see nearest to `query`, the newest correction of a question
        winning; an admin may search as `user` sees them."""
        return self.memory.search(query, self._seen_by(caller, user), k=limit, max_chars=None,
                                  threshold=self.settings.memory_threshold if threshold is None else threshold)

    def list_memories(self, caller: Caller, *, limit: int = 20, offset: int = 0, state: str = "live",
                      user: str | None = None) -> list[Correction]:
        """The caller's visible memories (an admin's: `user`'s), newest first: live ones, retracted
        ones, or all (`state`)."""
        return self.memory.corrections.visible(self._seen_by(caller, user), limit=limit, offset=offset, state=state)

    @staticmethod
    def _seen_by(caller: Caller, user: str | None) -> str:
        """Whose view of the memories: `user`'s for an admin who names one, else the caller's own
        (a user key's user overrides any other name, as in every request it sends)."""
        return user if user and caller.admin else caller.user

    def memory_state(self, c: Correction) -> dict:
        """What became of a memory: `state` memory (retrieved only), weights (consolidated) or
        retracted, and `adapter`, the version whose cycle consolidated it."""
        adapter = None
        if c.consolidated_in is not None and self.cycles is not None:
            try:
                version = self.cycles.get(c.consolidated_in).get("adapter_version")
            except KeyError:  # a cycle record that is gone: the memory still says which cycle it was
                version = None
            adapter = f"ratchet-v{version}" if version else None
        state = "retracted" if c.retracted_at else "weights" if c.consolidated_in is not None else "memory"
        return {"state": state, "adapter": adapter}

    def retract(self, caller: Caller, memory_id: int) -> Correction:
        """Out of retrieval at once, out of the weights at the next cycle: by the user who gave it,
        or by an admin (the only way for a shared memory)."""
        try:
            return self.memory.corrections.retract(memory_id, caller.user)
        except (LookupError, PermissionError):
            if not caller.admin:
                raise
            return self.memory.corrections.retract(memory_id, caller.user, admin=True)

    def confirm(self, caller: Caller, memory_id: int) -> Correction:
        """An admin vouches for a correction from an untrusted user: the next cycle may learn it."""
        self._admin(caller, "confirming a memory")
        return self.memory.corrections.confirm(memory_id, caller.user if caller.named else None)

    def rebuild_index(self, caller: Caller) -> dict:
        """Throw the FAISS indexes away and build them again from SQLite."""
        self._admin(caller, "rebuilding the index")
        started = time.perf_counter()
        n = self.memory.sync.rebuild()
        return {"memories": n, "scopes": len(self.memory.index.scopes()),
                "seconds": round(time.perf_counter() - started, 3)}

    # -- failures ----------------------------------------------------------------------------
    def failures(self, caller: Caller, *, kind: str | None = None, user: str | None = None, open_only: bool = False,
                 limit: int = 50, offset: int = 0) -> list[dict]:
        """Failures that came without feedback, newest first, with the question and answer."""
        self._admin(caller, "the failures")
        return self.memory.failures.list(kind=kind, user=user, open_only=open_only, limit=limit, offset=offset)

    def failure(self, caller: Caller, failure_id: int) -> dict:
        self._admin(caller, "the failures")
        return self.memory.failures.get(failure_id)

    def lesson(self, caller: Caller, failure_id: int, answer: str, *, shared: bool = False) -> tuple[dict, Correction]:
        """Turn a failure into a correction of its question (for the user who asked, or everyone)."""
        self._admin(caller, "a lesson from a failure")
        self._note_within_limits(answer=answer)
        if not self.memory.failures.get(failure_id)["prompt"]:
            raise Invalid(f"failure {failure_id} has no question to correct")
        memory_id = self.memory.failures.lesson(failure_id, answer, shared=shared)
        self._corrected()
        return self.memory.failures.get(failure_id), self.memory.corrections.get(memory_id, None, admin=True)

    # -- consolidation -------------------------------------------------------------------------
    def consolidate(self, caller: Caller, trigger: str = "api") -> dict:
        """Queue a consolidation cycle; returns it at once."""
        self._admin(caller, "a consolidation")
        return self.cycles.get(self.cycles.submit(trigger=trigger))

    def consolidations(self, caller: Caller) -> tuple[dict, list[dict]]:
        """(the schedule with its next run, every cycle newest first)."""
        self._admin(caller, "the consolidations")
        config = self.schedule.config
        schedule = {"every": config.every, "after_corrections": config.after_corrections,
                    "next_run": self.schedule.next_run()}
        return schedule, self.cycles.list()

    def consolidation(self, caller: Caller, cycle_id: int) -> dict:
        self._admin(caller, "the consolidations")
        try:
            return self.cycles.get(cycle_id)
        except KeyError:
            raise UnknownCycle(cycle_id) from None

    # -- adapters ------------------------------------------------------------------------
    def adapters(self, caller: Caller) -> list[AdapterVersion]:
        self._admin(caller, "the adapters")
        return self.registry.versions()

    def activate(self, caller: Caller, version: int) -> AdapterVersion:
        """Serve `version` as `ratchet`: any earlier promoted (or candidate) version still on disk."""
        self._admin(caller, "activating an adapter")
        try:
            adapter = self.registry.get(version)
        except KeyError:
            raise UnknownAdapter(version) from None
        if adapter.status not in SERVABLE:
            raise NotServable(f"{adapter.name} is {adapter.status}; it may not be served")
        if not (Path(adapter.path) / "adapter_config.json").exists():
            raise NotServable(f"{adapter.name}'s folder {adapter.path} is gone")
        self.runtime.switch(adapter)
        return self.registry.get(version)

    def rollback(self, caller: Caller) -> AdapterVersion | None:
        """Back to the promoted version before the active one, or to the base model; returns it."""
        self._admin(caller, "a rollback")
        with self.runtime.switching():
            current = self.registry.active()
            if current is None:
                raise NotServable("the base model is already active; there is nothing to roll back to")
            earlier = [v for v in self.registry.versions() if v.status == "promoted" and v.version < current.version
                       and (Path(v.path) / "adapter_config.json").exists()]
            target = earlier[-1] if earlier else None
            self.runtime.switch(target)
            return self.registry.get(target.version) if target else None

    # -- the learning benchmark's reports ------------------------------------------------------
    def learning_reports(self, caller: Caller) -> list[LearningReport]:
        """The runs of `ratchet eval zsre` in settings.reports_dir, newest first."""
        self._admin(caller, "the benchmark reports")
        return self.reports.list()

    def learning_report_plot(self, caller: Caller, name: str, plot: str) -> Path:
        """The PNG file of one plot of one listed report (UnknownReport for anything else)."""
        self._admin(caller, "the benchmark reports")
        return self.reports.plot(name, plot)

    # -- API keys --------------------------------------------------------------------------
    def create_key(self, caller: Caller, user: str, *, admin: bool = False) -> tuple[ApiKey, str]:
        """A new key and its token (shown this once; only its hash is kept)."""
        self._admin(caller, "making keys")
        return self.keys.create(user, "admin" if admin else "user")

    def list_keys(self, caller: Caller) -> list[ApiKey]:
        self._admin(caller, "the keys")
        return self.keys.list()

    def revoke_key(self, caller: Caller, key_id: int) -> ApiKey:
        self._admin(caller, "revoking keys")
        return self.keys.revoke(key_id)

    def authenticate(self, token: str | None) -> ApiKey | None:
        """The live key for a token, or None."""
        return self.keys.verify(token) if token else None

    def keyed(self) -> bool:
        """Does any live key exist? Then every request needs one."""
        return self.keys.any_live()

    def open_to_loopback(self) -> bool:
        """Keyless mode: no live key and a loopback address, so every caller is the operator (an
        admin). A server on a public address never opens up, even with every key revoked."""
        return not self.keyed() and is_loopback(self.settings.host)
