"""Run an iterator a few items ahead in a worker thread.

The engine's network (ONNX Runtime, Triton) releases the GIL while it runs, and so does most of
numpy; restoring one slab to the input grid can therefore run on a second core while the network
computes the next slab. :func:`prefetched` is that overlap, bounded: the worker stays at most
``depth`` items ahead, so the memory held is that of ``depth + 2`` slabs whatever the volume.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
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
