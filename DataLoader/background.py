"""``Background``: an iterator run in a thread of its own, a few items ahead of the one who iterates it.

Two parts of the input pipeline use it: ``BatchLoader`` joins the slices of each batch from its workers,
and ``on_device`` decodes ``--gpu-decode`` batches while the caller computes. The thread's work must
release the GIL to overlap (torch ops, copies, nvJPEG), which is what both do.
"""
import queue
import threading
from typing import NamedTuple

_END = object()


class _Failed(NamedTuple):
    error: BaseException


class Background:
    """Iterate ``items`` in a daemon thread, at most ``ahead`` items before the consumer: iterating gives the
    items, or raises what the thread met (an unreadable image, a worker's crash). ``setup`` runs first in
    the thread (per-thread settings: the CUDA device, torch's number of threads). ``stop()`` ends the thread
    after the item it is on (a pass left early), so that what it iterated, a DataLoader's persistent workers,
    can start another pass."""

    def __init__(self, items, ahead, setup=None, name="sat-background"):
        self.items, self.setup = items, setup
        self.ready, self.stopping = queue.Queue(maxsize=ahead), threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            if self.setup is not None:
                self.setup()
            for item in self.items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the consumer's thread
            self._put(_Failed(err))
        finally:
            close = getattr(self.items, "close", None)  # a generator: its own clean-up runs in this thread
            if close is not None:
                close()

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        try:
            while True:
                item = self.ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    error, item = item.error, None
                    try:
                        raise error
                    finally:
                        del error  # this frame, kept by the error's traceback, must not keep the error
                yield item
        finally:
            self.stop()

    def stop(self):
        """Stop the thread and wait for it."""
        self.stopping.set()
        self.thread.join()
