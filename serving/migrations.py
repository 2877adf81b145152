"""Serving's tables: API keys (declared in memory.db's list).

A shipped migration is never edited; a change is a new function appended below.
"""

from __future__ import annotations

import sqlite_utils

from memory.db import migration


@migration
def m002_api_keys(db: sqlite_utils.Database) -> None:
    # API keys: only a sha256 of the token is kept; the token is shown once, when it is made.
    db["api_keys"].create(
        {
            "id": int,
            "hash": str,  # sha256 hex of the whole token
            "prefix": str,  # the token's first characters, to tell keys apart in listings
            "user": str,  # the user a chat/feedback key speaks for; admin keys may have one too
            "role": str,  # "user" | "admin"
            "created_at": str,
            "revoked_at": str,
        },
        pk="id",
    )
    db["api_keys"].create_index(["hash"], unique=True)

