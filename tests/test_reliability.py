"""Reliability under faults (issue 20), on a real server process: a few trials of each scenario of
evals/reliability.py, which runs the full count (`python -m evals.reliability --trials 20`)."""

from __future__ import annotations

import os

import pytest

from evals.reliability import chats_through_swaps, kill_during_consolidation, kill_during_writes

TRIALS = int(os.environ.get("RATCHET_TRIALS", "3"))  # kill -9 trials per scenario (the benchmark: 20)


@pytest.mark.slow
def test_no_acknowledged_write_is_lost_when_ratchet_serve_is_killed(tmp_path, tiny_model):
    figures = kill_during_writes(TRIALS, tiny_model, tmp_path)
    assert figures.trials == TRIALS and figures.acknowledged_writes > TRIALS * 5, figures
    assert figures.lost_writes == 0 and figures.resurrected_retractions == 0, figures.notes
    assert figures.index_disagreements == 0, figures.notes
    assert figures.server_errors == 0, figures


@pytest.mark.slow
def test_a_kill_during_consolidation_leaves_the_active_adapter_whole_and_served(tmp_path, tiny_model):
    figures = kill_during_consolidation(TRIALS, tiny_model, tmp_path)
    assert figures.trials == TRIALS, figures
    assert figures.bad_adapters == 0 and figures.active_not_served == 0, figures.notes
    assert figures.server_errors == 0, figures


@pytest.mark.slow
def test_32_concurrent_chats_never_fail_through_a_consolidation_a_promotion_and_a_rollback(tmp_path, tiny_model):
    figures = chats_through_swaps(tiny_model, tmp_path, clients=32, rounds=1)
    assert figures.requests >= 32, figures
    assert figures.failed_requests == 0 and figures.server_errors == 0, figures.notes[:10]
    assert not [n for n in figures.notes if n.startswith(("cycle", "rollback", "activation"))], figures.notes
