"""The SQLite database: its one connection's settings, transactions, and the ordered list of
schema migrations (the simonw/llm pattern).

Each package declares the migrations of its own tables with `@migration` in its own
`migrations` module (memory: interactions, feedback, memories, failures; trainer: cycles,
adapters; serving: api keys), and no package writes SQL against another's tables. A store that
owns tables calls `migrate(db)` when it is made, so its tables exist whatever opened the file.
A shipped migration is never edited; a change is a new function.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from pathlib import Path
from typing import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
# Every package's migrations in the order they were declared (memory's first: this module imports them).
MIGRATIONS: list[Migration] = []


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def migration(fn: Migration) -> Migration:
    """Declare a schema change; its function name is its identity in the `_migrations` table."""
    if any(m.__name__ == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"a migration named {fn.__name__} is declared already")
    MIGRATIONS.append(fn)
    return fn


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the declared migrations not yet applied, in order; returns the names applied now."""
    with atomic(db):
        db["_migrations"].create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
        done = {row["name"] for row in db["_migrations"].rows}
        applied = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            fn(db)
            db["_migrations"].insert({"name": fn.__name__, "applied_at": now()})
            applied.append(fn.__name__)
    return applied


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
    migrate(db)
    return db


@contextlib.contextmanager
def atomic(db: sqlite_utils.Database):
    """One transaction, committed when the block ends (or rolled back), one writer at a time."""
    with db.write_lock, db.atomic():
        yield db


from memory import migrations as _memory_tables  # noqa: E402,F401  (declares memory's tables first)
