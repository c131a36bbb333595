"""Work run ahead of its consumer in worker threads: an iterator a few items ahead
(:func:`prefetched`), an array filled slab by slab (:class:`FilledAhead`).

The engine's network (ONNX Runtime, Triton) releases the GIL while it runs, and so does most of
numpy; restoring one slab to the input grid can therefore run on a second core while the network
computes the next slab. :func:`prefetched` is that overlap, bounded: the worker stays at most
``depth`` items ahead, so the memory held is that of ``depth + 2`` slabs whatever the volume.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# How long a blocked worker waits before it looks again whether the consumer has gone.
_POLL_S = 0.05


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


@contextmanager
def prefetched(items: Iterator[T], depth: int = 1) -> Iterator[Iterator[T]]:
    """``items``, produced in a worker thread up to ``depth`` ahead of the consumer.

    An exception raised by ``items`` is raised in the consumer where the item would have come
    (with the worker's traceback). Leaving the ``with`` block early (a consumer error, a break)
    stops the worker at its next item and closes ``items`` in the worker's thread, which is the
    one running it; the block exits once the worker has, so nothing runs on behind the caller.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    ahead: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    break
            else:
                offer(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer to raise
            offer(_Failed(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        while True:
            item = ahead.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]

    worker = threading.Thread(target=work, name="sfpc-prefetch", daemon=True)
    worker.start()
    try:
        yield consume()
    finally:
        stop.set()
        worker.join()


class FilledAhead:
    """``fill(start, stop)`` over ``0:n`` in steps of ``step``, in order, in a worker thread;
    :meth:`ready` blocks until the first slices are filled. The model image is prepared this
    way while the network runs on the slices already there.

    Use as a context manager: leaving it stops the worker after the step it is in and waits
    for it, so that nothing writes into the image after its caller has returned. An error of
    ``fill`` is raised by the next :meth:`ready` that waits on slices it did not fill.
    """

    def __init__(self, fill: Callable[[int, int], None], n: int, step: int) -> None:
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self._fill, self._n, self._step = fill, int(n), int(step)
        self._done = 0
        self._error: BaseException | None = None
        self._stop = False
        self._changed = threading.Condition()
        self.busy_s = 0.0  # seconds spent in fill
        self._worker = threading.Thread(target=self._work, name="sfpc-prepare", daemon=True)

    def __enter__(self) -> FilledAhead:
        self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._stop = True
        self._worker.join()

    def _work(self) -> None:
        try:
            for start in range(0, self._n, self._step):
                with self._changed:
                    if self._stop:
                        return
                t0 = time.perf_counter()
                stop = min(start + self._step, self._n)
                self._fill(start, stop)
                self.busy_s += time.perf_counter() - t0
                with self._changed:
                    self._done = stop
                    self._changed.notify_all()
        except BaseException as error:  # noqa: BLE001 - raised by ready() in the caller
            with self._changed:
                self._error = error
                self._changed.notify_all()

    def ready(self, n: int) -> None:
        """Return once slices ``0:min(n, total)`` are filled (raise the worker's error if it
        failed before filling them)."""
        n = min(int(n), self._n)
        with self._changed:
            while self._done < n:
                if self._error is not None:
                    raise self._error
                self._changed.wait()
