import sqlite3

import pytest

from memory import Memory
from memory.migrations import MIGRATIONS
from memory.store import UnknownResponse

Q = "What university did Watts Humphrey attend?"
PARAPHRASE = "What university did Watts Humphrey take part in?"
UNRELATED = "Who played desmond doss father in hacksaw ridge?"


def answer(memory: Memory, question: str, user: str = "ann", rid: str = "r1") -> str:
    return memory.record_interaction(id=rid, user=user, prompt=question, response="Berkeley", messages=[])


def test_migrations_are_recorded_once(memory):
    names = [r["name"] for r in memory.db["_migrations"].rows]
    assert names == [fn.__name__ for fn in MIGRATIONS]
    from memory.migrations import migrate

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
    assert [c.answer for c in memory.corrections()] == ["Illinois Institute of Technology"]


def test_the_index_is_rebuilt_when_its_file_is_deleted(tmp_path, embedder):
    m = Memory(tmp_path, embedder=embedder)
    m.add_correction(Q, "Illinois Institute of Technology")
    m.add_correction("Which family does Ramalinaceae belong to?", "Lecanorales")
    m.close()
    (tmp_path / "memories.faiss").unlink()
    m = Memory(tmp_path, embedder=embedder)
    assert len(m.index) == 2
    assert m.search(PARAPHRASE, user="local")[0].correction.answer == "Illinois Institute of Technology"
    assert m.rebuild_index() == 2
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
    memory.mark_consolidated([a], cycle_id=7)
    pending = memory.corrections(include_consolidated=False)
    assert [c.answer for c in pending] == ["Lecanorales"]
