"""Run blocking work in a thread that can never keep the process alive."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


async def run_in_daemon_thread(function: Callable[..., _T], /, *args: Any) -> _T:
    """Run `function(*args)` in a new daemon thread and return its result.

    asyncio.to_thread uses the default executor, whose threads the process waits for:
    asyncio.Runner.close() waits for them without a timeout on Python 3.11, and the
    interpreter joins them at exit. So a thread stuck in a system call would keep the
    process alive after shutdown. A daemon thread is abandoned at exit instead, so use
    this only for work that may stop at any point, such as reading and checking files.
    If the caller is cancelled, the thread runs on and its result is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    context = contextvars.copy_context()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def post(setter: Callable[[Any], None], value: Any) -> None:
        try:
            loop.call_soon_threadsafe(deliver, setter, value)
        except RuntimeError:
            # The loop is closed, so nothing waits for the result any more.
            pass

    def work() -> None:
        try:
            result = context.run(function, *args)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting task
            post(future.set_exception, exc)
        else:
            post(future.set_result, result)

    name = f"daemon-{getattr(function, '__name__', 'work')}"
    threading.Thread(target=work, name=name, daemon=True).start()
    return await future
