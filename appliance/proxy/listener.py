"""A listener: one asyncio server that turns each accepted connection into a session."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from loguru import logger

from appliance.config import ListenerConfig
from appliance.proxy.connection import Connection
from appliance.proxy.session import Session, SessionEnv, Snapshot


class BindError(Exception):
    """A listener's address could not be bound."""


class Listener:
    """Accepts clients on one address and port and starts a session for each."""

    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        make_env: Callable[[str], SessionEnv],
        session_classes: dict[str, type[Session]],
    ) -> None:
        self.name = name
        self.config = config
        self.make_env = make_env
        self.session_class = session_classes[config.protocol]
        self.sessions: set[Session] = set()
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        host = f"[{self.config.bind}]" if ":" in self.config.bind else self.config.bind
        return f"{host}:{self.config.port}"

    async def bind(self) -> None:
        """Bind the socket without accepting yet, so a reload can bind before it commits."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        try:
            self.server = await loop.create_server(
                self._new_connection,
                self.config.bind,
                self.config.port,
                family=family,
                reuse_address=True,
                backlog=1024,
                start_serving=False,
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise BindError(
                f"listeners.{self.name}: cannot listen on {self.address}: {reason}"
            ) from None

    async def start(self) -> None:
        assert self.server is not None
        await self.server.start_serving()
        logger.info(
            "listener {} accepting {} on {} (tls {})",
            self.name,
            self.config.protocol,
            self.address,
            self.config.tls,
        )

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            logger.info("listener {} stopped accepting on {}", self.name, self.address)

    def _new_connection(self) -> Connection:
        connection = Connection()
        connection.tls_on_connect = self.config.tls == "implicit"
        connection.on_made = self._start_session
        return connection

    def _start_session(self, connection: Connection) -> None:
        env = self.make_env(self.name)
        env.extra["over_limit"] = len(self.sessions) >= env.snapshot.config.limits.max_connections
        previous = env.on_finished

        def finished(session: Session) -> None:
            self.sessions.discard(session)
            previous(session)

        env.on_finished = finished
        session = self.session_class(env, connection)
        self.sessions.add(session)
        session.task = asyncio.get_running_loop().create_task(session.run())
