"""Bulk work stepping aside for interactive work inside a worker (workers/lanes.py): the gate
itself, the broker channel leaving the bulk queues out while it says so (real Redis, real kombu
consumer), and a real worker whose bulk lane yields to interactive jobs without starving."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from kombu import Consumer, Queue

from banter.broker import RUN_JOB, make_celery
from tests.test_broker import drain
from workers.lanes import LaneGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def waiter(gate: LaneGate) -> tuple[threading.Thread, list[float]]:
    waited: list[float] = []
    thread = threading.Thread(target=lambda: waited.append(gate.wait_clear()), daemon=True)
    thread.start()
    return thread, waited


def test_a_bulk_thread_waits_until_the_interactive_jobs_leave():
    gate = LaneGate(yield_s=60.0)
    assert gate.wait_clear() == 0.0  # nothing interactive: no wait
    gate.enter("a")
    gate.enter("b")
    thread, waited = waiter(gate)
    thread.join(0.3)
    assert thread.is_alive()
    gate.leave("a")
    thread.join(0.3)
    assert thread.is_alive()  # "b" is still in
    gate.leave("b")
    thread.join(10)
    assert not thread.is_alive() and waited[0] > 0


def test_a_bulk_thread_never_waits_longer_than_the_yield():
    gate = LaneGate(yield_s=0.05)
    gate.enter("long")
    thread, waited = waiter(gate)
    thread.join(10)
    assert not thread.is_alive() and waited[0] > 0  # it waited, then went on
    assert gate.busy()


def test_intake_lets_one_bulk_message_through_per_yield():
    clock = Clock()
    gate = LaneGate(yield_s=0.02, clock=clock)
    assert gate.bulk_intake_wait() == 0.0  # idle: take bulk messages freely
    assert gate.bulk_intake_wait() == 0.0
    gate.enter("urgent")
    assert gate.bulk_intake_wait() == 0.0  # none let through yet: one now
    assert gate.bulk_intake_wait() == pytest.approx(0.02)
    clock.now += 0.015
    assert gate.bulk_intake_wait() == pytest.approx(0.005)
    clock.now += 0.005
    assert gate.bulk_intake_wait() == 0.0
    assert gate.bulk_intake_wait() == pytest.approx(0.02)
    gate.leave("urgent")  # the next interactive job is often right behind: shut a while longer
    clock.now += 0.009
    assert gate.bulk_intake_wait() == pytest.approx(0.011)
    clock.now += 0.001  # half a yield since it left
    assert gate.bulk_intake_wait() == 0.0
    assert gate.bulk_intake_wait() == 0.0


def test_a_job_waiting_on_its_backend_does_not_count():
    gate = LaneGate(yield_s=60.0)
    gate.enter("gen")
    with gate.released("gen"):
        assert not gate.busy()
        assert gate.wait_clear() == 0.0
    assert gate.busy()
    gate.leave("gen")
    gate.leave("never-entered")  # a bulk job's id: nothing happens
    assert not gate.busy()


def test_clear_forgets_received_jobs_and_wakes_the_waiters():
    gate = LaneGate(yield_s=60.0)
    gate.enter("dropped-by-a-consumer-restart")
    thread, _ = waiter(gate)
    gate.clear()
    thread.join(10)
    assert not thread.is_alive() and not gate.busy()


def test_yield_zero_turns_the_gate_off():
    gate = LaneGate(yield_s=0.0)
    gate.enter("urgent")
    assert not gate.busy()
    assert gate.wait_clear() == 0.0 and gate.bulk_intake_wait() == 0.0


def test_the_channel_leaves_bulk_queues_out_while_the_gate_says_wait(settings, redis_client):
    names = (f"gate-test-interactive-{id(settings)}", f"gate-test-bulk-{id(settings)}")
    lane_settings = replace(settings, queue_interactive=names[0], queue_bulk=names[1])
    wait = [0.05]
    app = make_celery(lane_settings, bulk_intake_wait=lambda: wait[0])
    try:
        for i in range(2):
            app.send_task(RUN_JOB, args=[f"bulk-{i}"], queue=names[1])
        got: list = []
        with app.connection_for_read() as connection:
            channel = connection.channel()
            channel.basic_qos(0, 10, False)
            consumer = Consumer(channel, queues=[Queue(q) for q in names], accept=["json"],
                                callbacks=[lambda body, message: got.append(message)])
            consumer.consume()
            drain(connection)
            assert got == []  # bulk messages wait
            app.send_task(RUN_JOB, args=["urgent"], queue=names[0])
            drain(connection)
            assert [m.payload[0] for m in got] == [["urgent"]]
            wait[0] = 0.0  # the gate opens
            drain(connection)
            assert [m.payload[0] for m in got] == [["urgent"], ["bulk-0"], ["bulk-1"]]
            for message in got:
                message.ack()
            consumer.cancel()
    finally:
        redis_client.delete(*names)


def bulk_yield_seconds(api) -> float:
    for line in api.get("/metrics").text.splitlines():
        if line.startswith('banter_bulk_yield_seconds_total{kind="embed"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_worker_yields_its_bulk_lane_to_interactive_jobs_and_still_drains_it(api):
    """A real worker with interactive requests arriving back to back from two clients: its bulk
    jobs wait for them (the yield counter grows, so the worker saw the interactive messages
    come in), and every bulk job still finishes while the interactive stream goes on."""
    before = bulk_yield_seconds(api)
    stop = threading.Event()
    interactive: list[int] = []

    def client() -> None:
        while not stop.is_set():
            response = api.post("/v1/embeddings", {"input": "an interactive request"})
            interactive.append(response.status_code)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        while len(interactive) < 5:  # the interactive stream is flowing
            time.sleep(0.05)
        ids = [api.post("/v1/jobs", {"kind": "embed", "input": f"bulk sentence {i}",
                                     "lane": "bulk"}).json()["id"] for i in range(40)]
        finished = [api.wait_job(job_id, timeout_s=120) for job_id in ids]
        still_flowing = not stop.is_set() and all(t.is_alive() for t in clients)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
    assert still_flowing
    assert [job["status"] for job in finished] == ["succeeded"] * 40
    assert set(interactive) == {200}
    assert bulk_yield_seconds(api) > before
