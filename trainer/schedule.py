"""When consolidation runs by itself: on a schedule (an interval or a cron line, APScheduler)
and after N new corrections. Either way through `Cycles.submit`, and never while one waits."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from trainer.cycle import Cycles

log = logging.getLogger("ratchet.schedule")

_INTERVAL = re.compile(r"^(\d+)\s*([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class ScheduleConfig:
    """When cycles start by themselves; neither field set: only when asked."""

    every: str | None = None  # "30m", "6h", "1d", or a cron line "0 3 * * *"; None: no schedule
    after_corrections: int | None = None  # a cycle once this many corrections wait; None: never

    def __post_init__(self):
        if self.every:
            try:
                parse_every(self.every)  # fail at start, not at the first tick
            except ValueError as e:
                raise ValueError(f"every: {e}") from e
        if self.after_corrections is not None and self.after_corrections < 1:
            raise ValueError(f"after_corrections must be at least 1, or None for never (got {self.after_corrections}): "
                             "0 would start cycles with nothing to learn")


def parse_every(every: str):
    """An APScheduler trigger for `every`; ValueError with the accepted forms otherwise."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    m = _INTERVAL.match(every.strip())
    if m:
        seconds = int(m.group(1)) * _SECONDS[m.group(2)]
        if seconds <= 0:
            raise ValueError("the interval must be positive")
        return IntervalTrigger(seconds=seconds)
    try:
        return CronTrigger.from_crontab(every)
    except ValueError as e:
        raise ValueError(f"{every!r} is neither an interval (30m, 6h, 1d) nor a cron line (0 3 * * *): {e}") from e


class Schedule:
    def __init__(self, cycles: Cycles, config: ScheduleConfig):
        self.cycles = cycles
        self.config = config
        self._scheduler = None
        self._lock = threading.Lock()  # check-then-submit is one step
        self._waiting: int | None = None  # corrections waiting, at most (None: not counted yet)

    def start(self) -> None:
        if not self.config.every:
            return
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(lambda: self.submit_if_idle("schedule"), parse_every(self.config.every),
                                id="consolidate", max_instances=1, coalesce=True)
        self._scheduler.start()
        log.info("consolidation scheduled: %s", self.config.every)

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def next_run(self) -> str | None:
        job = self._scheduler.get_job("consolidate") if self._scheduler else None
        return job.next_run_time.isoformat() if job and job.next_run_time else None

    def submit_if_idle(self, trigger: str) -> int | None:
        """Queue a cycle unless one is queued or running, or nothing new waits."""
        with self._lock:
            if self.cycles.busy() or not self.cycles.pending():
                return None
            return self.cycles.submit(trigger=trigger)

    def on_correction(self) -> int | None:
        """Called after each new correction: a cycle once enough of them wait."""
        n = self.config.after_corrections
        if n is None:
            return None
        with self._lock:
            # Counting the corrections that wait reads them all; it is done again only once as many
            # new ones have come as could make a cycle due (an upper bound: some may not be admitted).
            self._waiting = len(self.cycles.pending()) if self._waiting is None else self._waiting + 1
            if self._waiting < n:
                return None
            self._waiting = len(self.cycles.pending())
            if self._waiting < n or self.cycles.busy():
                return None
            self._waiting = None  # the cycle takes them: counted afresh next time
            return self.cycles.submit(trigger=f"after {n} corrections")
