"""The learning benchmark's harness, end to end at a small N, on the real model and engine."""

import json
import sys
from unittest import mock

import pytest
from typer.testing import CliRunner

from evals import zsre
from serving.cli import app
from tests.conftest import ROOT, ZSRE
from memory.text import is_correct, normalise


def test_the_correctness_rule_is_containment_after_normalising():
    assert normalise("  Illinois  Institute, of Technology! ") == "illinois institute of technology"
    assert is_correct("Illinois Institute of Technology", "He went to the Illinois institute of technology.")
    assert is_correct("Sleater-Kinney", "sleater kinney")
    assert not is_correct("Lecanorales", "Lecanoraceae")
    assert not is_correct("art", "He studied at Stuttgart")  # whole words only
    assert not is_correct("", "anything")
    # the benchmark judges without the question: "airport" is a key word, as the report says
    figures = zsre.score([{"answer": "Entebbe International Airport"}],
                         [{"q": "Entebbe International", "p": "Entebbe International Airport"}], [{}])
    assert figures["reliability"] == 0.0 and figures["generalisation"] == 1.0
    assert "no question is given" in zsre.CORRECTNESS_RULE


def test_nq_anchors_never_include_an_evaluated_locality_question():
    from evals.zsre_data import nq_anchor_prompts

    records = [json.loads(line) for line in ZSRE.open()]
    evaluated = records[:1000]
    anchors = nq_anchor_prompts(evaluated, k=150, path=ZSRE)
    assert len(anchors) == len(set(anchors)) == 150
    assert not set(anchors) & {r["locality_question"] for r in evaluated}
    assert set(anchors[:10]) <= {r["locality_question"] for r in records[-20:]}  # taken from the end of the file
    assert nq_anchor_prompts(evaluated, k=150, rows=records) == anchors  # the records already read: the same


def test_frontier_counts_recipes_in_the_target_and_skips_cycle_results(tmp_path):
    from evals.frontier import main, points

    def result(name, efficacy, token, anchors="general+nq"):
        return dict(variant=name, anchors=anchors, efficacy=efficacy, paraphrase=efficacy, locality_token=token,
                    locality_strict=0.1)

    (tmp_path / "results_100.json").write_text(json.dumps([result("a", 0.98, 0.91), result("b", 0.5, 0.5, "none")]))
    (tmp_path / "results_100_later.json").write_text(json.dumps([result("a", 0.99, 0.96)]))  # a measured again
    (tmp_path / "results_100x2.json").write_text(json.dumps([result("cycles", 1.0, 1.0)]))
    (tmp_path / "levers.json").write_text(json.dumps([dict(name="c", family="other", efficacy=0.4, paraphrase=0.4,
                                                           locality_token=0.93, locality_strict=0.3, section="(7)")]))
    pts = {p["name"]: p for p in points(tmp_path)}
    assert set(pts) == {"a", "b", "c"}
    assert pts["a"]["locality_token"] == 0.96 and pts["b"]["family"] == "LoRA, no replay"
    with mock.patch.object(sys, "argv", ["frontier", "--folder", str(tmp_path)]):
        main()
    assert "in the target (efficacy ≥ 0.95, token locality ≥ 0.95): 1." in (tmp_path / "frontier.md").read_text()
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


@pytest.mark.slow
def test_eval_zsre_runs_end_to_end_and_writes_its_report(tmp_path, base_model, models_dir, monkeypatch):
    monkeypatch.setenv("RATCHET_MODELS_DIR", str(models_dir))
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["eval", "zsre", "--n", "4", "--cycle-every", "2", "--output", str(out),
                                 "--engine", "transformers", "--data", str(ZSRE), "--concurrency", "2",
                                 "--anchors", "built-in", "--corrections", "no-its", "--neighbours", "2",
                                 "--sample", "2"])
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "report" and results["corrections"] == "no-its"
    assert results["first_record"] == "zsre-dev-02001" and results["neighbours_per_record"] == 2
    assert 0.0 <= results["summary"]["memory_tier_at_once"]["neighbour_bleed"] <= 1.0
    assert [c["cycle"] for c in results["cycles"]] == [1, 2]
    # each cycle was written as it ended: a run stopped early keeps them
    assert json.loads((out / "cycles-so-far.json").read_text())["cycles"] == results["cycles"]
    # records 1 and 3 are measured in full: cycle 1 asks record 1, cycle 2 records 1 and 3
    assert results["sample"] == 2 and [c["measured"] for c in results["cycles"]] == [1, 2]
    assert {"base model", "consolidation (training and gate)"} <= results["phases_seconds"].keys()
    assert results["memory_tier_answers"][1]["base"] == {}  # the base model is asked only what is measured in full
    assert "## Where the wall time went" in (out / "report.md").read_text()
    assert "memory_tier_at_once_all" in results["summary"] and "all N" in (out / "report.md").read_text()
    assert results["cycles"][1]["retention"] is not None
    s = results["summary"]
    assert s["base"]["locality_strict"] == 1.0
    assert s["memory_tier_at_once"]["reliability"] >= 0.5  # corrections help at once
    assert s["memory_tier_at_once"]["reliability"] > s["base"]["reliability"]
    assert 0.0 <= s["weights_only"]["locality_token"] <= 1.0
    assert results["cycles"][0]["adapter"] == "ratchet-v1" or results["cycles"][0]["status"] == "rejected"
    assert (out / "accuracy_per_cycle.png").stat().st_size > 10_000
    assert (out / "first_cycle_over_time.png").stat().st_size > 10_000
    assert "| memory only |" in (out / "report.md").read_text()
    assert "| WISE, T=1000 | 0.77 | 0.72 | 1.00 |" in (out / "report.md").read_text()  # the row it stands beside


def test_locality_profile_counts_where_the_adapter_parts_from_the_base(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.locality_profile import BINS, profile, report

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    questions = ["Who wrote Hamlet?", "What is the capital of France?", "How tall is Everest?"]
    answers = ["William Shakespeare wrote it.", "Paris is the capital.", "About 8,849 metres."]
    same = profile(model, tokenizer, questions, answers)  # a fresh LoRA changes nothing
    assert same["agreement"] == 1.0 and same["answers_wholly_agreeing"] == 1.0
    assert len(same["bins"]) == len(BINS)
    assert abs(sum(b["share_of_tokens"] for b in same["bins"]) - 1.0) < 1e-9
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 5.0)
    moved = profile(model, tokenizer, questions, answers)
    assert moved["agreement"] < 1.0 and moved["tokens"] == same["tokens"]
    assert "| q | 3 |" in report("x", {"q": moved})


def test_the_splits_never_overlap_and_the_report_split_starts_at_record_2001():
    from evals.zsre import SPLITS, load_records

    assert SPLITS["tune"][1] <= SPLITS["report"][0]
    assert load_records(2, ZSRE, "report")[0]["id"] == "zsre-dev-02001"
    assert load_records(2, ZSRE, "tune")[0]["id"] == "zsre-dev-00001"
    with pytest.raises(ValueError):
        load_records(2001, ZSRE, "tune")


def test_corrections_are_written_as_users_write_them_and_judged_by_content():
    from evals.zsre import correction_text
    from memory.text import answer_of, gives

    r = {"question": "What is the city of birth of Jean-Claude Narcy?", "answer": "Tours"}
    assert correction_text(r, "short") == "Tours"
    assert correction_text(r, "no-its") == "No, it's Tours."
    sentence = correction_text(r, "sentence")
    assert sentence.startswith("The answer to") and gives(sentence, "He was born in Tours.", r["question"])
    assert answer_of(correction_text(r, "no-its")) == "Tours"


def test_a_long_runs_sample_is_evenly_spaced_and_every_record_without_one():
    from evals.zsre import sample_of

    assert sample_of(1000, 100) == set(range(0, 1000, 10))
    assert sample_of(4, None) == sample_of(4, 10) == {0, 1, 2, 3}


def test_the_weights_tier_waits_for_the_active_adapters_merged_lane_and_says_when_it_never_came():
    from evals import zsre

    class Api:
        def __init__(self, healths):
            self.healths = iter(healths)

        def get(self, path):
            assert path == "/health"
            return next(self.healths)

    def client(*healths):
        return mock.Mock(api=Api(healths))

    with mock.patch.object(zsre.time, "sleep"):
        assert zsre.wait_for_lane(client({"active": None}), 60)  # the base model: no lane to wait for
        assert zsre.wait_for_lane(client({"active": "ratchet-v2", "merged_lanes": ["ratchet-v1"]},
                                         {"active": "ratchet-v2", "merged_lanes": []},
                                         {"active": "ratchet-v2", "merged_lanes": ["ratchet-v2"]}), 60)
        assert not zsre.wait_for_lane(client({"active": "ratchet-v2", "merged_lanes": ["ratchet-v1"]}), 0)


def test_the_bench_counts_neighbours_a_fake_adapter_changed_and_answers_that_leaked():
    from evals.zsre import score

    records = [{"answer": "Tours", "neighbours": ["Who is Narcy?", "Where is Narcy from?"]},
               {"answer": "Velmaris", "neighbours": ["Who is Zarnoth?"]}]
    base = [{"q": "Paris", "p": "Paris", "l": "42", "n": ["A French actor.", "From France."]},
            {"q": "No idea", "p": "No idea", "l": "blue", "n": ["A planet."]}]
    adapted = [{"q": "Tours.", "p": "Paris", "l": "42", "n": ["A French actor.", "From Tours."]},  # leaked
               {"q": "the Velmaris", "p": "Velmaris!", "l": "blue", "n": ["A small planet."]}]  # changed
    s = score(records, adapted, base)
    assert (s["reliability"], s["generalisation"], s["locality_strict"]) == (1.0, 0.5, 1.0)
    assert s["neighbour_locality_strict"] == 1 / 3 and s["neighbour_bleed"] == 1 / 3 and s["n_neighbours"] == 3
    shown = [{"q": [], "p": [{"score": 0.9, "answer": "Tours"}], "n": [[], []]}, {"q": [], "p": [], "n": [[]]}]
    s = score(records, [{**g, "shown": m} for g, m in zip(adapted, shown)], base)
    assert s["paraphrase_misses"] == {"retrieval": 0, "ignored": 1}  # shown Tours, answered Paris
    assert s["neighbour_changes"] == {"memory_shown": 0, "none_shown": 2}
    shown[0]["n"] = [[], [{"score": 0.8, "answer": "Tours"}]]  # the leaked one was shown the correction
    s = score(records, [{**g, "shown": m} for g, m in zip(adapted, shown)], base)
    assert s["neighbour_changes"] == {"memory_shown": 1, "none_shown": 1}


def test_a_subjects_neighbours_are_asked_once_and_earlier_base_answers_are_reused(tmp_path):
    from evals.rescore import as_asked_now
    from evals.zsre import earlier_base, with_neighbours

    records = [{"id": f"r{i}", "subject": s, "question": f"Q{i} about {s}?", "paraphrase": f"P{i} about {s}?",
                "answer": a} for i, (s, a) in enumerate([("Ohlanga River", "Indian Ocean"),
                                                        ("Ohlanga River", "Indian Ocean"), ("Narcy", "Tours")])]
    got = with_neighbours(records, records, k=2)
    assert [len(r["neighbours"]) for r in got] == [2, 0, 2]  # the second Ohlanga record: no neighbours again
    assert [len(r["neighbours"]) for r in with_neighbours(records, records, k=2, full={1, 2})] == [0, 2, 2]

    answered = [{"id": r["id"], "neighbours": n["neighbours"] or ["Who is Ohlanga River?"],
                 "base": {"q": "?", "n": [f"base {q}" for q in n["neighbours"] or ["Who is Ohlanga River?"]]}}
                for r, n in zip(records, got)]
    (tmp_path / "results.json").write_text(json.dumps({"memory_tier_answers": answered}))
    base = earlier_base(tmp_path / "results.json", got)
    assert base[1]["n"] == [] and base[0]["n"] == [f"base {q}" for q in got[0]["neighbours"]]
    with pytest.raises(ValueError, match="no base answers"):
        earlier_base(tmp_path / "results.json", [{**got[2], "neighbours": ["Who asked this?"]}])

    rows = [{**r, "neighbours": ["Who is X?"], "base": {"n": ["b"]}, "got": {"l": "?", "n": ["g"]}} for r in records]
    subjects = {r["id"]: r["subject"] for r in records}
    once = as_asked_now(rows, subjects)
    assert [len(a["got"]["n"]) for a in once] == [1, 0, 1]
    sampled = as_asked_now([{**rows[0], "got": {"n": []}}, *rows[1:]], subjects)
    assert [len(a["neighbours"]) for a in sampled] == [0, 1, 1]  # outside a sample: the next record asks them
    # a template asking what the corrected question asks (a place) is no longer a neighbour
    placed = [{**rows[2], "question": "In which city is Narcy?", "neighbours": ["Who is Narcy?", "Where is Narcy located?"],
               "base": {"n": ["b1", "b2"]}, "got": {"l": "?", "n": ["g1", "g2"], "shown": {"n": [[], [{"answer": "Tours"}]]}}}]
    kept = as_asked_now(placed, subjects)[0]
    assert kept["neighbours"] == ["Who is Narcy?"] and kept["got"]["n"] == ["g1"] and kept["got"]["shown"]["n"] == [[]]
    assert kept["base"]["n"] == ["b1"]



def test_served_again_sets_recorded_and_served_figures_side_by_side(tmp_path):
    from evals.served_again import write_markdown

    out = {"run": "reports/x", "env": {}, "recorded": {"weights_only": {"neighbour_bleed": 0.254}},
           "now": {"weights_only": {"reliability": 0.99, "neighbour_bleed": 0.024, "n_neighbours": 713}}}
    write_markdown(out, tmp_path / "served.md")
    md = (tmp_path / "served.md").read_text()
    assert "| weights_only | recorded | — | — | — | 0.254 | — |" in md
    assert "| weights_only | now | 0.990 | — | — | 0.024 | 713 |" in md and "once per record" in md


class FakeServer(zsre.Client):
    """Answers "Paris" to everything; a consolidation takes 0.2 s, and the one numbered `fail_at` raises."""

    def __init__(self, fail_at: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.pool, self.chat_ms, self.retrieval_ms = ThreadPoolExecutor(2), [], []
        self.asked, self.corrected, self.cycles, self.fail_at = [], 0, 0, fail_at

    def ask(self, question, model, memory, max_tokens=32):
        self.asked.append(model)
        self.chat_ms.append(1.0)
        self.retrieval_ms.append(0.1)
        return {"id": str(len(self.asked)), "text": "Paris", "memories": []}

    def correct(self, response_id, answer):
        self.corrected += 1

    def agreement(self, question, completion, model):
        return 3, 4

    def consolidate(self):
        import time

        self.cycles += 1
        if self.cycles == self.fail_at:
            raise ConnectionError("the server went away")
        time.sleep(0.2)
        return {"status": "promoted", "adapter": f"ratchet-v{self.cycles}", "metrics": {}}


def _fake_records(n: int = 4) -> list[dict]:
    return [{"id": f"r{i}", "subject": "Narcy", "question": f"Where is Narcy {i}?", "paraphrase": "Narcy?",
             "answer": "Paris" if i % 2 else "Tours", "locality_question": "Why?", "neighbours": ["Who is Narcy?"]}
            for i in range(n)]


def test_a_run_times_each_cycle_and_each_kind_of_work_with_a_fake_server():
    out = zsre._run(FakeServer(), _fake_records(), 2)
    assert [c["cycle"] for c in out["cycles"]] == [1, 2]
    assert all(c["cycle_seconds"] >= 0.2 for c in out["cycles"])
    assert out["phases_seconds"]["consolidation (training and gate)"] >= 0.4
    assert out["cycles"][-1]["weights"]["reliability"] == 0.5  # "Paris" gives the odd records only


def test_a_stopped_run_resumes_after_its_last_step_and_ends_as_one_never_stopped(tmp_path):
    records = _fake_records(6)
    whole_server = FakeServer()
    whole = zsre._run(whole_server, records, 2)
    kept = []  # the state file, as each step left it
    state = {"segments": [{"started_at": "then"}]}
    with pytest.raises(ConnectionError):
        zsre._run(FakeServer(fail_at=2), records, 2, state=state, save=lambda: kept.append(json.dumps(state)))
    resumed_server = FakeServer()
    resumed_server.cycles = 1  # the server's versions carry on: its cycle 1 promoted ratchet-v1
    resumed = zsre._run(resumed_server, records, 2, state=json.loads(kept[-1]))

    def without_times(cycles):
        return [{k: v for k, v in c.items() if k != "cycle_seconds"} for c in cycles]

    assert without_times(resumed["cycles"]) == without_times(whole["cycles"])
    assert resumed["summary"] == whole["summary"]
    # the base model and cycle 1 are not asked again, nor chunk 2 taught again: it was taught before
    # its consolidation failed; cycles 2 and 3 are consolidated
    assert "ratchet-base" not in resumed_server.asked[: resumed_server.asked.index("ratchet")]
    assert resumed_server.corrected == 2 and resumed_server.cycles == 3
    assert whole_server.corrected == 6 and whole_server.cycles == 3
    assert resumed["latency"]["requests"] == len(whole_server.asked)  # every request of the run, before and after
    # its report tells that its wall time was made in two segments
    segments = [{"started_at": "2026-12-07T00:00:00Z", "seconds": 100.0, "server_start_seconds": 20.0},
                {"started_at": "2026-12-07T03:00:00Z", "seconds": 50.0, "server_start_seconds": 30.0}]
    zsre.write_report({**resumed, "n": 6, "cycle_every": 2, "engine": "fake", "concurrency": 2, "segments": segments,
                       "correctness_rule": zsre.CORRECTNESS_RULE,
                       "seconds": 150.0}, tmp_path)
    assert ("Wall time: 150 s in 2 segments (stopped and resumed: 100 s from 2026-12-07T00:00:00Z, 50 s from "
            "2026-12-07T03:00:00Z; 50 s of it starting the server)") in (tmp_path / "report.md").read_text()


def test_a_run_neither_overwrites_an_unfinished_one_nor_resumes_it_with_other_options(tmp_path):
    options = {"n": 4, "cycle_every": 2, "split": "report"}
    state = zsre.new_state(tmp_path, options)
    zsre.save_state(tmp_path, state)
    with pytest.raises(ValueError, match="pass --resume"):
        zsre.new_state(tmp_path, options)
    with pytest.raises(ValueError, match="cycle_every 2, 3"):
        zsre.resumed_state(tmp_path, {**options, "cycle_every": 3})
    assert len(zsre.resumed_state(tmp_path, options)["segments"]) == 2
    with pytest.raises(ValueError, match="no unfinished run"):
        zsre.resumed_state(tmp_path / "elsewhere", options)


def _sigterm_stops_its_server(tmp_path, bench: str) -> None:
    """Runs `bench` (a script that starts a RatchetServer in the data dir it is given and prints the
    server's pid), stops it with SIGTERM, and checks that it exits as killed and left no server."""
    import os
    import signal
    import subprocess
    import textwrap

    import psutil

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(bench), str(tmp_path / "data")],
                            stdout=subprocess.PIPE, text=True, env=env)
    server_pid = int(proc.stdout.readline())
    assert psutil.pid_exists(server_pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE


def test_a_benchmark_killed_with_sigterm_stops_the_server_it_started(tmp_path):
    _sigterm_stops_its_server(tmp_path, '''
        import sys, time
        from evals.server import RatchetServer

        SERVE = ("import http.server as h\\n"
                 "class H(h.BaseHTTPRequestHandler):\\n"
                 "    def do_GET(self):\\n"
                 "        self.send_response(200); self.end_headers()\\n"
                 "h.HTTPServer(('127.0.0.1', %d), H).serve_forever()")

        class Fake(RatchetServer):  # answers /health at once
            def command(self):
                return [sys.executable, "-c", SERVE % self.port]

        with Fake(sys.argv[1], engine="fake") as server:
            print(server.proc.pid, flush=True)
            time.sleep(600)
    ''')


def test_a_benchmark_killed_while_its_server_starts_stops_the_server(tmp_path):
    _sigterm_stops_its_server(tmp_path, '''
        import sys
        from evals.server import RatchetServer

        class Fake(RatchetServer):  # never answers /health: the start is still waiting when SIGTERM comes
            def command(self):
                return [sys.executable, "-c", "import time; time.sleep(600)"]

            def _wait_ready(self):
                print(self.proc.pid, flush=True)
                super()._wait_ready()

        with Fake(sys.argv[1], engine="fake", startup_timeout=600) as server:
            pass
    ''')
