"""The web console in a real browser (Debian's Chromium driven by playwright) over a fast server
(the echo model, a tiny consolidation); and the terminal fixes of the same pass.

RATCHET_SCREENSHOTS=docs/console saves the README's screenshots of each view; without it they
go to the test's own folder."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from serving.api import create_app
from serving.cli import app as cli
from serving.service import LOCAL_ADMIN, Ratchet
from serving.settings import Settings
from tests.conftest import EchoModel, LiveServer
from trainer.cycle import CycleConfig
from trainer.gate import GateConfig
from trainer.lora import TrainingConfig

CHROMIUM = os.environ.get("RATCHET_CHROMIUM", "/usr/bin/chromium")  # Debian's; playwright never downloads one
ROOT = Path(__file__).resolve().parents[1]
CONSOLE = ROOT / "serving" / "console"
Q = "What university did Watts Humphrey attend?"
RIGHT = "Illinois Institute of Technology"
# A cycle of a few seconds whose gate measures the candidate and lets it through: a random
# 2-layer model cannot reach the real bounds, and the timeline should show the figures.
TINY_CYCLE = CycleConfig(training=TrainingConfig(epochs=1, min_steps=0, batch_size=4, r=4), anchors=False,
                         gate=GateConfig(min_efficacy=0.0, min_paraphrase=0.0, min_retention=0.0, min_locality=0.0,
                                         max_negative_flips=1.0, max_neighbour_bleed=1.0,
                                         min_neighbour_locality=0.0))
WAIT_MS = 20_000  # how long the browser waits for something to show (a consolidation: CYCLE_MS)
CYCLE_MS = 180_000


class SlowEcho(EchoModel):
    """The echo model writing its answer a word at a time, so a stream can be watched; once it
    died, its restart lasts until `restarted` is set."""

    delay = 0.2  # seconds between words

    def __init__(self):
        super().__init__()
        self.restarted = threading.Event()
        self.restarted.set()

    def stream(self, messages, **options):
        for piece in super().stream(messages, **options):
            if isinstance(piece, str):
                time.sleep(self.delay)
            yield piece

    def restart(self):
        self.restarted.wait(60)
        super().restart()


def unavailable(why: str):
    """Skip on a developer's machine without a browser; in CI the browser tests must run."""
    if os.environ.get("CI"):
        pytest.fail(f"{why}: the browser tests must run in CI (bash scripts/setup.sh installs chromium and playwright)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package is missing (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


class Console:
    """A server with the console, and a browser page on it."""

    def __init__(self, ratchet: Ratchet, engine: SlowEcho, server: LiveServer, page, shots: Path):
        self.ratchet, self.engine, self.server, self.page, self.shots = ratchet, engine, server, page, shots
        self.url = server.url

    def open(self, view: str = "chat"):
        self.page.goto(f"{self.url}/#{view}")
        return self.page

    def shot(self, name: str, **options) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), **options)

    def api(self, method: str, path: str, token: str | None = None, **kwargs) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)
        assert r.status_code < 400, r.text
        return r.json()


@pytest.fixture
def open_console(browser, tmp_path, tiny_model):
    """`open_console(width=, height=)`: a fresh server and page; JavaScript errors fail the test."""
    shots = Path(os.environ.get("RATCHET_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    opened = []

    def open(width: int = 1200, height: int = 820) -> Console:
        engine = SlowEcho()
        ratchet = Ratchet(Settings(data_dir=tmp_path / f"data{len(opened)}", model=tiny_model, cycle=TINY_CYCLE,
                                   reports_dir=tmp_path / f"reports{len(opened)}"), engine=engine)
        ratchet.start()
        server = LiveServer(create_app(ratchet)).__enter__()
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        opened.append((ratchet, server, context, errors))
        return Console(ratchet, engine, server, page, shots)

    yield open
    for ratchet, server, context, errors in opened:
        context.close()
        server.__exit__(None, None, None)
        ratchet.stop()
        assert not errors, f"JavaScript errors in the console: {errors}"


def ask(page, text: str):
    """Type a question and send it with Enter; returns the answer once its stream ended."""
    from playwright.sync_api import expect

    page.get_by_label("Your question").fill(text)
    page.get_by_label("Your question").press("Enter")
    answer = page.locator(".turn.assistant").last
    expect(answer).not_to_have_class(re.compile("streaming"), timeout=WAIT_MS)
    return answer


@pytest.mark.browser
def test_chat_streams_an_answer_takes_a_correction_and_shows_the_memory_it_came_from(open_console):
    from playwright.sync_api import expect

    console = open_console()
    page = console.open()
    expect(page.get_by_text("Ask anything.")).to_be_visible()
    page.get_by_label("Your question").fill(Q)
    page.get_by_label("Your question").press("Enter")
    streaming = page.locator(".turn.assistant.streaming .text")
    expect(streaming).to_have_text(re.compile(r"^I( do( not)?)?$"), timeout=WAIT_MS)  # a part, while it is written
    answer = page.locator(".turn.assistant").last
    expect(answer).not_to_have_class(re.compile("streaming"), timeout=WAIT_MS)
    expect(answer.locator(".text")).to_have_text("I do not know")
    expect(answer).to_contain_text("answered by the base model")
    response_id = answer.locator(".rid").inner_text()
    assert response_id.startswith("chatcmpl-")

    answer.get_by_role("button", name="Bad answer").click()
    expect(answer.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
    expect(answer.get_by_label("Right answer")).to_be_focused()  # thumbs down opens the correction
    answer.get_by_label("Right answer").fill(RIGHT)
    answer.get_by_label("Comment").fill("He studied at IIT in Chicago")
    answer.get_by_role("button", name="Send correction").click()
    answer = page.locator(".turn.assistant").last
    expect(answer).to_contain_text(f"Corrected: {RIGHT}")
    expect(answer).to_contain_text("Correction saved as a memory")
    memories = console.api("GET", "/v1/memories")["data"]
    assert [(m["question"], m["answer"]) for m in memories] == [(Q, RIGHT)]

    answer.get_by_role("button", name="Ask again").click()
    again = page.locator(".turn.assistant").nth(1)
    expect(again).not_to_have_class(re.compile("streaming"), timeout=WAIT_MS)
    expect(again.locator(".text")).to_have_text(RIGHT)
    expect(again.locator(".used")).to_contain_text(f"#{memories[0]['id']} · score 1.00")
    expect(again.locator(".used")).to_contain_text(RIGHT)
    assert console.api("GET", "/v1/failures", params={"kind": "repeat"})["data"] == []  # corrected, then checked
    again.get_by_role("button", name="Good answer").click()
    expect(again.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "true")
    console.shot("chat")

    page.get_by_role("button", name="New thread").click()
    expect(page.locator(".turn")).to_have_count(0)
    ask(page, "Hello there")
    threads = page.locator("#thread-list button")
    expect(threads).to_have_count(2)
    threads.last.click()  # the first thread, kept in this tab
    expect(page.locator(".turn.assistant")).to_have_count(2)


@pytest.mark.browser
def test_memory_lists_searches_and_retracts_with_a_confirmation(open_console):
    from playwright.sync_api import expect

    console = open_console()
    console.api("POST", "/v1/memories", json={"question": "What is the capital of Australia?", "answer": "Canberra"})
    console.api("POST", "/v1/memories", json={"question": Q, "answer": RIGHT})
    page = console.open("memory")
    cards = page.locator("#memory-list > li")
    expect(cards).to_have_count(2)
    expect(cards.first).to_contain_text(RIGHT)  # newest first
    expect(cards.first).to_contain_text("in memory only")

    page.get_by_label("Search memories").fill("Which university did Watts Humphrey go to?")
    page.get_by_role("button", name="Search").click()
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text(re.compile(r"score 0\.\d\d"))
    console.shot("memory-search")

    cards.first.get_by_role("button", name="Retract").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Retract memory #2")
    dialog.get_by_role("button", name="Cancel").click()
    expect(cards).to_have_count(1)
    cards.first.get_by_role("button", name="Retract").click()
    dialog.get_by_role("button", name="Retract").click()
    expect(page.locator("#memory-status")).to_contain_text("Memory #2 retracted")
    expect(cards).to_have_count(0)
    assert console.api("GET", "/v1/memories/2")["retracted_at"]

    page.get_by_role("button", name="Newest first").click()
    expect(cards).to_have_count(1)
    cards.first.get_by_role("button", name="Retract").click()
    dialog.get_by_role("button", name="Retract").click()
    expect(page.get_by_text("No memories yet.")).to_be_visible()
    console.shot("memory-empty")
    page.get_by_label("Show").select_option("retracted")  # what was retracted, still listed as such
    expect(cards).to_have_count(2)
    expect(cards.first).to_contain_text("retracted")
    expect(cards.first).not_to_contain_text("in memory only")
    expect(cards.first.get_by_role("button", name="Retract")).to_be_hidden()
    page.get_by_label("Show").select_option("all")
    expect(cards).to_have_count(2)
    page.get_by_label("Show").select_option("live")
    expect(page.get_by_text("No memories yet.")).to_be_visible()
    page.goto(f"{console.url}/#chat")
    expect(ask(page, Q).locator(".text")).to_have_text("I do not know")  # retracted: no longer used


@pytest.mark.browser
def test_failures_by_kind_become_lessons_in_one_step(open_console):
    from playwright.sync_api import expect

    console = open_console()
    long_question = ("My grandfather worked with him in the sixties and always said he was an engineer first. "
                     "Before he wrote about software processes and the capability maturity model, " + Q)
    console.api("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": long_question}],
                                                       "user": "ann"})
    page = console.open("failures")
    expect(page.get_by_role("button", name="abstention 1")).to_be_visible()
    card = page.locator("#failure-list > li").first
    expect(card.locator(".q")).to_have_text(long_question)  # the whole question
    expect(card).to_contain_text("asked by ann")
    console.shot("failures")
    page.get_by_role("button", name="contradiction 0").click()
    expect(page.get_by_text("No failures here.")).to_be_visible()
    page.get_by_role("button", name="all 1").click()
    card.get_by_label("Right answer").fill(RIGHT)
    card.get_by_role("button", name="Teach").click()
    expect(card).to_contain_text("Lesson learnt: memory #1 (for ann)")
    assert console.api("GET", "/v1/memories", params={"user": "ann"})["data"][0]["answer"] == RIGHT


@pytest.mark.browser
def test_a_consolidation_is_followed_live_and_the_timeline_activates_and_rolls_back(open_console):
    from playwright.sync_api import expect

    console = open_console()
    console.api("POST", "/v1/memories", json={"question": Q, "answer": RIGHT})
    page = console.open("learning")
    expect(page.locator("#schedule")).to_contain_text("no schedule")
    expect(page.locator("#serving")).to_have_text("the base model")
    page.get_by_role("button", name="Consolidate now").click()
    label = page.locator("#cycle-label")
    expect(label).to_have_text(re.compile(r"Consolidation 1: (queued|running)"))
    expect(page.get_by_role("button", name="Consolidate now")).to_be_disabled()
    expect(label).to_have_text("Consolidation 1: succeeded", timeout=CYCLE_MS)
    expect(page.locator("#cycle-progress")).to_have_js_property("value", 1)
    expect(page.locator("#cycle-message")).to_have_text("promoted ratchet-v1")

    version = page.locator("#timeline > li").first
    expect(version.locator("h3")).to_have_text("ratchet-v1")
    expect(version).to_contain_text("promoted")
    expect(version).to_contain_text("serving")
    expect(version).to_contain_text("from the base model")
    for metric in ("gate_efficacy", "gate_paraphrase", "gate_retention", "gate_negative_flips", "gate_locality_token"):
        expect(version.locator(f'dd[data-metric="{metric}"]')).to_have_text(re.compile(r"^\d\.\d\d$"))
    expect(page.locator("#engine")).to_contain_text("serving ratchet-v1")
    expect(page.locator("#cycles tbody tr")).to_have_count(1)
    console.shot("learning", full_page=True)

    page.get_by_role("button", name="Roll back").click()
    page.get_by_role("dialog").get_by_role("button", name="Roll back").click()
    expect(page.locator("#adapters-status")).to_have_text("Now serving the base model.")
    expect(page.locator("#serving")).to_have_text("the base model")
    expect(version).not_to_contain_text("serving")
    assert console.ratchet.active is None
    expect(page.locator("#engine")).to_contain_text("serving the base model")

    version.get_by_role("button", name="Activate ratchet-v1").click()
    page.get_by_role("dialog").get_by_role("button", name="Activate ratchet-v1").click()
    expect(page.locator("#serving")).to_have_text("ratchet-v1")
    assert console.ratchet.active == "ratchet-v1"

    # Each memory's state: in the weights (with its version), or in memory only; the operator's
    # own corrections are trusted, so there is nothing to confirm.
    console.api("POST", "/v1/memories", json={"question": "What is the capital of Australia?", "answer": "Canberra"})
    page.goto(f"{console.url}/#memory")
    cards = page.locator("#memory-list > li")
    expect(cards).to_have_count(2)
    expect(cards.first).to_contain_text("in memory only")
    expect(cards.last).to_contain_text("consolidated into ratchet-v1")
    expect(page.get_by_role("button", name="Confirm for the shared adapter")).to_have_count(0)
    console.shot("memory")

    # An untrusted user's correction, seen as that user: it waits for an admin, who confirms it.
    console.api("POST", "/v1/memories", json={"question": "What is the capital of Peru?", "answer": "Lima",
                                              "user": "ann"})
    page.get_by_label("As user").fill("ann")
    page.get_by_label("As user").press("Enter")
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text("Lima")
    expect(cards.first).to_contain_text("awaiting an admin's confirmation")
    console.shot("memory-confirm")
    cards.first.get_by_role("button", name="Confirm for the shared adapter").click()
    expect(cards.first).to_contain_text("Confirmed: the next consolidation may learn it.")
    expect(cards.first).not_to_contain_text("awaiting")
    assert console.api("GET", "/v1/memories", params={"user": "ann"})["data"][0]["trusted"] is True


@pytest.mark.browser
def test_the_learning_view_shows_the_benchmarks_reports_with_their_plots(open_console):
    import shutil

    from playwright.sync_api import expect

    from tests.fakes import write_learning_report

    console = open_console()
    page = console.open("learning")
    expect(page.get_by_text("No benchmark report in this server's reports folder")).to_be_visible()
    reports = console.ratchet.settings.reports_dir
    older = write_learning_report(reports, "zsre-tune-n20-k10", n=20, cycle_every=10, split="tune", plots=())
    os.utime(older / "results.json", (1_700_000_000, 1_700_000_000))
    shutil.copytree(ROOT / "reports" / "zsre-n200-k50", reports / "zsre-n200-k50")  # a real run, its real plots
    page.reload()
    cards = page.locator("#reports > li")
    expect(cards).to_have_count(2)
    expect(cards.first.locator("h3")).to_have_text("zsRE learning benchmark: N=200, a cycle every 50")
    expect(cards.first).to_contain_text("N=200 · K=50")
    expect(cards.last).to_contain_text("split tune · N=20 · K=10")
    plots = cards.first.get_by_role("img")
    expect(plots).to_have_count(2)
    expect(plots.first).to_have_accessible_name("Accuracy per cycle (zsre-n200-k50)")
    page.wait_for_function("[...document.querySelectorAll('#reports img')].every((i) => i.complete && i.naturalWidth > 0)",
                           timeout=WAIT_MS)
    assert plots.first.evaluate("(i) => i.naturalWidth") > 100  # the PNG itself, fetched with the caller's key
    expect(page.get_by_text("No benchmark report")).to_be_hidden()
    page.locator("#reports").screenshot(path=str(console.shots / "plots.png"))


@pytest.mark.browser
def test_a_user_key_is_asked_once_kept_in_the_tab_and_cannot_see_admin_views(open_console):
    from playwright.sync_api import expect

    console = open_console()
    _, user_token = console.ratchet.create_key(LOCAL_ADMIN, "ann")
    _, admin_token = console.ratchet.create_key(LOCAL_ADMIN, "ops", admin=True)
    refused = []  # the console asks who it is (GET /v1/caller) rather than probing admin routes
    page = console.page
    page.on("response", lambda r: refused.append(r.url) if r.status == 403 else None)
    console.open()
    expect(page.get_by_role("heading", name="API key")).to_be_visible()
    console.shot("key")
    page.get_by_role("textbox", name="API key").fill("rk-wrong")
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#key-error")).to_have_text("invalid or revoked API key")

    page.get_by_role("textbox", name="API key").fill(user_token)
    page.get_by_role("textbox", name="API key").press("Enter")
    expect(page.get_by_label("Your question")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ratchet.key')") == user_token
    nav = page.get_by_role("navigation", name="Views")
    expect(nav.get_by_role("link")).to_have_text(["Chat", "Memory"])
    expect(page.locator("#who")).to_have_text("ann")
    expect(ask(page, Q).locator(".text")).to_have_text("I do not know")
    page.reload()  # the key is kept in the tab: no prompt again
    expect(page.get_by_label("Your question")).to_be_visible()
    page.goto(f"{console.url}/#learning")
    expect(page.get_by_role("heading", name="Admins only")).to_be_visible()
    expect(page.get_by_role("button", name="Consolidate now")).to_be_hidden()
    page.goto(f"{console.url}/#memory")
    expect(page.get_by_text("No memories yet.")).to_be_visible()

    page.get_by_role("button", name="Forget key").click()
    expect(page.get_by_role("heading", name="API key")).to_be_visible()
    page.get_by_role("textbox", name="API key").fill(admin_token)
    page.get_by_role("button", name="Use this key").click()
    expect(nav.get_by_role("link")).to_have_text(["Chat", "Memory", "Failures", "Learning"])
    expect(page.locator("#who")).to_have_text("ops · admin")
    page.goto(f"{console.url}/#failures")
    expect(page.get_by_role("button", name="abstention 1")).to_be_visible()  # ann's question
    assert refused == []


@pytest.mark.browser
def test_an_engine_restart_is_shown_as_restarting_until_it_is_back(open_console):
    from playwright.sync_api import expect

    console = open_console()
    page = console.open()
    expect(page.locator("#engine")).to_contain_text("serving the base model")
    console.engine.restarted.clear()
    console.engine.running = False  # the engine dies: the server's monitor notices and restarts it
    deadline = time.monotonic() + 15
    while console.ratchet.ready and time.monotonic() < deadline:
        time.sleep(0.02)
    answer = ask(page, Q)
    expect(answer).to_contain_text("Not answered: the engine is restarting; retry in a few seconds")
    expect(page.get_by_role("alert").first).to_contain_text("The engine is restarting")
    expect(page.locator("#engine")).to_have_text("echo: restarting")
    console.shot("restarting")

    console.engine.restarted.set()
    expect(page.locator("#banner")).to_have_text("The engine is back.", timeout=WAIT_MS)
    answer.get_by_role("button", name="Ask again").click()
    expect(page.locator(".turn.assistant").last.locator(".text")).to_have_text("I do not know", timeout=WAIT_MS)


@pytest.mark.browser
def test_every_view_fits_a_phone_and_every_control_is_labelled_and_reachable_by_keyboard(open_console):
    from playwright.sync_api import expect

    console = open_console(width=375, height=740)
    page = console.open()
    for _ in range(12):  # from the top of the page to the question box with Tab alone
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "question":
            break
    assert page.evaluate("document.activeElement.id") == "question"
    page.keyboard.type(Q)
    page.keyboard.press("Enter")
    expect(page.locator(".turn.assistant .text")).to_have_text("I do not know", timeout=WAIT_MS)
    page.locator(".turn.assistant").get_by_role("button", name="Correct").focus()
    page.keyboard.press("Enter")
    expect(page.get_by_label("Right answer")).to_be_focused()
    page.keyboard.type(RIGHT)
    page.get_by_role("button", name="Send correction").focus()
    page.keyboard.press("Enter")
    expect(page.locator(".turn.assistant")).to_contain_text(f"Corrected: {RIGHT}")
    console.shot("phone")
    for view in ("chat", "memory", "failures", "learning"):
        page.goto(f"{console.url}/#{view}")
        expect(page.locator(f"#view-{view}")).to_be_visible()
        page.wait_for_load_state("networkidle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375, f"{view} is wider than a phone"
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea, a[href]')]
            .filter((e) => e.offsetParent !== null)
            .filter((e) => !(e.labels?.length || e.getAttribute('aria-label') || e.textContent.trim() || e.title))
            .map((e) => e.outerHTML)""")
        assert unlabelled == [], f"controls without a label in {view}: {unlabelled}"
    page.goto(f"{console.url}/#learning")
    expect(page.get_by_role("button", name="Consolidate now")).to_be_visible()
    console.shot("phone-learning", full_page=True)


def test_the_console_calls_only_routes_the_api_has_and_loads_nothing_from_elsewhere(start_ratchet):
    """No build step, no network: every file is served from /console/, and every path the
    JavaScript calls is a public route of the API."""
    from fastapi.testclient import TestClient

    client = TestClient(create_app(start_ratchet()), base_url="http://127.0.0.1")  # keyless: its own host only
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
    sources = "".join(p.read_text() for p in CONSOLE.glob("*.js"))
    for name in re.findall(r'from "\./([\w.]+)"', sources) + re.findall(r'/console/([\w.]+)"', page.text):
        assert client.get(f"/console/{name}").status_code == 200, name
    routes = {re.sub(r"\{\w+\}", "{}", r.path) for r in client.app.routes if r.path.startswith(("/v1", "/health"))}
    called = {re.sub(r"\$\{[^}]+\}", "{}", p) for p in re.findall(r'["`](/v1/[^"`?]*|/health)["`]', sources)}
    assert called and called <= routes, called - routes
    assert client.post("/v1/load_lora_adapter", json={}).status_code == 404  # still the API's own 404s


def test_ratchet_chat_prints_the_answer_as_written_and_the_response_id_on_its_own_line(start_ratchet, live_server):
    r = start_ratchet()
    answer = "[bold]Illinois[/bold] Institute of Technology [1], " + ", ".join(["in Chicago"] * 10)
    with live_server(create_app(r)) as server:
        httpx.post(f"{server.url}/v1/memories", json={"question": Q, "answer": answer})
        result = CliRunner().invoke(cli, ["chat", Q, "--url", server.url])
    assert result.exit_code == 0, result.output
    assert result.stdout == answer + "\n"  # no markup read, no line wrapped
    lines = result.output.splitlines()
    assert re.fullmatch(r"chatcmpl-\w+ · 1 correction\(s\) from memory", lines[-1]), lines
