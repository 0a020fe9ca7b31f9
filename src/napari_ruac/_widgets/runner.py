"""Run model work off napari's UI thread.

:class:`LatestOnlyRunner` runs one job at a time in a napari thread worker; a job submitted
while another runs waits, and a newer submission replaces the waiting one (clicking fast
re-predicts only for the newest prompts). Results and errors come back on the UI thread.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning

from ..training.process import is_out_of_memory


def describe_error(exc: BaseException) -> str:
    """A one-line message for a notification; out-of-memory gets advice, not a trace."""
    if isinstance(exc, JobError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or is_out_of_memory(text):
        return (
            f"out of memory ({type(exc).__name__}): try a smaller model, the CPU device, or "
            "fewer planes at once. Nothing was changed."
        )
    return f"{type(exc).__name__}: {text}"


class JobError(Exception):
    """A ``RuntimeError`` (torch's out-of-memory and most of its failures) raised inside a
    generator job, re-raised under a type superqt reports: its ``GeneratorWorker`` takes any
    ``RuntimeError`` for "the worker was deleted" and drops it with a warning, so the user
    would never hear that the job failed. ``__cause__`` is the original error."""


def shield_runtime_errors(gen_func: Callable) -> Callable:
    """``gen_func`` with RuntimeErrors raised as :class:`JobError` (generator functions only)."""

    @functools.wraps(gen_func)
    def wrapper(*args, **kwargs):
        try:
            return (yield from gen_func(*args, **kwargs))
        except RuntimeError as exc:
            raise JobError(describe_error(exc)) from exc

    return wrapper


def show_worker_warning(warning_args) -> None:
    """A warning raised in a worker (e.g. untrained weights) as a napari notification."""
    message = warning_args[0] if warning_args else "warning"
    show_warning(str(message))


class LatestOnlyRunner:
    """One worker at a time; pending work is superseded by newer work.

    ``submit(func, *args, on_result=..., on_yield=..., on_finished=...)``: ``func`` runs in a
    thread worker (a
    generator function may ``yield`` progress messages, passed to ``on_yield`` on the UI thread);
    its return value goes to ``on_result`` on the UI thread unless newer work is pending (then it
    is stale and dropped). Errors become napari notifications (``on_error`` may add to that).
    An ``interruptible`` generator job is asked to stop (at its next yield) as soon as newer
    work is submitted, instead of finishing first: its result would be stale anyway.
    """

    def __init__(self, on_error: Callable[[BaseException], None] | None = None, name: str = "job") -> None:
        self.name = name
        self._on_error = on_error
        self._worker = None
        self._pending: tuple | None = None
        self._interruptible = False  # whether the running job stops for newer work
        self.completed = 0  # finished jobs (results applied or dropped), for tests and status

    @property
    def busy(self) -> bool:
        return self._worker is not None or self._pending is not None

    def submit(self, func: Callable, *args: Any, on_result: Callable | None = None,
               on_yield: Callable | None = None, on_finished: Callable | None = None,
               interruptible: bool = False) -> None:
        job = (func, args, on_result, on_yield, on_finished, interruptible)
        if self._worker is None:
            self._start(job)
        else:
            self._pending = job  # the older pending job is dropped unstarted
            if self._interruptible:
                self._worker.quit()

    def cancel_pending(self) -> None:
        self._pending = None

    def quit(self) -> None:
        """Drop pending work and ask a running generator job to stop at its next yield."""
        self._pending = None
        if self._worker is not None:
            self._worker.quit()

    def _start(self, job: tuple) -> None:
        func, args, on_result, on_yield, on_finished, self._interruptible = job
        if inspect.isgeneratorfunction(func):
            func = shield_runtime_errors(func)
        # errors are ours to report (a notification), not re-raised into Qt's event loop
        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True)
        self._worker = worker

        def returned(value):
            if self._pending is None and on_result is not None:
                on_result(value)

        def errored(exc):
            show_error(f"{self.name} failed: {describe_error(exc)}")
            if self._on_error is not None:
                self._on_error(exc)

        worker.returned.connect(returned)
        worker.warned.connect(show_worker_warning)
        worker.errored.connect(errored)
        if on_yield is not None and hasattr(worker, "yielded"):
            worker.yielded.connect(on_yield)
        if on_finished is not None:  # also after a cancel or an error, when nothing returns
            worker.finished.connect(on_finished)
        worker.finished.connect(self._finished)
        worker.start()

    def _finished(self) -> None:
        self._worker, self._interruptible = None, False
        self.completed += 1
        if self._pending is not None:
            job, self._pending = self._pending, None
            self._start(job)
