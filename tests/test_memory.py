import sqlite3

import pytest

from memory import Memory
from memory.db import MIGRATIONS, migrate
from memory import RELEVANCE_THRESHOLD, NotAllowed, UnknownMemory, UnknownResponse

Q = "What university did Watts Humphrey attend?"
PARAPHRASE = "What university did Watts Humphrey take part in?"
UNRELATED = "Who played desmond doss father in hacksaw ridge?"


def answer(memory: Memory, question: str, user: str = "ann", rid: str = "r1") -> str:
    return memory.interactions.record(id=rid, user=user, prompt=question, response="Berkeley", messages=[])


def test_migrations_are_recorded_once(memory):
    names = [r["name"] for r in memory.db["_migrations"].rows]
    assert names == [fn.__name__ for fn in MIGRATIONS]
    assert migrate(memory.db) == []


def test_feedback_with_a_correction_becomes_a_retrievable_memory(memory):
    rid = answer(memory, Q)
    feedback_id = memory.record_feedback(rid, -1, comment="wrong", correction="Illinois Institute of Technology")
    assert feedback_id == 1
    hits = memory.search(PARAPHRASE, user="ann")
    assert [h.correction.answer for h in hits] == ["Illinois Institute of Technology"]
    assert hits[0].score > 0.9
    assert memory.search(UNRELATED, user="ann") == []


def test_feedback_on_an_unknown_response_is_refused(memory):
    with pytest.raises(UnknownResponse):
        memory.record_feedback("chatcmpl-nope", -1, correction="x")
    assert memory.db["feedback"].count == 0


def test_feedback_is_committed_when_it_returns(memory):
    rid = answer(memory, Q)
    memory.record_feedback(rid, 1, comment="thanks")
    other = sqlite3.connect(memory.db.conn.execute("pragma database_list").fetchone()[2])
    assert other.execute("select rating, comment from feedback").fetchall() == [(1, "thanks")]


def test_a_users_corrections_do_not_reach_another_user(memory):
    rid = answer(memory, Q, user="ann")
    memory.record_feedback(rid, -1, correction="Illinois Institute of Technology")
    assert memory.search(Q, user="bob") == []
    assert len(memory.search(Q, user="ann")) == 1


def test_shared_corrections_reach_everyone(memory):
    memory.add_correction(Q, "Illinois Institute of Technology", user=None)
    assert len(memory.search(Q, user="bob")) == 1


def test_the_newest_correction_of_a_question_wins(memory):
    memory.add_correction(Q, "Harvard", user="ann")
    memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    hits = memory.search(Q, user="ann")
    assert [h.correction.answer for h in hits] == ["Illinois Institute of Technology"]
    assert [c.answer for c in memory.corrections.live()] == ["Illinois Institute of Technology"]


def test_the_index_is_rebuilt_when_its_files_are_deleted(tmp_path, embedder):
    m = Memory(tmp_path, embedder=embedder)
    m.add_correction(Q, "Illinois Institute of Technology")
    m.add_correction("Which family does Ramalinaceae belong to?", "Lecanorales", user=None)
    m.close()
    files = sorted(p.name for p in (tmp_path / "index").glob("*.faiss"))
    assert len(files) == 2 and "shared.faiss" in files  # one index per scope
    for path in (tmp_path / "index").glob("*.faiss"):
        path.unlink()
    m = Memory(tmp_path, embedder=embedder)
    assert len(m.index) == 2
    assert m.search(PARAPHRASE, user="local")[0].correction.answer == "Illinois Institute of Technology"
    assert m.sync.rebuild() == 2
    assert m.search("What family are Ramalinaceae?", user="zoe")[0].correction.answer == "Lecanorales"
    m.close()


def test_the_index_catches_up_with_rows_it_missed(tmp_path, embedder):
    m = Memory(tmp_path, embedder=embedder)
    m.add_correction(Q, "Illinois Institute of Technology")
    m.close()
    # a row committed to SQLite by a process that died before it wrote the index
    db = sqlite3.connect(tmp_path / "ratchet.db")
    db.execute("insert into memories (kind, user, question, answer, created_at) values "
               "('correction', 'local', 'Which family does Ramalinaceae belong to?', 'Lecanorales', '2026')")
    db.commit()
    db.close()
    m = Memory(tmp_path, embedder=embedder)
    assert len(m.index) == 2
    assert m.search("What family are Ramalinaceae?", user="local")[0].correction.answer == "Lecanorales"
    m.close()


def test_consolidated_corrections_are_marked(memory):
    a = memory.add_correction(Q, "Illinois Institute of Technology")
    memory.add_correction("Which family does Ramalinaceae belong to?", "Lecanorales")
    memory.corrections.mark_consolidated([a], cycle_id=7)
    pending = memory.corrections.live(include_consolidated=False)
    assert [c.answer for c in pending] == ["Lecanorales"]


# -- scopes ----------------------------------------------------------------------------------
def test_a_users_memories_are_invisible_to_another_user_everywhere(memory):
    mine = memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    assert memory.search(Q, user="bob", threshold=0.0) == []
    assert memory.search(Q, user=None, threshold=0.0) == []  # nobody named: shared memories only
    assert [c.id for c in memory.corrections.visible("ann")] == [mine] and memory.corrections.visible("bob") == []
    with pytest.raises(UnknownMemory):
        memory.corrections.get(mine, "bob")
    with pytest.raises(UnknownMemory):
        memory.corrections.retract(mine, "bob")
    assert memory.corrections.get(mine, "bob", admin=True).user == "ann"
    assert memory.search(Q, user="ann")[0].correction.id == mine


# -- retraction ------------------------------------------------------------------------------
def test_retraction_takes_a_correction_out_of_retrieval_at_once(memory):
    mine = memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    memory.corrections.mark_consolidated([mine], cycle_id=3)
    assert len(memory.index) == 1
    retracted = memory.corrections.retract(mine, "ann")
    assert retracted.retracted_at is not None and retracted.retracted_by == "ann"
    assert len(memory.index) == 0  # out of FAISS, not just filtered
    assert memory.search(Q, user="ann") == []
    assert memory.corrections.live() == []
    assert [c.id for c in memory.corrections.retracted_since(None)] == [mine]
    assert memory.corrections.retracted_since(retracted.retracted_at) == []
    assert [c.id for c in memory.corrections.to_unlearn()] == [mine]  # the weights still know it
    memory.corrections.mark_unlearnt([mine], cycle_id=4)
    assert memory.corrections.to_unlearn() == []
    assert memory.corrections.retract(mine, "ann").retracted_at == retracted.retracted_at  # twice is harmless


def test_shared_memories_are_retracted_by_an_admin_only(memory):
    shared = memory.add_correction(Q, "Illinois Institute of Technology", user=None)
    with pytest.raises(NotAllowed):
        memory.corrections.retract(shared, "ann")
    assert len(memory.search(Q, user="ann")) == 1
    assert memory.corrections.retract(shared, "root", admin=True).retracted_by == "admin:root"
    assert memory.search(Q, user="ann") == []


def test_retracting_the_newest_correction_brings_back_the_one_before(memory):
    memory.add_correction(Q, "Harvard", user="ann")
    newest = memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    memory.corrections.retract(newest, "ann")
    assert [h.correction.answer for h in memory.search(Q, user="ann")] == ["Harvard"]


# -- newest wins, duplicates merge, bounded prompts -------------------------------------------
def test_the_newest_correction_wins_across_wordings_and_scopes(memory):
    memory.add_correction(Q, "Harvard", user=None)  # an older shared correction
    memory.add_correction("what university did watts humphrey attend", "Yale", user="ann")
    memory.add_correction("Which university did Watts Humphrey attend?", "Illinois Institute of Technology", user="ann")
    hits = memory.search(PARAPHRASE, user="ann")
    assert [h.correction.answer for h in hits] == ["Illinois Institute of Technology"]
    assert [h.correction.answer for h in memory.search(PARAPHRASE, user="bob")] == ["Harvard"]


def test_duplicate_corrections_are_merged(memory):
    first = memory.add_correction(Q, "Illinois Institute of Technology", user="ann")
    assert memory.add_correction(Q.lower(), "illinois institute of technology", user="ann") == first
    assert memory.add_correction("Which university did Watts Humphrey attend?", "Illinois Institute of Technology",
                                 user="ann") == first  # near-identical wording, same answer
    rid = answer(memory, Q, user="ann")
    memory.record_feedback(rid, -1, correction="Illinois Institute of Technology")
    assert memory.db["feedback"].count == 1  # the feedback itself is kept
    assert memory.db["memories"].count == 1 and memory.corrections.get(first, "ann").merged == 3
    assert len(memory.index) == 1
    assert memory.add_correction(Q, "Illinois Institute of Technology", user="bob") != first  # another scope


def test_what_goes_into_the_prompt_is_bounded(memory):
    for i, subject in enumerate(["Watts Humphrey", "Watts Humphreys", "Walt Humphrey", "Watt Humphrey"]):
        memory.add_correction(f"What university did {subject} attend?", f"University {i}", user="ann")
    assert len(memory.search(Q, user="ann", k=2, threshold=0.5)) == 2
    hits = memory.search(Q, user="ann", k=3, threshold=0.5, max_chars=60)
    assert len(hits) == 1  # the first always fits; the rest would pass 60 characters


def faiss_exact(m: Memory, records: list[dict]) -> list[list[int]]:
    """The top-1 ids that an exact scan over the stored embeddings gives (for the same threshold)."""
    import numpy as np

    rows = list(m.db.query("select id, embedding from memories where retracted_at is null"))
    ids = np.array([r["id"] for r in rows])
    matrix = np.vstack([np.frombuffer(r["embedding"], np.float32) for r in rows])
    out = []
    for r in records:
        scores = matrix @ m.embedder.embed([r["paraphrase"]])[0]
        best = int(scores.argmax())
        out.append([int(ids[best])] if scores[best] >= RELEVANCE_THRESHOLD else [])
    return out


# -- the index past its exact-search size ------------------------------------------------------
def test_past_the_size_threshold_the_index_is_approximate_and_still_exact_enough(tmp_path, embedder):
    import json

    from tests.conftest import ZSRE

    records = [json.loads(line) for line in ZSRE.open()][:300]
    m = Memory(tmp_path, embedder=embedder, approx_from=200, nprobe=4)
    for r in records[:150]:
        m.add_correction(r["question"], r["answer"], user=None)
    assert m.index.scope(None).kind == "flat"
    for r in records[150:]:
        m.add_correction(r["question"], r["answer"], user=None)
    assert m.index.scope(None).kind == "ivf"
    # zsRE words some facts several ways with the same answer: those merge into one memory
    rows = list(m.db["memories"].rows)
    assert len(m.index) == len(rows) < 300 and len(rows) + sum(r["merged"] for r in rows) == 300
    exact = faiss_exact(m, records[:100])
    found = [[h.correction.id for h in m.search(r["paraphrase"], user="ann", k=1)] for r in records[:100]]
    assert sum(f == e for f, e in zip(found, exact)) >= 90  # 4 of 5 lists probed
    gone = m.search(records[0]["question"], user="ann")[0].correction.id
    m.corrections.retract(gone, "root", admin=True)
    assert gone not in m.index.scope(None).ids()
    m.close()
    m = Memory(tmp_path, embedder=embedder, approx_from=200, nprobe=4)
    assert m.index.scope(None).kind == "ivf" and gone not in m.index.scope(None).ids()
    m.close()


# -- durability -------------------------------------------------------------------------------
WRITER = """
import sys
import memory.sync
from memory import Memory
from tests.fakes import HashEmbedder

memory.sync.SAVE_EVERY_SECONDS = 0.0  # write the index files all the time: a kill may land mid-write
m = Memory(sys.argv[1], embedder=HashEmbedder())
for i in range(100000):
    user = f"u{i % 3}"
    memory_id = m.add_correction(f"question {i}?", f"answer {i}", user=user)
    if i % 7 == 0:
        m.corrections.retract(memory_id, user)
    print(memory_id, i, flush=True)
"""


def test_every_acknowledged_write_survives_a_kill_and_the_index_agrees(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from tests.fakes import HashEmbedder

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(root)})
    acked = []
    for line in proc.stdout:
        acked.append(tuple(int(x) for x in line.split()))
        if len(acked) == 400:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    m = Memory(tmp_path, embedder=HashEmbedder())
    rows = {r["id"]: r for r in m.db["memories"].rows}
    for memory_id, i in acked:
        assert rows[memory_id]["answer"] == f"answer {i}"
        assert (rows[memory_id]["retracted_at"] is not None) == (i % 7 == 0)
    for user in ("u0", "u1", "u2"):
        live = {r["id"] for r in rows.values() if r["user"] == user and r["retracted_at"] is None}
        assert m.index.scope(user).ids() == live
    memory_id, i = acked[-1] if acked[-1][1] % 7 else acked[-2]
    assert m.search(f"question {i}?", user=f"u{i % 3}")[0].correction.id == memory_id
    m.close()


def test_a_skeleton_database_is_migrated_in_place(tmp_path, embedder):
    import sqlite_utils

    from memory.migrations import m001_initial

    db = sqlite_utils.Database(tmp_path / "ratchet.db")
    db["_migrations"].create({"name": str, "applied_at": str}, pk="name")
    m001_initial(db)
    db["_migrations"].insert({"name": "m001_initial", "applied_at": "2026"})
    db["memories"].insert({"kind": "correction", "user": "ann", "question": "What university did Watts Humphrey "
                           "attend?", "answer": "Illinois Institute of Technology", "created_at": "2026"})
    db.conn.close()
    m = Memory(tmp_path, embedder=embedder)
    assert m.corrections.get(1, "ann").answer == "Illinois Institute of Technology"
    assert m.db["memories"].get(1)["question_key"] == "what university did watts humphrey attend"
    assert m.search(PARAPHRASE, user="ann")[0].correction.id == 1
    m.close()


def test_the_shared_connection_takes_concurrent_queries_and_writes(tmp_path):
    import threading

    from memory.db import atomic, open_db

    db = open_db(tmp_path / "c.db")
    db["t"].insert({"id": 0, "n": 0}, pk="id")
    errors = []

    def reader():
        try:
            for _ in range(300):
                assert list(db.query("select count(*) as c from t"))[0]["c"] >= 1
        except Exception as e:  # "no such savepoint: sqlite_utils_query" before the lock
            errors.append(e)

    def writer():
        for i in range(1, 200):
            with atomic(db):
                db["t"].insert({"id": i, "n": i})

    threads = [threading.Thread(target=reader) for _ in range(6)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and db["t"].count == 200


def test_search_keeps_only_hits_the_matcher_takes_for_the_same_question(memory):
    import numpy as np

    class Matcher:
        def probability(self, query, questions):
            self.asked = (query, list(questions))
            return np.array([0.9 if "attend" in q else 0.2 for q in questions])

    memory.add_correction("What university did Watts Humphrey attend?", "IIT", user="ann")
    memory.add_correction("Where was Watts Humphrey born?", "Battle Creek", user="ann")
    query = "Which university did Watts Humphrey attend?"
    everything = memory.search(query, "ann", threshold=0.3)
    assert len(everything) == 2 and all(h.same is None for h in everything)
    memory.corrections.matcher = Matcher()
    assert len(memory.search(query, "ann", threshold=0.3)) == 2  # no same_at: the matcher is not asked
    hits = memory.search(query, "ann", threshold=0.3, same_at=0.5)
    assert [h.correction.answer for h in hits] == ["IIT"] and hits[0].same == 0.9
    assert memory.corrections.matcher.asked[0] == query
