"""The hub's HTTPS API (Starlette, served by uvicorn in the hub's event loop).

* ``POST /oauth/token``: OAuth2 client-credentials grant (form fields or HTTP Basic) -> short-lived JWT.
* ``GET /v1/connectors``: the caller's subaccount's connected connectors by location, with their mappings
  (Bearer JWT from ``/oauth/token``).
* ``GET /v1/locations/{location}/mappings``: the mappings the connectors of one location report (``-`` = default).
* ``POST /v1/locations/{location}/check`` ``{"virtual": "host:port"}``: a connector's availability check of a mapping.
* ``GET /healthz``.

Nothing here changes the hub or a connector. Errors are JSON ``{"error": ..., "hint": ...}`` with a 4xx status.

Every other path goes to the cloud cockpit (:mod:`postbridge.web.cloud_app`: pages under ``/cockpit/``, JSON under
``/api/v1/cockpit/``, login, ``/api/openapi.json``), which has its own administrator login and may change the hub.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Generator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from postbridge.addresses import HostPort
from postbridge.errors import AuthenticationError, PostbridgeError
from postbridge.web.cloud_app import build_cockpit

if TYPE_CHECKING:
    from postbridge.cloud.hub import Hub

log = logging.getLogger("postbridge.api")

INFO_TIMEOUT = 1.0  # seconds the API waits for a connector's fresh info before using the cached one


def _error(status: int, error: str, hint: str = "", **extra: str) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "hint": hint}
    body.update(extra)
    return JSONResponse(body, status_code=status)


def build_app(hub: Hub) -> Starlette:
    async def token(request: Request) -> JSONResponse:
        form = await request.form()
        client_id = str(form.get("client_id", ""))
        secret = str(form.get("client_secret", ""))
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return _error(400, "invalid_request", "the Basic authorization header is not base64 'id:secret'")
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "use grant_type=client_credentials")
        try:
            access_token, ttl = hub.token_for(client_id, secret)
        except AuthenticationError as exc:
            log.warning("token request for client id %r refused: %s", client_id, exc.message)
            return _error(401, "invalid_client", exc.hint, error_description=exc.message)
        return JSONResponse({"access_token": access_token, "token_type": "bearer", "expires_in": ttl})

    def bearer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            raise AuthenticationError("no bearer token", hint="send 'Authorization: Bearer <token from /oauth/token>'")
        return hub.subaccount_of_bearer(header[7:].strip())

    async def connectors(request: Request) -> JSONResponse:
        try:
            subaccount = bearer(request)
        except AuthenticationError as exc:
            return _error(401, exc.message, exc.hint)
        entries = hub.registry.of_subaccount(subaccount)
        # a frozen connector must not stall the API: wait briefly, else answer from the cached info
        await asyncio.gather(*(hub.refresh_info(e, timeout=INFO_TIMEOUT) for e in entries))
        return JSONResponse({"subaccount": subaccount, "connectors": [e.describe() for e in entries]})

    async def mappings(request: Request) -> JSONResponse:
        try:
            subaccount = bearer(request)
        except AuthenticationError as exc:
            return _error(401, exc.message, exc.hint)
        location = request.path_params["location"]
        location = "" if location == "-" else location
        entries = hub.registry.at(subaccount, location)
        if not entries:
            return _error(404, f"no connector connected at location {location!r}", "check the location ID")
        await asyncio.gather(*(hub.refresh_info(e, timeout=INFO_TIMEOUT) for e in entries))
        return JSONResponse({"location": location, "mappings": entries[0].info.get("mappings", [])})

    async def check(request: Request) -> JSONResponse:
        try:
            subaccount = bearer(request)
        except AuthenticationError as exc:
            return _error(401, exc.message, exc.hint)
        location = request.path_params["location"]
        location = "" if location == "-" else location
        entry = hub.registry.pick(subaccount, location)
        if entry is None:
            return _error(404, f"no connector connected at location {location!r}", "check the location ID")
        try:
            body = await request.json()
            virtual = str(body["virtual"])
        except (ValueError, KeyError, TypeError):
            return _error(400, 'send a JSON object like {"virtual": "mail.corp.example:143"}')
        try:
            answer = await entry.session.control("POST", "/v1/check", json.dumps({"virtual": virtual}).encode())
        except PostbridgeError as exc:
            return _error(502, f"connector {entry.identity.connector_id} did not answer: {exc.message}", exc.hint)
        return JSONResponse(json.loads(answer.body or b"{}"), status_code=answer.status)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "connectors": len(hub.registry.all())})

    return Starlette(
        routes=[
            Route("/oauth/token", token, methods=["POST"]),
            Route("/v1/connectors", connectors, methods=["GET"]),
            Route("/v1/locations/{location}/mappings", mappings, methods=["GET"]),
            Route("/v1/locations/{location}/check", check, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Mount("", app=build_cockpit(hub)),
        ]
    )


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the hub owns SIGINT/SIGTERM and stops the API itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_api(hub: Hub, listen: HostPort, stack: AsyncExitStack) -> HostPort:
    """Start the API on ``listen`` with the hub's server certificate; stops when ``stack`` exits."""
    config = uvicorn.Config(
        build_app(hub),
        host=listen.host,
        port=listen.port,
        ssl_keyfile=str(hub.state.server_key_path),
        ssl_certfile=str(hub.state.server_chain_path),
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = _QuietServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(), name="hub api")
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error (port in use, ...)
            raise OSError(f"API on {listen} stopped during start-up")
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await task

    stack.push_async_callback(stop)
    port = listen.port
    for srv in server.servers:
        for sock in srv.sockets:
            port = int(sock.getsockname()[1])
    return HostPort(listen.host, port)
