"""Async HTTP for the server rollout engines (SGLang, vLLM): one place for dispatch and faults.

What it does, and the rules it follows (the engines and docs/rollout_engines.md rely on them):

- **Bounded concurrency.** At most ``max_inflight`` requests are in flight over all engines
  (an ``asyncio.Semaphore``); each request goes to the *least-loaded live* engine (fewest
  requests in flight, ties to the lowest index), so a slow engine gets less work.
- **Per-request timeout** (``RetryPolicy.request_timeout_s``, the whole request) and a
  connect timeout.
- **Retries with exponential backoff** (``backoff_s * 2**k`` capped at ``backoff_max_s``) for
  what a retry can fix: connection errors, timeouts, HTTP 408/429/5xx, a response the engine
  marked as aborted (e.g. requests aborted by a weight update) or a malformed response. At
  most ``max_attempts`` tries per request, across engines.
- **Dead engines.** An engine found unusable (``EngineUnusable``: e.g. it reports stale
  weights) is marked dead at once. A connection error (refused, reset, disconnected) triggers one health
  probe of that engine; if the probe fails too, the engine is marked dead for the rest of the
  engine's life and its requests (this one and any that fail later) are re-dispatched to live
  engines. A timeout alone does not kill an engine (long generations are normal).
- **No silent drops.** ``dispatch`` returns one result per job, in job order, or raises
  ``RolloutError``: when a job used up its attempts, when a request is refused with HTTP 4xx
  (a payload bug; a retry cannot fix it), or when no live engine is left ("all N rollout
  engines are gone"). On the first such error every other request is cancelled; nothing
  partial is returned.
- **Progress bar** (tqdm) over jobs, with the number of live engines.

The sync entry point ``run_sync`` runs a coroutine on a private event loop (in a helper
thread when the caller already runs a loop), so the trainer calls the engines as plain
functions.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import aiohttp

from megatron_rlrt.rollout.base import RolloutError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and retry budget for one kind of request."""

    max_attempts: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0
    request_timeout_s: float = 1800.0
    connect_timeout_s: float = 10.0
    health_timeout_s: float = 10.0

    def backoff(self, attempt: int) -> float:
        """Delay before try ``attempt + 1`` (attempt counts from 1), with +-20% jitter."""
        base = min(self.backoff_max_s, self.backoff_s * (2 ** max(0, attempt - 1)))
        return base * (0.8 + 0.4 * random.random())

    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.request_timeout_s, sock_connect=self.connect_timeout_s)


class RetryableResponse(Exception):
    """The engine answered, but with something a retry may fix (aborted, malformed, 5xx)."""


class FatalResponse(Exception):
    """The engine refused the request itself (HTTP 4xx): retrying the same payload cannot help."""


class EngineUnusable(Exception):
    """The engine answered but must not be used again (e.g. it serves stale weights): it is
    marked dead and the request goes to another engine."""


_RETRYABLE_STATUS = {408, 409, 425, 429}


@dataclass
class Endpoint:
    """One engine's HTTP address and what the dispatcher knows about it."""

    url: str
    index: int
    alive: bool = True
    inflight: int = 0
    completed: int = 0
    failures: int = 0
    last_error: str = ""

    def describe(self) -> str:
        state = "alive" if self.alive else f"dead ({self.last_error})"
        return f"engine {self.index} {self.url}: {state}"


def is_retryable_status(status: int) -> bool:
    """5xx and the 4xx codes that mean 'try again' (timeout, conflict, too early, rate limit)."""
    return status >= 500 or status in _RETRYABLE_STATUS


def raise_for_status(status: int, text: str) -> None:
    """Classify an engine's HTTP answer: retryable (``is_retryable_status``) -> RetryableResponse,
    other 4xx -> FatalResponse, else nothing."""
    if is_retryable_status(status):
        raise RetryableResponse(f"HTTP {status}: {text[:300]}")
    if status >= 400:
        raise FatalResponse(f"HTTP {status}: {text[:1000]}")


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(
        exc,
        (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
         ConnectionError),
    )


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


class EndpointPool:
    """The engines one dispatcher sends to. ``health_path`` is probed after a connection error."""

    def __init__(self, urls: Sequence[str], health_path: str = "/health", policy: RetryPolicy | None = None):
        if not urls:
            raise ValueError("EndpointPool needs at least one URL")
        self.endpoints = [Endpoint(url.rstrip("/"), i) for i, url in enumerate(urls)]
        self.health_path = health_path
        self.policy = policy or RetryPolicy()

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.alive]

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        live = self.live()
        if not live:
            raise RolloutError(self.all_dead_message())
        if avoid is not None and len(live) > 1:
            live = [e for e in live if e is not avoid] or live
        return min(live, key=lambda e: (e.inflight, e.index))

    def all_dead_message(self) -> str:
        details = "; ".join(e.describe() for e in self.endpoints)
        return f"all {len(self.endpoints)} rollout engines are gone: {details}"

    def mark_dead(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.alive:
            logger.error("rollout engine %d (%s) marked dead: %s", endpoint.index, endpoint.url, reason)
        endpoint.alive = False
        endpoint.last_error = reason

    async def probe(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> bool:
        """True if the engine answers its health endpoint with 200."""
        try:
            timeout = aiohttp.ClientTimeout(total=self.policy.health_timeout_s)
            async with session.get(endpoint.url + self.health_path, timeout=timeout) as resp:
                return resp.status == 200
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False


SendFn = Callable[[aiohttp.ClientSession, Endpoint, Any], Awaitable[T]]


async def dispatch(
    pool: EndpointPool,
    jobs: Sequence[Any],
    send: SendFn,
    *,
    max_inflight: int = 256,
    policy: RetryPolicy | None = None,
    progress: bool = False,
    desc: str = "rollout",
) -> list[T]:
    """Run ``send(session, endpoint, job)`` for every job; results in job order (see module doc).

    ``send`` raises ``RetryableResponse`` / ``FatalResponse`` for answers it judges, and lets
    aiohttp / asyncio exceptions through; everything else it raises is treated as fatal.
    """
    policy = policy or pool.policy
    results: list[Any] = [None] * len(jobs)
    if not jobs:
        return results
    limit = asyncio.Semaphore(max(1, max_inflight))
    bar = _progress_bar(len(jobs), desc, progress)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)

    async with aiohttp.ClientSession(connector=connector, timeout=policy.timeout()) as session:

        async def run_one(i: int, job: Any) -> None:
            attempt, last = 0, ""
            endpoint: Endpoint | None = None
            while True:
                attempt += 1
                if attempt > policy.max_attempts:
                    raise RolloutError(
                        f"{desc}: request {i} failed after {policy.max_attempts} attempts; last error: {last}"
                    )
                endpoint = pool.pick(avoid=endpoint if last else None)
                async with limit:
                    if not endpoint.alive:  # died while we waited for a slot
                        attempt -= 1
                        continue
                    endpoint.inflight += 1
                    try:
                        results[i] = await send(session, endpoint, job)
                        endpoint.completed += 1
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(engines=f"{len(pool.live())}/{len(pool.endpoints)}")
                        return
                    except FatalResponse as exc:
                        raise RolloutError(f"{desc}: engine {endpoint.url} refused request {i}: {exc}") from exc
                    except EngineUnusable as exc:
                        pool.mark_dead(endpoint, str(exc))
                        last = f"{endpoint.url}: {exc}"
                        attempt -= 1
                        continue
                    except RetryableResponse as exc:
                        last = f"{endpoint.url}: {exc}"
                    except asyncio.TimeoutError:
                        last = f"{endpoint.url}: timed out after {policy.request_timeout_s:.0f}s"
                    except aiohttp.ClientResponseError as exc:
                        if not is_retryable_status(exc.status):
                            raise RolloutError(f"{desc}: engine {endpoint.url} refused request {i}: {exc}") from exc
                        last = f"{endpoint.url}: {_short(exc)}"
                    except aiohttp.ClientError as exc:
                        last = f"{endpoint.url}: {_short(exc)}"
                        if _is_connection_error(exc) and not await pool.probe(session, endpoint):
                            pool.mark_dead(endpoint, _short(exc))
                            attempt -= 1  # re-dispatch of a dead engine's request is not a retry
                            continue
                    finally:
                        endpoint.inflight -= 1
                endpoint.failures += 1
                logger.warning("%s: request %d attempt %d failed (%s); retrying", desc, i, attempt, last)
                await asyncio.sleep(policy.backoff(attempt))

        tasks = [asyncio.ensure_future(run_one(i, job)) for i, job in enumerate(jobs)]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar is not None:
                bar.close()
    return results


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, leave=False)


# --- control-plane calls (one request per engine) ------------------------------------------


@dataclass
class CallResult:
    url: str
    ok: bool
    status: int = 0
    body: Any = None
    error: str = ""


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    payload: dict | None = None,
    *,
    policy: RetryPolicy,
    params: dict | None = None,
    retry_connect: bool = True,
) -> CallResult:
    """One control request (weights, cache, memory, version). Retries connection errors,
    timeouts and 5xx up to ``policy.max_attempts``; a 4xx or ``{"success": false}`` answer is
    returned as ``ok=False`` without retry."""
    last = ""
    for attempt in range(1, policy.max_attempts + 1):
        try:
            kwargs: dict = {"timeout": policy.timeout(), "params": params}
            if method == "POST":
                kwargs["json"] = payload if payload is not None else {}
            async with session.request(method, url, **kwargs) as resp:
                text = await resp.text()
                body = _json_or_text(text)
                if is_retryable_status(resp.status):
                    last = f"HTTP {resp.status}: {text[:500]}"
                elif resp.status >= 400:
                    return CallResult(url, False, resp.status, body, f"HTTP {resp.status}: {text[:1000]}")
                elif isinstance(body, dict) and body.get("success") is False:
                    return CallResult(url, False, resp.status, body, str(body.get("message", body))[:1000])
                else:
                    return CallResult(url, True, resp.status, body)
        except asyncio.TimeoutError:
            last = f"timed out after {policy.request_timeout_s:.0f}s"
        except aiohttp.ClientError as exc:
            last = _short(exc)
            if not retry_connect and _is_connection_error(exc):
                break
        if attempt < policy.max_attempts:
            await asyncio.sleep(policy.backoff(attempt))
    return CallResult(url, False, 0, None, last)


async def call_all(
    method: str,
    urls: Sequence[str],
    path: str,
    payload: dict | None = None,
    *,
    policy: RetryPolicy,
    params: dict | None = None,
    payloads: Sequence[dict] | None = None,
) -> list[CallResult]:
    """The same control request to every URL, concurrently; one ``CallResult`` per URL."""
    async with aiohttp.ClientSession(timeout=policy.timeout()) as session:
        results = list(await asyncio.gather(*[
            call(session, method, url.rstrip("/") + path,
                 payloads[i] if payloads is not None else payload, policy=policy, params=params)
            for i, url in enumerate(urls)
        ]))
    for url, result in zip(urls, results):
        result.url = url.rstrip("/")  # the engine's base URL, not the route
    return results


def _json_or_text(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


# --- running coroutines from synchronous code -----------------------------------------------


def run_sync(coro: Awaitable[T]) -> T:
    """Run ``coro`` to completion from synchronous code, also when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="rollout-http", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.5,
               what: str = "condition") -> None:
    """Poll ``predicate`` until it is true or raise ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")

