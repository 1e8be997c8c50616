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


class Acceptor:
    """The protocol factory of a listening socket, which can move to another listener.

    A reload that changes a listener's protocol or name but keeps its address hands the
    socket to the new listener, because a second socket cannot bind a listening address.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def __call__(self) -> Connection:
        return self.listener._new_connection()


class Listener:
    """Accepts clients on one address and port and starts a session for each.

    New sessions start with `snapshot`, the config this listener serves. A reload sets it
    on the listeners that it keeps, while a listener that it removes or rebinds keeps the
    old one.
    """

    def __init__(
        self,
        name: str,
        config: ListenerConfig,
        make_env: Callable[[str, Snapshot | None], SessionEnv],
        session_classes: dict[str, type[Session]],
        snapshot: Snapshot | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.make_env = make_env
        self.session_class = session_classes[config.protocol]
        self.snapshot = snapshot
        self.sessions: set[Session] = set()
        self.server: asyncio.Server | None = None
        self.acceptor: Acceptor | None = None

    @property
    def address(self) -> str:
        host = f"[{self.config.bind}]" if ":" in self.config.bind else self.config.bind
        return f"{host}:{self.config.port}"

    async def bind(self) -> None:
        """Bind the socket without accepting yet, so a reload can bind before it commits."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.config.bind else socket.AF_INET
        acceptor = Acceptor(self)
        try:
            self.server = await loop.create_server(
                acceptor,
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
        self.acceptor = acceptor

    def adopt_socket(self, previous: Listener) -> None:
        """Take over the bound socket of `previous`, which then accepts nothing more.

        Connections accepted from now on start sessions here; sessions that `previous`
        started stay with it.
        """
        self.server, previous.server = previous.server, None
        self.acceptor, previous.acceptor = previous.acceptor, None
        if self.acceptor is not None:
            self.acceptor.listener = self

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
        """Close the listening socket, leaving running sessions open."""
        if self.server is not None:
            serving = self.server.is_serving()
            self.server.close()
            self.server = None
            self.acceptor = None
            if serving:
                logger.info(
                    "listener {} stopped accepting on {}", self.name, self.address
                )

    def _new_connection(self) -> Connection:
        connection = Connection()
        connection.tls_on_connect = self.config.tls == "implicit"
        connection.on_made = self._start_session
        return connection

    def _start_session(self, connection: Connection) -> None:
        env = self.make_env(self.name, self.snapshot)
        env.extra["over_limit"] = len(self.sessions) >= env.snapshot.config.limits.max_connections
        previous = env.on_finished

        def finished(session: Session) -> None:
            self.sessions.discard(session)
            previous(session)

        env.on_finished = finished
        session = self.session_class(env, connection)
        self.sessions.add(session)
        session.task = asyncio.get_running_loop().create_task(session.run())
