"""The memory's tables: interactions, feedback, memories, failures (declared in memory.db's list).

A shipped migration is never edited; a change is a new function appended below.
"""

from __future__ import annotations

import sqlite_utils

from memory.db import migration


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    # Every chat response, keyed by the response id the client receives.
    db["interactions"].create(
        {
            "id": str,
            "thread_id": str,
            "user": str,
            "model": str,
            "adapter": str,
            "prompt": str,  # the last user message
            "messages": str,  # JSON: the messages sent to the engine
            "response": str,
            "memory_ids": str,  # JSON list of retrieved memory ids
            "use_memory": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_ms": float,
            "created_at": str,
        },
        pk="id",
    )
    db["interactions"].create_index(["user"])
    db["feedback"].create(
        {
            "id": int,
            "response_id": str,
            "user": str,
            "rating": int,
            "comment": str,
            "correction": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("response_id", "interactions", "id")],
    )
    # Lessons that retrieval puts into prompts and consolidation puts into weights.
    db["memories"].create(
        {
            "id": int,
            "kind": str,  # "correction" | "lesson"
            "user": str,  # None: shared with everyone
            "question": str,
            "answer": str,
            "feedback_id": int,
            "response_id": str,
            "created_at": str,
            "retracted_at": str,
            "consolidated_in": int,  # cycle id that trained it into an adapter
        },
        pk="id",
    )
    db["memories"].create_index(["user"])
    # cycles and adapters were created here too until they moved to trainer/migrations.py.


@migration
def m003_memory_scopes(db: sqlite_utils.Database) -> None:
    """Memories keep their embedding (so the index is rebuilt without re-embedding), a normalised
    question key (newest-wins and merging look it up), who retracted them, how many duplicates were
    merged into them, and whether a consolidation has unlearnt their retraction. Failures that come
    without feedback get their own table; an interaction that failed keeps its error."""
    memories = db["memories"]
    memories.add_column("question_key", str)
    memories.add_column("embedding", bytes)
    memories.add_column("embedder", str)
    memories.add_column("source", str)  # feedback | direct | failure
    memories.add_column("merged", int, not_null_default=0)  # duplicates merged into this one
    memories.add_column("updated_at", str)
    memories.add_column("retracted_by", str)
    memories.add_column("retraction_consolidated_in", int)  # cycle that unlearnt it after retraction
    for row in list(db.query("select id, question from memories")):
        key = " ".join((row["question"] or "").lower().split()).rstrip("?.! ")
        db.execute("update memories set question_key = ? where id = ?", [key, row["id"]])
    memories.create_index(["question_key"])
    memories.create_index(["retracted_at"])
    db["interactions"].add_column("error", str)
    db["interactions"].create_index(["user", "created_at"])
    db["failures"].create(
        {
            "id": int,
            "kind": str,  # engine_error | timeout | abstention | contradiction | repeat
            "response_id": str,  # the interaction that failed
            "user": str,
            "detail": str,
            "created_at": str,
            "lesson_id": int,  # the memory made from it, once it is turned into a lesson
        },
        pk="id",
        foreign_keys=[("response_id", "interactions", "id")],
    )
    db["failures"].create_index(["kind"])
    db["failures"].create_index(["response_id"])


@migration
def m004_memory_confirmation(db: sqlite_utils.Database) -> None:
    """An admin may confirm a correction from an untrusted user, so it enters the shared adapter."""
    db["memories"].add_column("confirmed_at", str)
    db["memories"].add_column("confirmed_by", str)


@migration
def m005_question_keys_normalised(db: sqlite_utils.Database) -> None:
    """Question keys in memory.text's one normal form (punctuation and NFKC folded too)."""
    from memory.text import question_key

    for row in list(db.query("select id, question from memories")):
        db.execute("update memories set question_key = ? where id = ?", [question_key(row["question"] or ""), row["id"]])
