"""The fair queue on its own: round-robin order, caps, and gathering compatible jobs into a batch."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from generation.contract import ErrorCode
from generation.queue import FairQueue, QueueRefused


@dataclass(eq=False)
class FakeJob:
    """Only what the queue reads; real jobs are exercised end to end in test_service_*."""

    name: str
    requester: str
    batch_key: str = "same"
    count: int = 1


def names(jobs) -> list[str]:
    return [job.name for job in jobs]


def test_jobs_start_round_robin_across_requesters():
    queue = FairQueue(max_queue=10, max_per_requester=5)
    for name, requester in [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c")]:
        queue.put(FakeJob(name, requester))
    assert names(queue.order()) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    started = [names(queue.take_batch(max_images=1, batch_wait=0))[0] for _ in range(6)]
    assert started == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_put_reports_how_many_jobs_are_ahead():
    queue = FairQueue(max_queue=10, max_per_requester=5)
    assert queue.put(FakeJob("a1", "a")) == 0
    assert queue.put(FakeJob("a2", "a")) == 1
    assert queue.put(FakeJob("b1", "b")) == 1  # b's first job goes before a's second


def test_a_full_queue_refuses_with_queue_full():
    queue = FairQueue(max_queue=2, max_per_requester=5)
    queue.put(FakeJob("1", "a"))
    queue.put(FakeJob("2", "b"))
    with pytest.raises(QueueRefused) as refused:
        queue.put(FakeJob("3", "c"))
    assert refused.value.code is ErrorCode.QUEUE_FULL


def test_a_requester_at_the_cap_is_refused_until_a_job_finishes():
    queue = FairQueue(max_queue=10, max_per_requester=1)
    queue.put(FakeJob("1", "a"))
    with pytest.raises(QueueRefused) as refused:
        queue.put(FakeJob("2", "a"))
    assert refused.value.code is ErrorCode.REQUESTER_LIMIT
    (running,) = queue.take_batch(max_images=1, batch_wait=0)
    with pytest.raises(QueueRefused):
        queue.put(FakeJob("2", "a"))  # still running: still counts
    queue.done(running)
    queue.put(FakeJob("2", "a"))


def test_a_batch_gathers_compatible_jobs_up_to_max_images_and_leaves_the_rest():
    queue = FairQueue(max_queue=10, max_per_requester=5)
    queue.put(FakeJob("a1", "a", "x", count=2))
    queue.put(FakeJob("b1", "b", "y"))
    queue.put(FakeJob("c1", "c", "x"))
    queue.put(FakeJob("d1", "d", "x", count=2))
    queue.put(FakeJob("e1", "e", "x"))
    assert names(queue.take_batch(max_images=4, batch_wait=0)) == ["a1", "c1", "e1"]
    assert names(queue.order()) == ["b1", "d1"]


def test_requesters_served_in_a_batch_wait_for_everyone_elses_first_job():
    queue = FairQueue(max_queue=20, max_per_requester=5)
    for turn in (1, 2):
        for requester in "abcdef":
            queue.put(FakeJob(f"{requester}{turn}", requester))
    batches = [names(queue.take_batch(max_images=4, batch_wait=0)) for _ in range(3)]
    assert batches == [["a1", "b1", "c1", "d1"], ["e1", "f1", "a2", "b2"], ["c2", "d2", "e2", "f2"]]


def test_removing_a_queued_job_frees_its_place_and_its_requesters_slot():
    queue = FairQueue(max_queue=10, max_per_requester=1)
    job = FakeJob("1", "a")
    queue.put(job)
    assert queue.remove(job) and queue.depth() == 0
    assert not queue.remove(job)
    queue.put(FakeJob("2", "a"))


def test_a_paused_queue_holds_jobs_until_resumed():
    queue = FairQueue(max_queue=10, max_per_requester=5)
    queue.pause()
    queue.put(FakeJob("1", "a"))
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take_batch(1, 0)))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive() and not taken
    queue.resume()
    worker.join(5)
    assert names(taken[0]) == ["1"]


def test_closing_wakes_a_waiting_worker_with_none():
    queue = FairQueue(max_queue=10, max_per_requester=5)
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take_batch(1, 0)))
    worker.start()
    queue.close()
    worker.join(5)
    assert taken == [None]


def test_a_lone_job_starts_at_once_but_an_announced_one_is_waited_for():
    queue = FairQueue(max_queue=10, max_per_requester=5)
    queue.put(FakeJob("alone", "a"))
    assert names(queue.take_batch(max_images=4, batch_wait=30)) == ["alone"]  # no 30 s wait

    queue.put(FakeJob("first", "a"))
    queue.announce()  # a second request is being validated right now
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take_batch(max_images=4, batch_wait=30)))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive(), "holds the batch open for the announced job"
    queue.put(FakeJob("second", "b"))
    queue.settle()
    worker.join(5)
    assert names(taken[0]) == ["first", "second"]


def test_jobs_put_back_after_a_lost_worker_go_first_in_their_requesters_turns_and_keep_their_places():
    queue = FairQueue(max_queue=10, max_per_requester=2)
    for name, requester in [("a1", "a"), ("b1", "b"), ("c1", "c"), ("a2", "a"), ("c2", "c")]:
        queue.put(FakeJob(name, requester))
    lost = queue.take_batch(max_images=2, batch_wait=0)
    assert names(lost) == ["a1", "b1"]
    queue.put_back(lost)
    assert names(queue.order()) == ["a1", "b1", "c1", "a2", "c2"]
    # Still counted against their requesters: a put-back job is not a new admission.
    with pytest.raises(QueueRefused):
        queue.put(FakeJob("a3", "a"))
