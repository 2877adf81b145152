"""Opening the database: WAL, foreign keys, migrations."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from pathlib import Path

import sqlite_utils

from memory.migrations import migrate


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class _Database(sqlite_utils.Database):
    def query(self, sql, params=None):
        # sqlite-utils wraps each query in a SAVEPOINT; two threads' queries on the shared
        # connection interleave them ("no such savepoint: sqlite_utils_query", seen at 8 concurrent
        # chats). So a query takes the lock and returns its rows at once.
        with self.write_lock:
            return iter(list(super().query(sql, params)))


def open_db(path: str | Path) -> sqlite_utils.Database:
    """Open (creating and migrating) the Ratchet database at `path`.

    The connection may be shared across threads: writes go through `atomic(db)`, which
    serialises them and commits before it returns; `query` takes the same lock (see _Database);
    WAL lets other connections read beside them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    db = _Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it is acknowledged, even if the machine loses power.
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.write_lock = threading.RLock()
    with atomic(db):
        migrate(db)
    return db


@contextlib.contextmanager
def atomic(db: sqlite_utils.Database):
    """One transaction, committed when the block ends (or rolled back), one writer at a time."""
    with db.write_lock, db.atomic():
        yield db
