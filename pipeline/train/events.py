"""Training's lines on the driver: rank 0's events (model/train_loop.py `_Reporter`) shown once, as lines or bars.

Ray forwards a worker's stdout to the driver only wholesale, with the Ray Train controller's and cleaner's own
chatter (and, in Ray 2.60, every line twice). Instead rank 0 sends the lines that matter (losses, AP tables,
resume notices) through a Ray queue, and a thread on the driver shows them: on a terminal a progress bar per epoch
(steps, loss, images/s, ETA) with the other lines above it, elsewhere the same lines the worker prints.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable

from pipeline.progress import Progress


class TrainDisplay:
    """Turns events into output. `tables`: print pycocotools' AP tables (the demo shows only the AP line)."""

    def __init__(self, *, log: Callable[[str], None], live: bool, tables: bool = True):
        self._log, self._live, self._tables = log, live, tables
        self._bar: Progress | None = None
        self._bar_epoch = -1
        self._done = 0

    def handle(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "step":
            self._step(event)
        elif kind == "table":
            if self._tables:
                self._write(event["text"])
        elif kind == "line":
            if event.get("transient") and self._live:
                return  # a bar already says what is happening
            self._close_bar()
            self._write(event["text"])

    def _step(self, e: dict) -> None:
        if not self._live:
            if e.get("text"):
                self._log(e["text"])
            return
        if self._bar is None or self._bar_epoch != e["epoch"]:
            self._close_bar()
            self._bar = Progress(
                f"epoch {e['epoch'] + 1}/{e['epochs']}", e["iters"], unit="step", live=True, log=self._log
            )
            self._bar_epoch, self._done = e["epoch"], 0
        self._bar.update(
            max(0, e["it"] - self._done),
            status=f"loss {e['loss']:.3f}, {e['rate']:.1f} images/s, lr {e['lr']:.4f}",
        )
        self._done = max(self._done, e["it"])

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            self._log(text)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()


class EventPump:
    """A Ray queue the workers put events into, and a driver thread that hands them to a `TrainDisplay`.

    `with EventPump(display) as pump:` pass `pump.queue` to the workers; leaving the block shows what is still
    queued, then removes the queue's actor. Costs no CPU reservation (the queue actor takes `num_cpus=0`: on a
    2-CPU machine a CPU for it would leave the training worker unschedulable).
    """

    POLL_S = 0.5

    def __init__(self, display: TrainDisplay):
        from ray.util.queue import Queue

        self.display = display
        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-events", daemon=True)

    def __enter__(self) -> EventPump:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.display.close()
        try:
            self.queue.shutdown(force=True)
        except Exception:  # noqa: BLE001  (Ray may already be going down; the queue dies with it)
            pass

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                waiting = self.queue.qsize()  # one round trip to the queue's actor per poll, not two
                events = self.queue.get_nowait_batch(waiting) if waiting else []
            except Empty:
                events = []
            except Exception:  # noqa: BLE001  (the queue's actor is gone: nothing more will come)
                return
            for event in events:
                try:
                    self.display.handle(event)
                except Exception:  # noqa: BLE001  (a display problem must not end training)
                    # To the process's own stderr: the job's log file in quiet mode, not the person's screen.
                    traceback.print_exc(file=sys.__stderr__)
            if not events:
                if self._stop.is_set():
                    return
                self._stop.wait(self.POLL_S)
