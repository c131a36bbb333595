"""``prefetched``: the worker thread that lets the network run beside the restore.

The oracle is the plain iterator: the same items in the same order, its exception where it
raised, its ``finally`` run when the consumer leaves early. That the two threads really overlap
is shown by a handshake that would deadlock (and time out) if they ran one after the other.
"""

from __future__ import annotations

import threading

import pytest

from sfpc.inference.prefetch import prefetched

WAIT_S = 10.0  # only reached when the behaviour under test is broken


def test_items_come_in_order_and_all_of_them():
    with prefetched(iter(range(100)), depth=2) as ahead:
        assert list(ahead) == list(range(100))


def test_an_error_of_the_iterator_is_raised_where_its_item_would_have_come():
    def items():
        yield 1
        yield 2
        raise KeyError("slab 3")

    seen = []
    with pytest.raises(KeyError, match="slab 3"), prefetched(items()) as ahead:
        for item in ahead:
            seen.append(item)
    assert seen == [1, 2]


def test_leaving_early_closes_the_iterator_in_its_thread_and_stops_the_worker():
    produced: list[int] = []
    closed = threading.Event()
    threads: set[str] = set()

    def items():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            threads.add(threading.current_thread().name)
            closed.set()

    with prefetched(items(), depth=1) as ahead:
        for item in ahead:
            if item == 3:
                break
    assert closed.is_set() and threads == {"sfpc-prefetch"}
    # 0-3 consumed, one waiting in the queue, one offered or being made: never the rest.
    assert len(produced) <= 6
    assert not any(t.name == "sfpc-prefetch" for t in threading.enumerate())


def test_the_worker_makes_the_next_item_while_the_consumer_holds_this_one():
    second_made = threading.Event()

    def items():
        yield 0
        second_made.set()
        yield 1

    with prefetched(items()) as ahead:
        first = next(ahead)
        # Serial code would only make the second item after this wait: it would time out.
        assert second_made.wait(WAIT_S), "the worker did not run ahead of the consumer"
        assert [first, *ahead] == [0, 1]


def test_depth_bounds_how_far_the_worker_runs_ahead():
    produced: list[int] = []
    gate = threading.Event()

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    with prefetched(items(), depth=3) as ahead:
        next(ahead)
        gate.wait(0.3)  # give the worker time to fill the queue
        # One consumed, three queued, one made and waiting to be offered.
        assert len(produced) <= 5
        assert list(ahead) == list(range(1, 50))


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth"), prefetched(iter([]), depth=0):
        pass


# ----------------------------------------------------------------------------------------------
# FilledAhead: an array filled slab by slab in a worker while the caller reads its first slices
# ----------------------------------------------------------------------------------------------


def test_filled_ahead_fills_every_slice_once_in_order():
    from sfpc.inference.prefetch import FilledAhead

    calls: list[tuple[int, int]] = []
    with FilledAhead(lambda a, b: calls.append((a, b)), n=10, step=4) as filler:
        filler.ready(10)
    assert calls == [(0, 4), (4, 8), (8, 10)]


def test_ready_returns_once_the_slices_asked_for_are_there_not_before():
    from sfpc.inference.prefetch import FilledAhead

    release = threading.Event()
    filled: list[int] = []

    def fill(start: int, stop: int) -> None:
        if start >= 2:
            assert release.wait(WAIT_S)
        filled.extend(range(start, stop))

    with FilledAhead(fill, n=6, step=2) as filler:
        filler.ready(2)  # the first slab is not held back
        assert filled[:2] == [0, 1]
        waiter = threading.Thread(target=filler.ready, args=(6,))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # slices 2-5 are held back: ready(6) must still wait
        release.set()
        waiter.join(WAIT_S)
        assert not waiter.is_alive() and filled == list(range(6))


def test_an_error_of_fill_is_raised_by_ready_and_leaving_stops_the_worker():
    from sfpc.inference.prefetch import FilledAhead

    def fill(start: int, stop: int) -> None:
        if start == 3:
            raise OSError("disk gone")

    with FilledAhead(fill, n=9, step=3) as filler:
        filler.ready(3)  # filled before the error
        with pytest.raises(OSError, match="disk gone"):
            filler.ready(9)
    assert not any(t.name == "sfpc-prepare" for t in threading.enumerate())

    started: list[int] = []
    gate = threading.Event()

    def slow(start: int, stop: int) -> None:
        started.append(start)
        gate.wait(0.05)

    with FilledAhead(slow, n=1000, step=1) as filler:
        filler.ready(1)
    assert len(started) < 1000  # stopped at exit, not run to the end
