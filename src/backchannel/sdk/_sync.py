"""Run coroutines from synchronous code on a private event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """A private event loop running in a daemon thread; :meth:`run` blocks on a coroutine.

    One loop for the object's lifetime, so resources bound to a loop (an aiohttp session
    and its pooled connections) are reused across calls, and the calling thread may have
    its own event loop, or none.
    """

    def __init__(self, name: str = "backchannel-sdk") -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The private event loop."""
        return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception).

        Raises:
            RuntimeError: the runner is closed, or this is called from its own loop thread
                (which would deadlock).
            TimeoutError: ``timeout`` seconds passed; the coroutine is cancelled.
        """
        if self._closed:
            coro.close()
            raise RuntimeError("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run() called from its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None
        except BaseException:
            # KeyboardInterrupt in the caller: do not leave the coroutine running.
            future.cancel()
            raise

    def close(self) -> None:
        """Stop the loop after its pending callbacks, join the thread, close the loop."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.close() called from its own loop thread")
        with self._lock:
            if self._closed:
                return
            self._closed = True
        loop = self._loop
        # Both work even before the thread entered run_forever(): they queue callbacks.
        asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join()
        loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _cancel_all() -> None:
    """Cancel the loop's other tasks and let them finish, so closing leaves nothing pending."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
