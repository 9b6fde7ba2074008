"""A process pool that scores items with a hard per-item wall-clock limit enforced from outside.

Why processes: math-verify times sympy out with ``signal.alarm``, which only works in a
process's main thread, and some sympy calls never return. Each item runs as its own task in a
``pebble.ProcessPool``; when a task runs past ``timeout_s`` pebble terminates that worker
(SIGTERM, then SIGKILL) and starts a fresh one, and the item comes back as ``timeout``. A
batch therefore returns within about ``timeout_s * ceil(hung_items / workers)`` plus
scheduling slack, and ``batch_timeout_s`` caps the whole batch if set. An item whose worker
died (a crash or an OOM kill, which can hit any item once on a busy node) is retried once in a
fresh worker (``retry_died``); only an item that kills its worker again is ``worker_died``.

The pool starts lazily on first use, is reused across steps, and is shut down by ``close()``
(also at interpreter exit). Workers are forked (``start_method="fork"``, the default, as
PyTorch's DataLoader does): a replacement worker is ready in milliseconds with math-verify
already imported, and the entry script is not re-run. Workers never touch CUDA, so a CUDA
context in the trainer is harmless. ``"forkserver"``/``"spawn"`` avoid forking a threaded
process but re-import the entry script in every worker (it then needs an
``if __name__ == "__main__":`` guard, and every worker pays its imports).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

logger = logging.getLogger(__name__)

WORKER_MODULE = "megatron_rlrt.reward.worker"


@dataclass
class Outcome:
    """What one task gave back: ``value`` when ``status == "ok"``."""

    status: str  # "ok" | "timeout" | "worker_died" | "error"
    value: Any = None
    detail: str = ""


def _limit_memory(memory_mb: int | None) -> None:
    """Worker initializer: cap the address space so a runaway sympy call dies, not the node."""
    if memory_mb:
        import resource

        limit = int(memory_mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _shutdown(pool: Any) -> None:
    try:
        pool.stop()
        pool.join(timeout=10)
    except Exception:  # shutting down at exit: nothing useful left to do
        pass


class ScoringPool:
    """Lazily started pebble process pool with per-item timeouts; shareable by verifiers."""

    def __init__(
        self,
        num_workers: int | None = None,
        start_method: str = "fork",
        worker_memory_mb: int | None = None,
        max_tasks_per_worker: int = 5000,
        retry_died: int = 1,
    ) -> None:
        """``max_tasks_per_worker``: recycle a worker after that many items (sympy and
        math-verify caches grow without bound); 0 keeps workers forever. ``retry_died``: how
        many times an item whose worker died is run again in a fresh worker."""
        self.num_workers = num_workers or max(1, min(8, os.cpu_count() or 1))
        self.max_tasks_per_worker = max_tasks_per_worker
        self.start_method = start_method
        self.worker_memory_mb = worker_memory_mb
        self._pool: Any = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()
        self.restarts = 0
        self.retried = 0  # items rerun after their worker died
        self.retry_died = retry_died

    # -- lifecycle -------------------------------------------------------------------------
    def _ensure(self) -> Any:
        with self._lock:
            if self._pool is not None and self._pool.active:
                return self._pool
            if self._pool is not None:  # broken (e.g. all workers died): replace it
                self.restarts += 1
                logger.warning("scoring pool was broken; starting a new one")
                self._close_locked()
            import importlib

            from pebble import ProcessPool

            importlib.import_module(WORKER_MODULE)  # forked workers inherit math-verify loaded
            ctx = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                # Only takes effect if the forkserver is not running yet; harmless otherwise.
                ctx.set_forkserver_preload([WORKER_MODULE])
            self._pool = ProcessPool(
                max_workers=self.num_workers,
                max_tasks=self.max_tasks_per_worker,
                initializer=_limit_memory,
                initargs=(self.worker_memory_mb,),
                context=ctx,
            )
            self._finalizer = weakref.finalize(self, _shutdown, self._pool)
            return self._pool

    def _close_locked(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # stops and joins the pool once
        self._pool = None
        self._finalizer = None

    def close(self) -> None:
        """Stop all workers; the next ``map`` starts a new pool."""
        with self._lock:
            self._close_locked()

    @property
    def started(self) -> bool:
        return self._pool is not None

    # -- work ------------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[..., Any],
        args_list: Sequence[tuple],
        timeout_s: float,
        batch_timeout_s: float | None = None,
        progress: bool = False,
        desc: str = "scoring",
    ) -> list[Outcome]:
        """Run ``fn(*args)`` for each args tuple; one :class:`Outcome` per item, in order.

        ``fn`` must be importable by module path (a module-level function).
        """
        if not args_list:
            return []
        futures = self._schedule(fn, args_list, timeout_s)
        deadline = None if batch_timeout_s is None else time.monotonic() + batch_timeout_s

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(futures), desc=desc, leave=False)
        outcomes: list[Outcome] = []
        try:
            for fut in futures:
                outcomes.append(self._collect(fut, deadline))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        for attempt in range(self.retry_died):
            died = [i for i, o in enumerate(outcomes) if o.status == "worker_died"]
            if not died:
                break
            logger.warning("%d scoring item(s) lost their worker (%s); retrying in fresh workers",
                           len(died), outcomes[died[0]].detail)
            self.retried += len(died)
            again = self._schedule(fn, [args_list[i] for i in died], timeout_s)
            for i, fut in zip(died, again):
                outcomes[i] = self._collect(fut, deadline)
        return outcomes

    def _schedule(self, fn: Callable[..., Any], args_list: Sequence[tuple], timeout_s: float) -> list:
        pool = self._ensure()
        try:
            return [pool.schedule(fn, args=a, timeout=timeout_s) for a in args_list]
        except RuntimeError:  # pool went inactive between the check and the submit
            self.close()
            pool = self._ensure()
            return [pool.schedule(fn, args=a, timeout=timeout_s) for a in args_list]

    @staticmethod
    def _collect(fut: Any, deadline: float | None) -> Outcome:
        from pebble import ProcessExpired

        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return Outcome("ok", fut.result(timeout=wait))
        except concurrent.futures.TimeoutError:
            # Either pebble killed the task at its per-item limit, or the batch deadline hit
            # while waiting: cancelling makes pebble kill the worker still running it.
            fut.cancel()
            return Outcome("timeout")
        except concurrent.futures.CancelledError:
            return Outcome("timeout")
        except ProcessExpired as e:
            return Outcome("worker_died", detail=f"exit code {e.exitcode}")
        except Exception as e:  # the scorer itself raised (shown with its remote traceback)
            detail = f"{type(e).__name__}: {e}"
            tb = getattr(e, "traceback", "")
            return Outcome("error", detail=(detail + ("\n" + tb if tb else ""))[:2000])
