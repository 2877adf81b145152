"""The trainer's tables: consolidation cycles and adapter versions (declared in memory.db's list).

A shipped migration is never edited; a change is a new function appended below.
"""

from __future__ import annotations

import sqlite_utils

from memory.db import migration


@migration
def trainer_001_cycles_and_adapters(db: sqlite_utils.Database) -> None:
    """Databases made before the tables moved here have them already (memory's m001_initial made them)."""
    db["cycles"].create(
        {
            "id": int,
            "status": str,  # queued | running | succeeded | rejected | failed
            "trigger": str,
            "created_at": str,
            "started_at": str,
            "finished_at": str,
            "adapter_version": int,
            "n_corrections": int,
            "n_examples": int,
            "progress": float,
            "message": str,
            "metrics": str,  # JSON
        },
        pk="id",
        if_not_exists=True,
    )
    db["adapters"].create(
        {
            "version": int,
            "name": str,  # the name engines serve it under, e.g. ratchet-v3
            "path": str,
            "parent": int,
            "cycle_id": int,
            "status": str,  # candidate | promoted | rejected
            "active": int,
            "created_at": str,
            "metrics": str,  # JSON
        },
        pk="version",
        if_not_exists=True,
    )
