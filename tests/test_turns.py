import threading
import time

from serving.engines.turns import AdapterTurns


def staggered(request, calls: list[tuple]) -> bool:
    """Run `request(*args)` for each of `calls` in its own thread, 5 ms apart; did all end?"""
    threads = [threading.Thread(target=request, args=args) for args in calls]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join(10)
    return not any(t.is_alive() for t in threads)


def test_requests_for_different_adapters_never_overlap_and_the_same_one_shares_its_turn():
    turns = AdapterTurns()
    running: list[str | None] = []
    overlaps: list[tuple] = []
    shared = []
    lock = threading.Lock()

    def request(adapter, hold):
        with turns.turn(adapter):
            with lock:
                if any(a != adapter for a in running):
                    overlaps.append((adapter, list(running)))
                if running:
                    shared.append(adapter)
                running.append(adapter)
            time.sleep(hold)
            with lock:
                running.remove(adapter)

    assert staggered(request, [(a, 0.05) for a in [None, None, "v1", None, "v1", "v2", None] * 3])
    assert overlaps == []  # the base model and each adapter in turns
    assert shared  # requests for one adapter still run together


def test_a_waiting_adapter_is_not_starved_by_later_requests_for_the_running_one():
    turns = AdapterTurns()
    order = []
    first = threading.Event()

    def base(i):
        with turns.turn(None):
            first.set()
            time.sleep(0.1)
            order.append(f"base{i}")

    def adapter():
        with turns.turn("v1"):
            order.append("v1")

    t0 = threading.Thread(target=base, args=(0,))
    t0.start()
    first.wait(5)
    ta = threading.Thread(target=adapter)
    ta.start()
    time.sleep(0.02)
    t1 = threading.Thread(target=base, args=(1,))  # arrives after v1: waits for v1's turn
    t1.start()
    for t in (t0, ta, t1):
        t.join(5)
    assert order == ["base0", "v1", "base1"]


def test_a_request_alone_shares_its_turn_with_nobody_not_even_the_base_model():
    turns = AdapterTurns()
    running: list[str] = []
    overlaps = []
    lock = threading.Lock()

    def request(kind, hold):
        with turns.alone() if kind == "alone" else turns.turn(None):
            with lock:
                if running and (kind == "alone" or "alone" in running):
                    overlaps.append((kind, list(running)))
                running.append(kind)
            time.sleep(hold)
            with lock:
                running.remove(kind)

    assert staggered(request, [(k, 0.03) for k in ["base", "alone", "alone", "base", "base"] * 3])
    assert overlaps == []
