"""The gRPC listener: a grpc.aio server on server.host and server.grpc_port, started and stopped by
the service with HTTP, and stopped within the same drain deadline."""

from __future__ import annotations

import logging
import os
import socket

import grpc

from appliance.dataplane.plane import DataPlane
from appliance.server.grpc.handlers import Handlers
from appliance.settings import Settings

log = logging.getLogger(__name__)

OFF = -1  # server.grpc_port that turns gRPC off


class GrpcServer:
    """KServe v2 over gRPC for one service; `start` binds (an OSError naming the address when it
    cannot), `stop` lets calls in flight finish until the deadline, then cancels them."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.settings = settings
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        server_settings = self.settings.server
        options = [
            # Messages are bounded as HTTP bodies are, not by grpcio's 4 MB default; answers are not.
            ("grpc.max_receive_message_length", server_settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second service on the same port fails, as HTTP does
            ("grpc.max_connection_idle_ms", int(server_settings.idle_timeout_s * 1000)),
        ]
        server = grpc.aio.server(
            options=options,
            # Calls in progress in all (server.max_connections bounds HTTP connections the same way);
            # beyond it RESOURCE_EXHAUSTED.
            maximum_concurrent_rpcs=server_settings.max_connections,
        )
        server.add_generic_rpc_handlers([Handlers(self.plane, self.settings).generic()])
        address = _address(server_settings.host, server_settings.grpc_port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            await server.stop(None)
            why = _why_not(server_settings.host, server_settings.grpc_port)
            raise OSError(f"cannot listen on {address} for gRPC: {why} (server.host, server.grpc_port)")
        await server.start()
        self._server, self.port = server, port
        log.info("KServe v2 gRPC on %s", _address(server_settings.host, port))
        return port

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls now; those in flight have `grace_s`, then are cancelled."""
        if self._server is not None:
            await self._server.stop(max(0.0, grace_s))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why_not(host: str, port: int) -> str:
    """grpcio says only that it failed; bind a socket to learn why (in use, no such address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return "grpcio could not bind it"
