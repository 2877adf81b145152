"""Interactions and feedback: every answer, keyed by the response id the client received, and
what users said about it (thumbs, comments, corrections)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from memory.db import atomic, now


class UnknownResponse(KeyError):
    """Feedback named a response id that Ratchet never gave."""


class Interactions:
    def __init__(self, db):
        self.db = db

    def record(self, **fields: Any) -> str:
        """Store one answer (committed when this returns); `id` is its response id."""
        row = dict(fields)
        for key in ("messages", "memory_ids"):
            if key in row and not isinstance(row[key], str):
                row[key] = json.dumps(row[key])
        row.setdefault("created_at", now())
        with atomic(self.db):
            self.db["interactions"].insert(row)
        return row["id"]

    def get(self, response_id: str) -> dict | None:
        rows = list(self.db["interactions"].rows_where("id = ?", [response_id]))
        return rows[0] if rows else None

    def add_feedback(self, response_id: str, user: str, rating: int, comment: str | None = None,
                     correction: str | None = None) -> int:
        """Insert a feedback row; call inside the transaction that also stores its correction, if any."""
        return self.db["feedback"].insert(
            {"response_id": response_id, "user": user, "rating": rating, "comment": comment,
             "correction": correction, "created_at": now()}
        ).last_pk

    def previous(self, row: dict, window_seconds: float) -> dict | None:
        """The same user's answer just before `row` (in the same thread, if any), within the window."""
        since = (dt.datetime.fromisoformat(row["created_at"]) - dt.timedelta(seconds=window_seconds)).isoformat()
        thread = "and thread_id is ?" if row["thread_id"] else ""
        params = [row["user"], row["id"], since, row["created_at"]] + ([row["thread_id"]] if row["thread_id"] else [])
        rows = list(self.db.query(
            f"select * from interactions where user is ? and id != ? and created_at >= ? and created_at <= ?"
            f" and error is null {thread} order by created_at desc limit 1", params,
        ))
        return rows[0] if rows else None
