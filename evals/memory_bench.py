"""Memory at 10k, 100k and 1M entries: embed + search latency, recall@5 against exact search,
build time and RAM for the index Ratchet uses (exact below `APPROX_FROM`, IVF-Flat above), HNSW
for comparison, and LangGraph's SqliteStore semantic search on the same data in the same run.

Run (under the machine's heavy-job lock): python -m evals.memory_bench [--sizes 10000,100000,1000000]
Writes reports/memory.json, reports/memory.md and reports/memory.png.

The corpus. Embedding a million real sentences with MiniLM would take hours on 2 cores, so the
~7.5k distinct real zsRE questions (the facts that get corrected) and NQ questions (the
`locality_question`s) are embedded once, and the rest of the corpus is made of their mixtures:
v = normalise(a + w·b + e) for random real vectors a, b, w ~ U(0.5, 1) and e ~ N(0, 0.3²/d),
so every synthetic vector lies among real sentence embeddings (cosine ~0.7-0.8 to its parents)
and the corpus has the dense, clustered neighbourhoods that make approximate search hard. The
queries are the real zsRE paraphrases; their own questions are in every corpus. Query embedding
is measured on their real text, one query at a time, with the query cache off.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import psutil

from evals.zsre_data import ROOT, embed_cached, records
from memory.embed import Embedder
from memory.index import APPROX_FROM, NPROBE, build_ivf

REPORTS = ROOT / "reports"
N_QUERIES = 1000  # for recall@5
N_TIMED = 300  # one at a time, for latency
K = 5


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def timed_ms(fn, items) -> list[float]:
    out = []
    for item in items:
        started = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - started) * 1000)
    return out


def corpus(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` vectors: the real ones first, then mixtures of random pairs of them (see the module doc)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), np.float32)
    m = min(n, len(real))
    out[:m] = real[:m]
    d = real.shape[1]
    for start in range(m, n, 100_000):
        stop = min(n, start + 100_000)
        size = stop - start
        a = real[rng.integers(0, len(real), size)]
        b = real[rng.integers(0, len(real), size)]
        w = rng.uniform(0.5, 1.0, (size, 1)).astype(np.float32)
        v = a + w * b + rng.standard_normal((size, d)).astype(np.float32) * (0.3 / np.sqrt(d))
        out[start:stop] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def top1_agreement(found: np.ndarray, truth: np.ndarray) -> float:
    """How often the best match is the exact search's best match (what retrieval mostly uses)."""
    return float(np.mean([len(f) > 0 and f[0] == t[0] for f, t in zip(found, truth)]))


def index_bytes(index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def bench_sqlite_store(vectors: np.ndarray, query_texts: list[str], embedder: Embedder, truth: np.ndarray,
                       n_queries: int, workdir: Path) -> dict:
    """LangGraph's SqliteStore (sqlite-vec, brute force) over the same vectors; queries embedded by
    the same encoder through the store's `embed` hook, as a user of the store would."""
    import orjson
    import pysqlite3
    import sqlite_vec
    from langgraph.store.sqlite import SqliteStore

    path = workdir / f"store-{len(vectors)}.db"
    conn = pysqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    store = SqliteStore(conn, index={"dims": vectors.shape[1], "embed": lambda texts: embedder.embed_uncached(list(texts)).tolist(),
                                     "fields": ["text"]})
    store.setup()
    started = time.perf_counter()
    conn.execute("begin")
    for start in range(0, len(vectors), 50_000):
        chunk = range(start, min(len(vectors), start + 50_000))
        conn.executemany("insert into store (prefix, key, value, created_at, updated_at) values"
                         " ('memories', ?, ?, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
                         ((str(i), orjson.dumps({"text": f"memory {i}"})) for i in chunk))
        conn.executemany("insert into store_vectors (prefix, key, field_name, embedding) values ('memories', ?, 'text', ?)",
                         ((str(i), sqlite_vec.serialize_float32(vectors[i])) for i in chunk))
    conn.execute("commit")
    load_s = time.perf_counter() - started
    latencies, found = [], []
    for text in query_texts[:n_queries]:
        started = time.perf_counter()
        items = store.search(("memories",), query=text, limit=K)
        latencies.append((time.perf_counter() - started) * 1000)
        found.append([int(item.key) for item in items])
    conn.close()
    path.unlink(missing_ok=True)
    return {"load_s": round(load_s, 1), "queries": len(latencies), "p50_ms": round(pct(latencies, 50), 2),
            "p99_ms": round(pct(latencies, 99), 2), "recall_at_5": round(recall_at_k(found, truth[: len(found)]), 4)}


def bench_memory_path(vectors: np.ndarray, real_texts: list[str], query_texts: list[str], embedder: Embedder,
                      workdir: Path) -> dict:
    """The real path: the vectors as rows of Ratchet's SQLite (shared memories), the index built
    from SQLite when `Memory` opens, then `Memory.search` (embed, search, SQLite lookup, scoping,
    newest-wins) one query at a time."""
    import sqlite3

    from memory import Memory
    from memory.db import now

    folder = workdir / f"memory-{len(vectors)}"
    Memory(folder, embedder=embedder, open_index=False).close()  # the schema
    conn = sqlite3.connect(folder / "ratchet.db")
    stamp = now()
    texts = lambda i: real_texts[i] if i < len(real_texts) else f"synthetic memory {i}"  # noqa: E731
    started = time.perf_counter()
    for start in range(0, len(vectors), 50_000):
        conn.executemany(
            "insert into memories (kind, user, question, question_key, answer, embedding, embedder, created_at,"
            " updated_at, merged, source) values ('correction', null, ?, ?, 'an answer', ?, ?, ?, ?, 0, 'bench')",
            ((texts(i), texts(i).lower(), vectors[i].tobytes(), embedder.name, stamp, stamp)
             for i in range(start, min(len(vectors), start + 50_000))))
        conn.commit()
    insert_s = time.perf_counter() - started
    conn.close()
    started = time.perf_counter()
    m = Memory(folder, embedder=embedder)
    open_s = time.perf_counter() - started
    with embedder._lock:
        embedder._cache.clear()
    found = []
    ms = timed_ms(lambda t: found.append(m.search(t, user="bench", k=3)), query_texts[:N_TIMED])
    m.close()
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return {"insert_s": round(insert_s, 1), "open_and_build_index_s": round(open_s, 1),
            "p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
            "queries_with_a_hit": round(float(np.mean([bool(f) for f in found])), 4)}


def bench_size(n: int, real: np.ndarray, queries: np.ndarray, query_texts: list[str], embedder: Embedder,
               workdir: Path, hnsw_up_to: int, sqlite_queries: int, real_texts: list[str] | None = None) -> dict:
    print(f"== {n:,} memories", flush=True)
    result: dict = {"n": n}
    base_rss = rss_mb()
    vectors = corpus(real, n)
    ids = np.arange(n, dtype=np.int64)
    d = vectors.shape[1]

    # exact search: the ground truth, and Ratchet's index below APPROX_FROM
    faiss.omp_set_num_threads(2)
    started = time.perf_counter()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    flat.add_with_ids(vectors, ids)
    flat_build = time.perf_counter() - started
    _, truth = flat.search(queries[:N_QUERIES], K)
    faiss.omp_set_num_threads(1)
    n_flat_timed = N_TIMED if n <= 100_000 else 50
    flat_ms = timed_ms(lambda q: flat.search(q[None, :], K), queries[:n_flat_timed])
    result["exact"] = {"build_s": round(flat_build, 2), "p50_ms": round(pct(flat_ms, 50), 3),
                       "p99_ms": round(pct(flat_ms, 99), 3), "recall_at_5": 1.0, "index_mb": round(index_bytes(flat) / 2**20, 1)}
    print("  exact", result["exact"], flush=True)

    # IVF-Flat, as memory.index builds it, with an nprobe sweep
    faiss.omp_set_num_threads(2)
    before = rss_mb()
    started = time.perf_counter()
    ivf = build_ivf(ids, vectors, d)
    ivf_build = time.perf_counter() - started
    ivf_rss = rss_mb() - before
    faiss.omp_set_num_threads(1)
    sweep = {}
    for nprobe in (4, 8, 16, 24, 32, 48, 64):
        ivf.nprobe = nprobe
        _, found = ivf.search(queries[:N_QUERIES], K)
        ms = timed_ms(lambda q: ivf.search(q[None, :], K), queries[:N_TIMED])
        sweep[nprobe] = {"recall_at_5": round(recall_at_k(found, truth), 4),
                         "top1": round(top1_agreement(found, truth), 4), "p50_ms": round(pct(ms, 50), 3),
                         "p99_ms": round(pct(ms, 99), 3)}
    ivf.nprobe = NPROBE
    result["ivf"] = {"nlist": ivf.nlist, "nprobe": NPROBE, "build_s": round(ivf_build, 2),
                     "index_mb": round(index_bytes(ivf) / 2**20, 1), "rss_growth_mb": round(ivf_rss, 1),
                     **sweep[NPROBE], "sweep": sweep}
    print("  ivf", {k: v for k, v in result["ivf"].items() if k != "sweep"}, flush=True)

    # HNSW, for the choice (it cannot remove ids in place, and builds slowly)
    if n <= hnsw_up_to:
        faiss.omp_set_num_threads(2)
        started = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        hnsw.add(vectors)
        hnsw_build = time.perf_counter() - started
        hnsw.hnsw.efSearch = 64
        faiss.omp_set_num_threads(1)
        _, found = hnsw.search(queries[:N_QUERIES], K)
        ms = timed_ms(lambda q: hnsw.search(q[None, :], K), queries[:N_TIMED])
        result["hnsw"] = {"M": 32, "efConstruction": 40, "efSearch": 64, "build_s": round(hnsw_build, 2),
                          "index_mb": round(index_bytes(hnsw) / 2**20, 1),
                          "recall_at_5": round(recall_at_k(found, truth), 4),
                          "top1": round(top1_agreement(found, truth), 4), "p50_ms": round(pct(ms, 50), 3),
                          "p99_ms": round(pct(ms, 99), 3)}
        print("  hnsw", result["hnsw"], flush=True)
        del hnsw

    # end to end, as Memory.search does it: embed the real query text, then search the index
    # Ratchet would hold at this size (exact below APPROX_FROM, IVF above)
    index = flat if n < APPROX_FROM else ivf
    e2e = timed_ms(lambda text: index.search(embedder.embed_uncached([text]), K), query_texts[:N_TIMED])
    result["end_to_end"] = {"index": "exact" if n < APPROX_FROM else f"ivf nprobe={NPROBE}",
                            "p50_ms": round(pct(e2e, 50), 3), "p99_ms": round(pct(e2e, 99), 3),
                            "recall_at_5": 1.0 if n < APPROX_FROM else result["ivf"]["recall_at_5"],
                            "build_s": result["exact" if n < APPROX_FROM else "ivf"]["build_s"]}
    print("  end to end", result["end_to_end"], flush=True)
    result["process_rss_mb"] = round(rss_mb(), 1)
    result["corpus_mb"] = round(vectors.nbytes / 2**20, 1)
    del flat, ivf, index
    gc.collect()

    if real_texts is not None:
        result["memory_search"] = bench_memory_path(vectors, real_texts, query_texts, embedder, workdir)
        print("  Memory.search", result["memory_search"], flush=True)
        gc.collect()

    # LangGraph's SqliteStore on the same vectors
    faiss.omp_set_num_threads(2)
    try:
        result["sqlite_store"] = bench_sqlite_store(vectors, query_texts, embedder, truth, sqlite_queries, workdir)
        result["sqlite_store"]["ratio_p50"] = round(result["sqlite_store"]["p50_ms"] / result["end_to_end"]["p50_ms"], 1)
    except Exception as e:  # say exactly why, and go on
        result["sqlite_store"] = {"error": f"{type(e).__name__}: {e}"}
    print("  sqlite store", result["sqlite_store"], flush=True)
    result["rss_growth_mb"] = round(rss_mb() - base_rss, 1)
    del vectors
    gc.collect()
    return result


def write_reports(report: dict) -> None:
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "memory.json").write_text(json.dumps(report, indent=2))
    e = report["embedding"]
    lines = [
        "# Memory benchmark",
        "",
        f"`python -m evals.memory_bench` on {report['machine']}, {report['date']}. "
        f"Queries: {N_TIMED} real zsRE paraphrases one at a time (latency), {N_QUERIES} for recall@5 "
        "against exact search. Corpus: real zsRE/NQ question embeddings plus mixtures of them (see the module doc).",
        "",
        "## End to end (embed + search), Ratchet's index",
        "",
        "| memories | index | p50 ms | p99 ms | recall@5 | build s | index MB | process RSS MB | SqliteStore p50 ms | SqliteStore ÷ Ratchet (p50) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["sizes"]:
        x, s = r["end_to_end"], r["sqlite_store"]
        mb = r["exact"]["index_mb"] if x["index"] == "exact" else r["ivf"]["index_mb"]
        lines.append(f"| {r['n']:,} | {x['index']} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {x['recall_at_5']:.3f} | "
                     f"{x['build_s']:.1f} | {mb:.0f} | {r['process_rss_mb']:.0f} | "
                     f"{s.get('p50_ms', 'n/a')} | {str(s.get('ratio_p50', s.get('error', 'n/a'))) + '×' if 'ratio_p50' in s else s.get('error')} |")
    lines += [
        "",
        f"Query embedding alone (MiniLM-L6, one query, cache off): ONNX Runtime p50 {e['onnx_p50_ms']:.2f} ms / "
        f"p99 {e['onnx_p99_ms']:.2f} ms; sentence-transformers on torch p50 {e['torch_p50_ms']:.2f} ms / "
        f"p99 {e['torch_p99_ms']:.2f} ms; cosine between the two: min {e['cosine_min']:.6f}. "
        f"A cached query: p50 {e['cached_p50_ms']:.4f} ms.",
        "",
        "## Search alone, by index",
        "",
        "| memories | index | build s | p50 ms | p99 ms | recall@5 | top-1 = exact's | index MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["sizes"]:
        for name in ("exact", "ivf", "hnsw"):
            if name in r:
                x = r[name]
                label = {"exact": "exact (flat)", "ivf": f"IVF-Flat nlist={r['ivf']['nlist']} nprobe={NPROBE}",
                         "hnsw": "HNSW M=32 efSearch=64"}[name]
                lines.append(f"| {r['n']:,} | {label} | {x['build_s']:.1f} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} | "
                             f"{x['recall_at_5']:.3f} | {x.get('top1', 1.0):.3f} | {x['index_mb']:.0f} |")
    rows = [r for r in report["sizes"] if "memory_search" in r]
    if rows:
        lines += ["", "## Through `Memory` itself", "",
                  "The vectors as rows of Ratchet's SQLite; `Memory(...)` opens and builds the index from the stored "
                  "embeddings; `Memory.search(text, user, k=3)` (embed, search the caller's and the shared index, "
                  "SQLite lookup, newest-wins) one query at a time, cache cleared first.", "",
                  "| memories | rows written s | open + build index s | p50 ms | p99 ms | queries with a hit |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            x = r["memory_search"]
            lines.append(f"| {r['n']:,} | {x['insert_s']:.1f} | {x['open_and_build_index_s']:.1f} | {x['p50_ms']:.2f} | "
                         f"{x['p99_ms']:.2f} | {x['queries_with_a_hit']:.1%} |")
    lines += ["", "## IVF nprobe sweep (recall@5 / p50 ms)", "",
              "| memories | " + " | ".join(f"nprobe {p}" for p in report["sizes"][0]["ivf"]["sweep"]) + " |",
              "|---:|" + "---:|" * len(report["sizes"][0]["ivf"]["sweep"])]
    for r in report["sizes"]:
        lines.append(f"| {r['n']:,} | " + " | ".join(f"{v['recall_at_5']:.3f} / {v['p50_ms']:.2f}"
                                                  for v in r["ivf"]["sweep"].values()) + " |")
    lines += ["", "SqliteStore: LangGraph's `SqliteStore` with `index={'dims': 384, 'embed': <the same ONNX encoder>}` "
              "on a `pysqlite3` connection (this Python's sqlite3 cannot load extensions); rows written with "
              "SQL in its own schema; `store.search(('memories',), query=text, limit=5)`.", ""]
    (REPORTS / "memory.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ns = [r["n"] for r in report["sizes"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ns, [r["end_to_end"]["p50_ms"] for r in report["sizes"]], "o-", label="Ratchet embed + search (p50)")
        ax.plot(ns, [r["exact"]["p50_ms"] for r in report["sizes"]], "s--", label="exact search alone (p50)")
        ax.plot(ns, [r["ivf"]["p50_ms"] for r in report["sizes"]], "^--", label=f"IVF search alone (p50)")
        ss = [(r["n"], r["sqlite_store"]["p50_ms"]) for r in report["sizes"] if "p50_ms" in r["sqlite_store"]]
        if ss:
            ax.plot(*zip(*ss), "x-", label="SqliteStore search incl. embed (p50)")
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("memories"), ax.set_ylabel("ms")
        ax.axhline(10, color="grey", lw=0.5)
        ax.legend(fontsize=8), fig.tight_layout(), fig.savefig(REPORTS / "memory.png", dpi=120)
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--records", type=int, default=None, help="use only the first N zsRE records (a smoke run)")
    parser.add_argument("--memory-path", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure Memory.search over a real Ratchet database of each size")
    parser.add_argument("--hnsw-up-to", type=int, default=100_000, help="build HNSW for comparison up to this size")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes = [int(s) for s in args.sizes.split(",")]

    recs = records()[: args.records]
    questions = list(dict.fromkeys(r["question"] for r in recs))
    locality = list(dict.fromkeys(r["locality_question"] for r in recs))
    paraphrases = [r["paraphrase"] for r in recs]
    onnx = Embedder(backend="onnx")
    real_texts = questions + [t for t in locality if t not in set(questions)]
    real = embed_cached(onnx, real_texts)
    queries = embed_cached(onnx, paraphrases)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(paraphrases))
    queries, query_texts = queries[order], [paraphrases[i] for i in order]

    # the encoder alone, one real query at a time, cache off
    torch_embedder = Embedder(backend="torch")
    texts = query_texts[:N_TIMED]
    onnx.embed_uncached(texts[:5]), torch_embedder.embed_uncached(texts[:5])  # warm up
    onnx_ms = timed_ms(lambda t: onnx.embed_uncached([t]), texts)
    torch_ms = timed_ms(lambda t: torch_embedder.embed_uncached([t]), texts[:100])
    a, b = onnx.embed_uncached(texts), torch_embedder.embed_uncached(texts)
    onnx.embed(texts[:100])
    cached_ms = timed_ms(lambda t: onnx.embed([t]), texts[:100])
    embedding = {"onnx_p50_ms": pct(onnx_ms, 50), "onnx_p99_ms": pct(onnx_ms, 99), "torch_p50_ms": pct(torch_ms, 50),
                 "torch_p99_ms": pct(torch_ms, 99), "cosine_min": float((a * b).sum(1).min()),
                 "cached_p50_ms": pct(cached_ms, 50)}
    print("embedding", embedding, flush=True)
    del torch_embedder
    gc.collect()

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
              "faiss": faiss.__version__, "approx_from": APPROX_FROM, "nprobe": NPROBE, "embedding": embedding,
              "real_vectors": int(len(real)), "sizes": []}
    with tempfile.TemporaryDirectory(dir=ROOT / "reports" / "tmp") as work:
        for n in sizes:
            report["sizes"].append(bench_size(n, real, queries, query_texts, onnx, Path(work), args.hnsw_up_to,
                                              sqlite_queries=50 if n <= 100_000 else 12,
                                              real_texts=real_texts if args.memory_path else None))
            write_reports(report)
    print((REPORTS / "memory.md").read_text())


if __name__ == "__main__":
    main()
