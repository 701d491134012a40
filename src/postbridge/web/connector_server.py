"""Serving the connector's web UI (:mod:`postbridge.web.connector_app`) with uvicorn in the connector's own event loop.

Owns: the listening socket (bound before anything else, so a bad ``--ui-listen`` fails early with the address named),
plain HTTP only on a loopback address and HTTPS elsewhere — with the operator's certificate (``--ui-cert``) or the
connector's own (``HOME/connector/client.pem``), which browsers warn about —, the first start's generated
administrator password, and stopping the server with the connector.

Must not: handle a request (connector_app.py does) or install signal handlers (the connector owns SIGINT/SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from postbridge.addresses import HostPort, is_loopback
from postbridge.connector.agent import Connector
from postbridge.errors import ConfigurationError
from postbridge.services import connector as service
from postbridge.web.auth import first_start
from postbridge.web.connector_app import build_app

log = logging.getLogger("postbridge.connector.ui")


@dataclass(frozen=True)
class UiCertificate:
    """The certificate the UI presents: a PEM file with the certificate chain, and the key in it or in ``key``."""

    chain: Path
    key: Path | None = None

    def __str__(self) -> str:
        return f"'{self.chain}'" + (f" and '{self.key}'" if self.key is not None else "")


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the connector owns SIGINT/SIGTERM and stops the UI itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_ui(
    connector: Connector,
    listen: HostPort,
    stack: AsyncExitStack,
    *,
    tls: bool | None = None,
    certificate: UiCertificate | None = None,
) -> HostPort:
    """Serve the UI of ``connector`` on ``listen`` until ``stack`` exits; return the address it listens on.

    HTTPS (``tls=True``, or ``None`` on an address that is not loopback, or whenever ``certificate`` is given) with
    ``certificate`` — the operator's server certificate, e.g. from the company CA, which browsers can trust — or else
    the connector's own; plain HTTP only on a loopback address. At the first start (no administrator password yet) a
    password is generated and printed once to stderr. Raises ConfigurationError for plain HTTP on an address that is
    not loopback or together with a certificate (before anything is opened), an address that cannot be used (in use,
    not local) or a certificate that cannot be loaded.
    """
    if certificate is not None:
        if tls is False:
            raise ConfigurationError(
                "--ui-cert needs HTTPS, but --ui-no-tls asks for plain HTTP", hint="drop --ui-no-tls or --ui-cert"
            )
        tls = True
    elif tls is None:
        tls = not is_loopback(listen.host)
    elif not tls and not is_loopback(listen.host):
        raise ConfigurationError(
            f"refusing to serve the connector UI over plain HTTP on '{listen}', which is not a loopback address: "
            "the password and the session would cross the network unencrypted",
            hint="drop --ui-no-tls (the UI then uses HTTPS with the connector's certificate), or listen on 127.0.0.1",
        )
    own = UiCertificate(connector.state.credentials_path)  # client.pem holds certificate and key
    served = certificate or own
    scheme = "https" if tls else "http"
    sock = _bind(listen)
    bound = HostPort(listen.host, int(sock.getsockname()[1]))
    try:
        app = build_app(connector)
        first_start(service.admin_store(connector.state), what=f"connector UI at {scheme}://{bound}")
        config = uvicorn.Config(
            app,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="off",
            ws="none",
            proxy_headers=False,
            server_header=False,
            ssl_certfile=str(served.chain) if tls else None,
            ssl_keyfile=str(served.key) if tls and served.key is not None else None,
        )
        try:
            config.load()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            hint = (
                "give a PEM file with the server certificate (and its intermediates) and its unencrypted key, in the "
                "same file or with --ui-key"
                if certificate is not None
                else "renew the connector's certificate ('postbridge connector renew'), or listen on 127.0.0.1"
            )
            raise ConfigurationError(f"cannot serve the UI over HTTPS with {served}: {exc}", hint=hint) from exc
        server = _QuietServer(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="connector ui")
        while not server.started:
            if task.done():
                task.result()
                raise ConfigurationError(f"the connector UI on {bound} stopped during start-up")
            await asyncio.sleep(0.01)
    except BaseException:
        sock.close()
        raise

    async def stop() -> None:
        server.should_exit = True
        await task
        sock.close()

    stack.push_async_callback(stop)
    log.info("connector UI at %s://%s (API described at /api/openapi.json)", scheme, bound)
    return bound


def _bind(listen: HostPort) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigurationError(
            f"--ui-listen '{listen}': cannot resolve '{listen.host}'", hint="give an IP address such as 127.0.0.1"
        ) from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"--ui-listen '{listen}': cannot listen there: {exc.strerror or exc}",
            hint="choose a free port, or an address of this machine",
        ) from exc
    return sock
