import pytest
from typer.testing import CliRunner

from serving.api import create_app
from serving.cli import app
from serving.service import Ratchet
from serving.settings import Settings
from trainer.cycle import CycleConfig
from trainer.lora import TrainingConfig

runner = CliRunner()


@pytest.fixture
def server(tmp_path, tiny_model, echo_model, live_server):
    settings = Settings(data_dir=tmp_path, model=tiny_model,
                        cycle=CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False,
                                          gate_enabled=False))
    r = Ratchet(settings, engine=echo_model)
    r.start()
    with live_server(create_app(r)) as s:
        yield s
    r.stop()


def test_chat_correct_consolidate_and_list_adapters(server):
    url = ["--url", server.url]
    r = runner.invoke(app, ["chat", "What university did Watts Humphrey attend?", *url])
    assert r.exit_code == 0, r.output
    assert "I do not know" in r.stdout
    response_id = next(w for w in r.output.split() if w.startswith("chatcmpl-"))
    r = runner.invoke(app, ["feedback", response_id, "--correction", "Illinois Institute of Technology", *url])
    assert r.exit_code == 0 and "recorded with a correction" in r.stdout
    r = runner.invoke(app, ["chat", "What university did Watts Humphrey take part in?", *url])
    assert "Illinois Institute of Technology" in r.stdout and "1 correction(s) from memory" in r.output
    r = runner.invoke(app, ["consolidate", *url])
    assert r.exit_code == 0, r.output
    assert "succeeded: promoted ratchet-v1" in r.stdout
    r = runner.invoke(app, ["adapters", *url])
    assert "ratchet-v1" in r.stdout and "promoted" in r.stdout


def test_feedback_on_an_unknown_id_fails_clearly(server):
    r = runner.invoke(app, ["feedback", "chatcmpl-nope", "--url", server.url])
    assert r.exit_code == 1 and "404" in r.output


def test_an_unreachable_server_is_named():
    r = runner.invoke(app, ["adapters", "--url", "http://127.0.0.1:9"])
    assert r.exit_code == 1 and "is `ratchet serve` running?" in r.output


def test_serve_refuses_a_public_address_without_api_keys(tmp_path):
    r = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "loopback" in r.output
