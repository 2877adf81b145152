import numpy as np
import pytest

TEXTS = ["What university did Watts Humphrey attend?", "Which family does Ramalinaceae belong to?",
         "Who played desmond doss father in hacksaw ridge?", "x"]


def test_the_embedder_caches_queries_on_their_normalised_text(embedder):
    assert embedder.backend == "onnx"
    a = embedder.embed([TEXTS[0]])
    b = embedder.embed(["  what UNIVERSITY did watts humphrey   attend?"])
    assert np.array_equal(a, b)
    v = embedder.embed(TEXTS)
    assert v.shape == (4, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embedder.embed(TEXTS[::-1])[::-1], v)  # batch order and padding change nothing


@pytest.mark.slow
def test_the_onnx_export_gives_the_vectors_of_sentence_transformers(embedder):
    from memory.embed import Embedder

    torch_vectors = Embedder(backend="torch").embed_uncached(TEXTS)
    cosine = (embedder.embed_uncached(TEXTS) * torch_vectors).sum(1)
    assert cosine.min() > 0.9999
