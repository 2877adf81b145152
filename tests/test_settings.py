"""Settings: every documented RATCHET_* variable is honoured, and a command-line option wins over it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from evals.server import free_port
from serving.settings import Settings

ENV = {
    "RATCHET_DATA_DIR": ("data_dir", "/srv/ratchet-data", Path("/srv/ratchet-data")),
    "RATCHET_MODEL": ("model", "HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    "RATCHET_MODELS_DIR": ("models_dir", "/srv/models", Path("/srv/models")),
    "RATCHET_ENGINE": ("engine", "transformers", "transformers"),
    "RATCHET_HOST": ("host", "127.0.0.2", "127.0.0.2"),
    "RATCHET_PORT": ("port", "8123", 8123),
    "RATCHET_MEMORY_THRESHOLD": ("memory_threshold", "0.8", 0.8),
    "RATCHET_ADAPTER_SCOPE": ("adapter_scope", "off", 0.0),
    "RATCHET_TRUSTED_USERS": ("trusted_users", "ann, bob", ("ann", "bob")),
    "RATCHET_MERGED_LANE": ("merged_lane", "1", True),
    "RATCHET_REPORTS_DIR": ("reports_dir", "/srv/reports", Path("/srv/reports")),
}


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*ENV, "RATCHET_CONSOLIDATE_EVERY", "RATCHET_CONSOLIDATE_AFTER", "RATCHET_ANCHOR_PROMPTS",
                 "RATCHET_REPLAY_PASSES"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("variable", sorted(ENV))
def test_each_variable_is_honoured_when_the_command_leaves_its_option_unset(clean_env, variable):
    field, raw, expected = ENV[variable]
    clean_env.setenv(variable, raw)
    # `ratchet serve` passes every option it has, None when not given on the command line.
    settings = Settings.load(engine=None, host=None, port=None, data_dir=None, model=None,
                             consolidate_every=None, consolidate_after=None)
    assert getattr(settings, field) == expected


def test_replay_passes_set_how_often_a_cycle_replays_earlier_corrections(clean_env):
    assert Settings.load().cycle.training.replay_passes is None  # every epoch
    clean_env.setenv("RATCHET_REPLAY_PASSES", "1")
    assert Settings.load().cycle.training.replay_passes == 1
    clean_env.setenv("RATCHET_REPLAY_PASSES", "9")
    with pytest.raises(ValueError, match="replay_passes must be between 1 and epochs"):
        Settings.load()


def test_an_option_wins_over_its_variable(clean_env, tmp_path):
    clean_env.setenv("RATCHET_PORT", "8123")
    clean_env.setenv("RATCHET_DATA_DIR", str(tmp_path / "from-env"))
    clean_env.setenv("RATCHET_CONSOLIDATE_AFTER", "20")
    settings = Settings.load(port=9000, data_dir=tmp_path / "from-option", consolidate_after=5)
    assert settings.port == 9000 and settings.data_dir == tmp_path / "from-option"
    assert settings.schedule.after_corrections == 5
    assert Settings.load().schedule.after_corrections == 20


def test_the_embedder_folder_follows_ratchet_models_dir(clean_env, tmp_path):
    clean_env.setenv("RATCHET_MODELS_DIR", str(tmp_path))
    assert Settings.load().embedder_dir == tmp_path


def _serve(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _health(port: int, proc: subprocess.Popen, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ratchet serve exited: {proc.stdout.read().decode(errors='replace')[-3000:]}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("ratchet serve did not answer /health")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_ratchet_serve_reads_the_documented_variables_and_its_options_win(tiny_model, tmp_path, embedder):
    env = {"RATCHET_ENGINE": "transformers", "RATCHET_MODEL": tiny_model, "RATCHET_HOST": "127.0.0.1",
           "RATCHET_PORT": str(free_port()), "RATCHET_DATA_DIR": str(tmp_path / "env-data")}
    proc = _serve(env)
    try:
        assert _health(int(env["RATCHET_PORT"]), proc)["engine"] == "transformers"
        assert (tmp_path / "env-data" / "ratchet.db").exists()
    finally:
        _stop(proc)
    port = free_port()
    proc = _serve(env, "--port", str(port), "--data-dir", str(tmp_path / "option-data"))
    try:
        assert _health(port, proc)["engine"] == "transformers"
        assert (tmp_path / "option-data" / "ratchet.db").exists()
    finally:
        _stop(proc)


@pytest.mark.parametrize("bad", [{"engine": "tgi"}, {"port": 70000}, {"memory_threshold": 1.5},
                                 {"adapter_scope": -0.1}, {"max_tokens": 0}, {"memory_k": -1}])
def test_settings_refuse_values_that_cannot_work(tmp_path, bad):
    with pytest.raises(ValueError, match="Ratchet settings: "):
        Settings(data_dir=tmp_path, **bad)
