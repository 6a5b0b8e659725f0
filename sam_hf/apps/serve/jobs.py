"""Running requests' work: worker threads, one model call at a time, the request timeout and cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from fastapi import HTTPException

from .settings import ServeSettings

logger = logging.getLogger(__name__)


class _Cancelled(Exception):
    """The request timed out before its model call started; nobody waits for its result."""


class _Jobs:
    """Each request's work (decode, model call, encode) runs in a worker thread, so the event loop stays free; model
    calls take one lock, so concurrent requests never share the predictor's image state.

    Args:
        settings (`ServeSettings`): `workers` (threads) and `request_timeout_s`.
    """

    def __init__(self, settings: ServeSettings):
        self.timeout_s = settings.request_timeout_s
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="sam-hf-serve")
        self.lock = threading.Lock()
        #: Requests in flight, counted by the app against `max_pending`.
        self.pending = 0

    async def run(self, job: Callable[[threading.Event], bytes]) -> bytes:
        """Run `job(cancelled)` in a worker thread; after `request_timeout_s`, 504 and `cancelled` is set."""
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self.executor, job, cancelled)
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError as err:
            cancelled.set()
            logger.warning("A request timed out after %s s.", self.timeout_s)
            raise HTTPException(
                504,
                f"The request did not finish within request_timeout_s = {self.timeout_s} s; the server is busy or "
                "the input is too large. Retry later, or send fewer prompts or a smaller image.",
            ) from err

    @contextmanager
    def model_call(self, cancelled: threading.Event) -> Iterator[None]:
        """Hold the model for one call; a request that timed out while it waited is skipped (`_Cancelled`)."""
        with self.lock:
            if cancelled.is_set():
                raise _Cancelled
            yield

    def close(self) -> None:
        """Drop the jobs that have not started; those running finish in the background."""
        self.executor.shutdown(wait=False, cancel_futures=True)
