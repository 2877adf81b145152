"""Property tests of the memory store (issue 20): under random adds, duplicates, feedback and
retractions by several users, with index rebuilds running in another thread, the newest correction
of a question wins, no user sees another's memories, and the FAISS indexes hold exactly SQLite's
live memories. A plain model (a list of rows) says what the store should hold."""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memory import Memory, UnknownMemory
from memory.index import scope_name
from tests.fakes import HashEmbedder

USERS = ("ann", "bob", None)  # None: a shared memory (an admin's)
QUESTIONS = tuple(f"Where was person {n} born?" for n in range(4))  # few, so questions repeat often
ANSWERS = ("Paris", "Lagos", "Lima", "Oslo")
EXAMPLES = int(os.environ.get("RATCHET_PROPERTY_EXAMPLES", "15"))  # random runs of the machine


@dataclass
class Row:
    """What the store should hold for one memory."""

    id: int
    user: str | None
    question: int
    answer: int
    live: bool = True


class MemoryMachine(RuleBasedStateMachine):
    """Random operations on a real Memory (HashEmbedder: equal texts match, others do not), checked
    against the model after every step while a thread rebuilds the indexes over and over."""

    @initialize()
    def open(self):
        self.folder = tempfile.TemporaryDirectory()
        self.memory = Memory(self.folder.name, embedder=HashEmbedder())
        self.rows: list[Row] = []
        self.responses = 0
        self.stop = threading.Event()
        self.rebuilds = 0
        self.rebuilder = threading.Thread(target=self._rebuild_forever, daemon=True)
        self.rebuilder.start()

    def _rebuild_forever(self):
        while not self.stop.wait(0.002):
            self.memory.sync.rebuild()
            self.rebuilds += 1

    def teardown(self):
        if hasattr(self, "stop"):
            self.stop.set()
            self.rebuilder.join(30)
            self.memory.close()
            self.folder.cleanup()

    # -- the model --------------------------------------------------------------------------
    def _newest(self, question: int, scope: tuple) -> Row | None:
        """The newest live row of `question` among the users in `scope`."""
        rows = [r for r in self.rows if r.live and r.question == question and r.user in scope]
        return max(rows, key=lambda r: r.id) if rows else None

    def _add(self, user: str | None, question: int, answer: int, memory_id: int) -> None:
        repeated = self._newest(question, (user,))
        if repeated is not None and repeated.answer == answer:
            assert memory_id == repeated.id, "a repeat of the newest correction is merged into it"
        else:
            assert memory_id not in {r.id for r in self.rows}, "a new correction is a new memory"
            self.rows.append(Row(memory_id, user, question, answer))

    # -- operations -------------------------------------------------------------------------
    @rule(user=st.sampled_from(USERS), question=st.integers(0, 3), answer=st.integers(0, 3))
    def add(self, user, question, answer):
        self._add(user, question, answer, self.memory.add_correction(QUESTIONS[question], ANSWERS[answer], user=user))

    @rule(user=st.sampled_from(USERS[:2]), question=st.integers(0, 3), answer=st.integers(0, 3))
    def feedback(self, user, question, answer):
        self.responses += 1
        response_id = f"chatcmpl-prop{self.responses}"
        self.memory.interactions.record(id=response_id, user=user, prompt=QUESTIONS[question], response="no idea")
        before = {r[0] for r in self.memory.db.execute("select id from memories")}
        self.memory.record_feedback(response_id, -1, correction=ANSWERS[answer], user=user)
        after = {r[0] for r in self.memory.db.execute("select id from memories")}
        new = after - before
        expected = self._newest(question, (user,))
        memory_id = new.pop() if new else (expected.id if expected else -1)
        self._add(user, question, answer, memory_id)

    @precondition(lambda self: any(r.live for r in self.rows))
    @rule(data=st.data())
    def retract(self, data):
        row = data.draw(st.sampled_from([r for r in self.rows if r.live]))
        if row.user is None:
            self.memory.corrections.retract(row.id, None, admin=True)
        else:
            self.memory.corrections.retract(row.id, row.user)
        row.live = False

    @precondition(lambda self: any(r.user is not None for r in self.rows))
    @rule(data=st.data())
    def another_users_memory_stays_out_of_reach(self, data):
        row = data.draw(st.sampled_from([r for r in self.rows if r.user is not None]))
        other = "bob" if row.user == "ann" else "ann"
        try:
            self.memory.corrections.get(row.id, other)
        except UnknownMemory:
            pass
        else:
            raise AssertionError(f"{other} could read {row.user}'s memory {row.id}")

    # -- what must always hold ---------------------------------------------------------------
    @invariant()
    def the_index_holds_exactly_the_live_memories(self):
        with self.memory.db.write_lock:  # between two rebuilds
            for user in USERS:
                live = {r.id for r in self.rows if r.live and r.user == user}
                in_sqlite = {i for (i,) in self.memory.db.execute(
                    "select id from memories where retracted_at is null and user is ?", [user])}
                assert in_sqlite == live, f"SQLite holds {in_sqlite} for {scope_name(user)}, not {live}"
                assert self.memory.index.scope(user).ids() == live, f"the {scope_name(user)} index differs"

    @invariant()
    def the_newest_visible_correction_wins_and_only_visible_ones_are_found(self):
        with self.memory.db.write_lock:  # between two rebuilds (a search during one: the test below)
            self._check_searches()

    def _check_searches(self):
        for user in USERS[:2]:
            for q, text in enumerate(QUESTIONS):
                hits = self.memory.search(text, user, k=3)
                assert all(h.correction.user in (None, user) for h in hits), f"{user} saw another user's memory"
                newest = self._newest(q, (user, None))
                if newest is None:
                    assert not hits, f"{user} found a memory of question {q} that is retracted or not theirs"
                else:
                    assert hits and hits[0].correction.id == newest.id, f"{user}: not the newest of question {q}"
                    assert hits[0].correction.answer == ANSWERS[newest.answer]

    @invariant()
    def each_user_lists_their_own_and_the_shared_memories(self):
        for user in USERS[:2]:
            listed = {c.id for c in self.memory.corrections.visible(user, limit=1000)}
            assert listed == {r.id for r in self.rows if r.live and r.user in (user, None)}


MemoryMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_memory_store_under_random_operations_and_concurrent_rebuilds = MemoryMachine.TestCase


def test_a_search_during_an_index_rebuild_still_finds_the_newest_correction(tmp_path):
    """A rebuild empties the indexes and fills them again; a chat meanwhile must still retrieve."""
    memory = Memory(tmp_path, embedder=HashEmbedder())
    for n, question in enumerate(QUESTIONS * 50):
        memory.add_correction(f"{question} ({n})", ANSWERS[n % 4], user="ann")
    wanted = memory.add_correction(QUESTIONS[0], "Quito", user="ann")
    stop, rebuilds = threading.Event(), []

    def rebuild_forever():
        while not stop.wait(0.005):  # an admin's rebuilds, close together
            rebuilds.append(memory.sync.rebuild())

    thread = threading.Thread(target=rebuild_forever, daemon=True)
    thread.start()
    try:
        found = []
        while len(rebuilds) < 20 or len(found) < 300:
            hits = memory.search(QUESTIONS[0], "ann")
            found.append(bool(hits) and hits[0].correction.id == wanted)
    finally:
        stop.set()
        thread.join(30)
        memory.close()
    assert all(found), f"{found.count(False)} of {len(found)} searches during rebuilds found nothing"
