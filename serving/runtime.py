"""The engine as a server runs it: started, watched and restarted when it dies, and the active
adapter switched without a failed request.

A new version is loaded under its own name, the active pointer (the registry's) is switched under
a lock, requests already running on the old version finish (each request holds its adapter for as
long as it runs), and only then is the old one unloaded. While the engine restarts, requests get
EngineUnavailable at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from serving.engines import Engine, EngineError
from trainer.registry import AdapterRegistry, AdapterVersion

log = logging.getLogger("ratchet")


class EngineUnavailable(EngineError):
    """The engine is restarting; the request may be retried shortly."""


class EngineRuntime:
    def __init__(self, engine: Engine, registry: AdapterRegistry, *, monitor_interval: float, drain_timeout: float):
        """`monitor_interval`: seconds between checks that the engine is alive (0: none);
        `drain_timeout`: how long an old version may keep requests before it is left loaded."""
        self.engine, self.registry = engine, registry
        self.monitor_interval, self.drain_timeout = monitor_interval, drain_timeout
        self._swap = threading.RLock()  # one adapter change (load, switch, drain, unload) at a time
        self._inflight: collections.Counter = collections.Counter()  # running requests per adapter (None: base)
        self._changed = threading.Condition()  # guards the active version's switch and `_inflight`
        self._stopped = threading.Event()
        self._ready = threading.Event()  # the engine answers; cleared while it restarts
        self._monitor: threading.Thread | None = None
        self.restarts = 0
        self.last_switch: dict = {}

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, on_load_failure: Callable[[AdapterVersion, EngineError], None]) -> None:
        """Start the engine with the active version; one that fails to load leaves the base model
        serving (`on_load_failure` is told)."""
        self.engine.start()
        active = self.registry.active()
        if active is not None:
            try:
                self.engine.load_adapter(active.name, active.path)
            except EngineError as e:
                log.exception("could not load the active adapter %s; serving the base model", active.name)
                on_load_failure(active, e)
                self.registry.activate(None)
                active = None
        self.engine.follow(active.name if active else None, active.path if active else None)
        self._ready.set()
        if self.monitor_interval > 0:
            # Also the thread that restarts the engine: it lives as long as the server, as the
            # engine's PR_SET_PDEATHSIG (tied to the spawning thread) needs.
            self._monitor = threading.Thread(target=self._watch, name="ratchet-engine-monitor", daemon=True)
            self._monitor.start()

    def stop(self) -> None:
        self._stopped.set()
        self._ready.clear()
        self.engine.stop()  # first: a restart under way in the monitor then fails at once
        if self._monitor is not None:
            self._monitor.join(timeout=60)
        self.engine.stop()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _watch(self) -> None:
        while not self._stopped.wait(self.monitor_interval):
            if not self.engine.alive():
                self.restart()

    def restart(self) -> None:
        """The engine died: start it again with the adapters it had."""
        self._ready.clear()
        log.error("the %s engine died; restarting it", self.engine.name)
        with self._swap:
            while not self._stopped.is_set():
                try:
                    self.engine.restart()
                    break
                except Exception:
                    log.exception("restarting the engine failed; trying again")
                    self._stopped.wait(self.monitor_interval)
        if not self._stopped.is_set():
            self.restarts += 1
            self._ready.set()
            log.info("the %s engine is back (restart %d)", self.engine.name, self.restarts)

    # -- requests ------------------------------------------------------------------------
    @property
    def active(self) -> str | None:
        """The engine name of the version served as `ratchet` (None: the base model)."""
        version = self.registry.active()
        return version.name if version else None

    @contextlib.contextmanager
    def holding(self, pinned: AdapterVersion | None = None, *, base: bool = False):
        """The adapter a request runs on, held (not unloaded) until the block ends: the active
        version, the base model (`base`), or a `pinned` version, loaded on demand."""
        if not self._ready.is_set():
            raise EngineUnavailable("the engine is restarting; retry in a few seconds")
        if pinned is None:
            with self._changed:
                adapter = None if base else self.active
                self._inflight[adapter] += 1
        else:  # under the swap lock, so no unload races it
            with self._swap:
                self.engine.load_adapter(pinned.name, pinned.path)
                with self._changed:
                    adapter = pinned.name
                    self._inflight[adapter] += 1
        try:
            yield adapter
        finally:
            with self._changed:
                self._inflight[adapter] -= 1
                self._changed.notify_all()

    def held(self, pieces: Iterator, release: Callable[[], None]) -> Iterator:
        """A stream that calls `release` once it is exhausted, closed or dropped."""
        return _Held(pieces, release)

    def inflight(self) -> dict:
        with self._changed:
            return {k: v for k, v in self._inflight.items() if v}

    # -- switching -----------------------------------------------------------------------
    @contextlib.contextmanager
    def switching(self):
        """No other switch until the block ends (to choose a version and switch to it as one step)."""
        with self._swap:
            yield

    def switch(self, adapter: AdapterVersion | None) -> dict:
        """Make `adapter` the active version (None: the base model); returns how long it took to
        load and switch, and to drain and unload old versions."""
        started = time.perf_counter()
        with self._swap:
            if adapter is not None:
                self.engine.load_adapter(adapter.name, adapter.path)  # under its own name, beside the old
            with self._changed:  # the switch: new requests get the new version from here on
                previous = self.active
                self.registry.activate(adapter.version if adapter else None)
                self._changed.notify_all()
            switched = time.perf_counter()
            self.engine.follow(adapter.name if adapter else None, adapter.path if adapter else None)
            # Keep the previous version loaded for a quick rollback; unload older ones once the
            # requests still running on them are done.
            keep = {self.active, previous}
            for name in self.engine.adapters():
                if name not in keep:
                    self._unload_when_idle(name)
        self.last_switch = {"switched_in_s": round(switched - started, 3),
                            "drained_in_s": round(time.perf_counter() - switched, 3)}
        log.info("active adapter: %s (was %s) %s", self.active or "the base model", previous or "the base model",
                 self.last_switch)
        return self.last_switch

    def prepare(self, name: str | None, path: Path | None) -> None:
        """A candidate is being judged (None: no longer): the engine may get ready to serve it."""
        self.engine.prepare(name, str(path) if path is not None else None)

    def _unload_when_idle(self, name: str) -> None:
        with self._changed:
            idle = self._changed.wait_for(lambda: self._inflight[name] == 0, timeout=self.drain_timeout)
        if not idle:
            log.warning("%s still has requests after %.0f s; left loaded", name, self.drain_timeout)
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
