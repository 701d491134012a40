"""The connector's web UI and JSON API (``postbridge connector run --ui-listen 127.0.0.1:8444``).

Pages (server-rendered, no JavaScript needed; every form posts to a page route): Overview ``/``, Mappings
``/mappings``, Trust store ``/truststore``, Audit log ``/audit`` (``/audit.csv``), Monitoring ``/monitoring``,
Settings ``/settings``. The JSON API under ``/api/v1/…`` offers every page action (described at
``/api/openapi.json``). Both kinds of route are thin: parse the input, call one function of
:mod:`postbridge.services.connector` (which validates, saves and audits), render the result. A page that shows a
form catches the service's error and renders the form again with the message, the hint and the user's input; the
API answers ``{"error": …, "hint": …}`` with the error's status (422, 404, 409, 413, 400).

:func:`postbridge.web.connector_server.serve_ui` runs the app in the connector's own event loop. Routes that read
the running agent (overview, monitoring, checks) are ``async`` and run on the loop; file-bound ones run in the
thread pool.

Must not: change anything without the service layer, or block the event loop with file I/O.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from postbridge import __version__
from postbridge.connector.agent import Connector
from postbridge.connector.mappings import Mapping, Protocol
from postbridge.errors import PostbridgeError
from postbridge.services import connector as service
from postbridge.services import connector_audit as audit_service
from postbridge.web.auth import AdminStore
from postbridge.web.pages import current_session, flash, http_status, install_common, redirect, render

log = logging.getLogger("postbridge.connector.ui")

TITLE = "postbridge connector"
NAV = (
    ("Overview", "/"),
    ("Mappings", "/mappings"),
    ("Trust store", "/truststore"),
    ("Audit log", "/audit"),
    ("Monitoring", "/monitoring"),
    ("Settings", "/settings"),
)
AUDIT_PAGE_SIZE = 50


class MappingIn(BaseModel):
    """A new mapping: virtual ``host:port`` (what cloud applications ask for) -> internal ``host:port``."""

    virtual: str = Field(examples=["mail.corp.example:143"])
    internal: str = Field(examples=["10.1.2.3:143"])
    protocol: str = Field("tcp", description="'tcp' (bytes pass through) or 'tcp-tls' (the connector opens TLS)")
    tls_server_name: str = Field("", description="name the internal server's certificate carries (tcp-tls only)")
    description: str = ""
    enabled: bool = True


class MappingPatch(BaseModel):
    """The fields to change (omitted ones are kept; ``tls_server_name: ""`` clears it)."""

    internal: str | None = None
    protocol: str | None = None
    tls_server_name: str | None = None
    description: str | None = None
    enabled: bool | None = None


class LogLevelIn(BaseModel):
    level: str = Field(examples=["debug"], description="debug, info, warning or error")


def actor_of(request: Request) -> str:
    return f"web:{current_session(request).user}"


def build_app(connector: Connector, *, admin: AdminStore | None = None) -> FastAPI:
    """The connector UI app for ``connector`` (its ``state`` holds the files the services change)."""
    state = connector.state
    app = FastAPI(
        title=TITLE,
        version=__version__,
        description="Configure and watch a postbridge connector. Log in with POST /api/v1/login, then send the "
        "returned CSRF token as the X-CSRF-Token header with every POST, PATCH, PUT and DELETE.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    admin_store = admin or service.admin_store(connector.state)
    install_common(app, title=TITLE, nav=NAV, admin_path=admin_store.path, admin_command=service.ADMIN_COMMAND)

    # -- overview -----------------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def overview_page(request: Request) -> HTMLResponse:
        return render(request, "connector/overview.html", {"status": service.tunnel_status(connector)})

    @app.get("/api/v1/status", tags=["overview"])
    async def api_status() -> dict[str, Any]:
        """Tunnel state (hub, since when, RTT, reconnects), identity, certificate expiry, log level."""
        return service.tunnel_status(connector)

    # -- mappings -----------------------------------------------------------------------------------------------

    def mappings_page(
        request: Request,
        *,
        results: dict[str, Any] | None = None,
        error: PostbridgeError | None = None,
        form: dict[str, Any] | None = None,
        status: int = 200,
    ) -> HTMLResponse:
        try:
            mappings = service.list_mappings(state)
        except PostbridgeError as exc:
            mappings, error = [], error or exc
        return render(
            request,
            "connector/mappings.html",
            {
                "mappings": mappings,
                "results": results or {},
                "form": form or {"protocol": "tcp"},
                "protocols": [protocol.value for protocol in Protocol],
                "error": error,
            },
            status=status,
        )

    @app.get("/mappings", response_class=HTMLResponse, include_in_schema=False)
    def mappings_list_page(request: Request) -> HTMLResponse:
        return mappings_page(request)

    @app.post("/mappings", response_class=HTMLResponse, include_in_schema=False)
    def mappings_add_page(
        request: Request,
        virtual: Annotated[str, Form()] = "",
        internal: Annotated[str, Form()] = "",
        protocol: Annotated[str, Form()] = "tcp",
        tls_server_name: Annotated[str, Form()] = "",
        description: Annotated[str, Form()] = "",
    ) -> Response:
        form = {
            "virtual": virtual,
            "internal": internal,
            "protocol": protocol,
            "tls_server_name": tls_server_name,
            "description": description,
        }
        try:
            mapping = service.add_mapping(
                state,
                virtual,
                internal,
                protocol=protocol,
                tls_server_name=tls_server_name,
                description=description,
                actor=actor_of(request),
            )
        except PostbridgeError as exc:
            return mappings_page(request, error=exc, form=form, status=http_status(exc))
        flash(request, f"mapped {mapping.virtual} -> {mapping.internal} ({mapping.protocol.value})")
        for warning in service.mapping_warnings(state, mapping):
            flash(request, warning, "warning")
        return redirect("/mappings")

    @app.get("/mappings/edit", response_class=HTMLResponse, include_in_schema=False)
    def mappings_edit_page(request: Request, virtual: str = "") -> HTMLResponse:
        mapping = service.get_mapping(state, virtual)
        return render(request, "connector/mapping_edit.html", edit_context(mapping, mapping.to_json()))

    def edit_context(mapping: Mapping, form: dict[str, Any]) -> dict[str, Any]:
        return {"mapping": mapping, "form": form, "protocols": [protocol.value for protocol in Protocol]}

    @app.post("/mappings/edit", response_class=HTMLResponse, include_in_schema=False)
    def mappings_update_page(
        request: Request,
        virtual: Annotated[str, Form()] = "",
        internal: Annotated[str, Form()] = "",
        protocol: Annotated[str, Form()] = "tcp",
        tls_server_name: Annotated[str, Form()] = "",
        description: Annotated[str, Form()] = "",
    ) -> Response:
        form = {
            "virtual": virtual,
            "internal": internal,
            "protocol": protocol,
            "tls_server_name": tls_server_name,
            "description": description,
        }
        mapping = service.get_mapping(state, virtual)  # NotFound: the error page
        try:
            updated = service.update_mapping(
                state,
                virtual,
                internal=internal,
                protocol=protocol,
                tls_server_name=tls_server_name,
                description=description,
                actor=actor_of(request),
            )
        except PostbridgeError as exc:
            context = edit_context(mapping, form) | {"error": exc}
            return render(request, "connector/mapping_edit.html", context, status=http_status(exc))
        flash(request, f"changed {updated.virtual}: now -> {updated.internal} ({updated.protocol.value})")
        for warning in service.mapping_warnings(state, updated):
            flash(request, warning, "warning")
        return redirect("/mappings")

    @app.post("/mappings/enable", response_class=HTMLResponse, include_in_schema=False)
    def mappings_enable_page(request: Request, virtual: Annotated[str, Form()] = "") -> Response:
        return toggle_page(request, virtual, True)

    @app.post("/mappings/disable", response_class=HTMLResponse, include_in_schema=False)
    def mappings_disable_page(request: Request, virtual: Annotated[str, Form()] = "") -> Response:
        return toggle_page(request, virtual, False)

    def toggle_page(request: Request, virtual: str, enabled: bool) -> Response:
        try:
            mapping = service.set_mapping_enabled(state, virtual, enabled, actor=actor_of(request))
        except PostbridgeError as exc:
            return mappings_page(request, error=exc, status=http_status(exc))
        flash(request, f"{'enabled' if enabled else 'disabled'} {mapping.virtual}")
        return redirect("/mappings")

    @app.post("/mappings/remove", response_class=HTMLResponse, include_in_schema=False)
    def mappings_remove_page(request: Request, virtual: Annotated[str, Form()] = "") -> Response:
        try:
            removed = service.remove_mapping(state, virtual, actor=actor_of(request))
        except PostbridgeError as exc:
            return mappings_page(request, error=exc, status=http_status(exc))
        flash(request, f"removed {removed.virtual} -> {removed.internal}")
        return redirect("/mappings")

    @app.post("/mappings/check", response_class=HTMLResponse, include_in_schema=False)
    async def mappings_check_page(request: Request, virtual: Annotated[str, Form()] = "") -> Response:
        try:
            result = await service.check(state, virtual)
        except PostbridgeError as exc:
            return await asyncio.to_thread(mappings_page, request, error=exc, status=http_status(exc))
        results = {str(result.mapping.virtual): result.to_json()}
        return await asyncio.to_thread(mappings_page, request, results=results)

    @app.post("/mappings/check-all", response_class=HTMLResponse, include_in_schema=False)
    async def mappings_check_all_page(request: Request) -> Response:
        try:
            checked = await service.check_all(state)
        except PostbridgeError as exc:
            return await asyncio.to_thread(mappings_page, request, error=exc, status=http_status(exc))
        results = {str(result.mapping.virtual): result.to_json() for result in checked}
        return await asyncio.to_thread(mappings_page, request, results=results)

    @app.get("/api/v1/mappings", tags=["mappings"])
    def api_mappings() -> list[dict[str, Any]]:
        """All mappings, sorted by virtual address."""
        return [mapping.to_json() for mapping in service.list_mappings(state)]

    @app.post("/api/v1/mappings", tags=["mappings"], status_code=201)
    def api_mapping_add(request: Request, body: MappingIn) -> dict[str, Any]:
        """Add a mapping (used at once by the running connector). 422 for a bad value, 409 when already mapped."""
        mapping = service.add_mapping(
            state,
            body.virtual,
            body.internal,
            protocol=body.protocol,
            tls_server_name=body.tls_server_name,
            description=body.description,
            enabled=body.enabled,
            actor=actor_of(request),
        )
        return {"mapping": mapping.to_json(), "warnings": service.mapping_warnings(state, mapping)}

    @app.post("/api/v1/mappings/check", tags=["mappings"])
    async def api_mapping_check_all() -> list[dict[str, Any]]:
        """Check every mapping (TCP, TLS, greeting); a failed check is a result, not an error."""
        return [result.to_json() for result in await service.check_all(state)]

    @app.get("/api/v1/mappings/{virtual}", tags=["mappings"])
    def api_mapping_get(virtual: str) -> dict[str, Any]:
        """One mapping; 404 when the virtual address is not mapped."""
        return service.get_mapping(state, virtual).to_json()

    @app.patch("/api/v1/mappings/{virtual}", tags=["mappings"])
    def api_mapping_update(request: Request, virtual: str, body: MappingPatch) -> dict[str, Any]:
        """Change the target (internal host:port), protocol, TLS server name, description or enabled flag."""
        mapping = service.update_mapping(
            state,
            virtual,
            internal=body.internal,
            protocol=body.protocol,
            tls_server_name=body.tls_server_name,
            description=body.description,
            enabled=body.enabled,
            actor=actor_of(request),
        )
        return {"mapping": mapping.to_json(), "warnings": service.mapping_warnings(state, mapping)}

    @app.delete("/api/v1/mappings/{virtual}", tags=["mappings"])
    def api_mapping_remove(request: Request, virtual: str) -> dict[str, Any]:
        """Remove a mapping; new connections to it are denied at once."""
        return {"removed": service.remove_mapping(state, virtual, actor=actor_of(request)).to_json()}

    @app.post("/api/v1/mappings/{virtual}/enable", tags=["mappings"])
    def api_mapping_enable(request: Request, virtual: str) -> dict[str, Any]:
        """Enable a mapping."""
        return {"mapping": service.set_mapping_enabled(state, virtual, True, actor=actor_of(request)).to_json()}

    @app.post("/api/v1/mappings/{virtual}/disable", tags=["mappings"])
    def api_mapping_disable(request: Request, virtual: str) -> dict[str, Any]:
        """Disable a mapping: connections to it are denied like unmapped ones, the entry stays."""
        return {"mapping": service.set_mapping_enabled(state, virtual, False, actor=actor_of(request)).to_json()}

    @app.post("/api/v1/mappings/{virtual}/check", tags=["mappings"])
    async def api_mapping_check(virtual: str) -> dict[str, Any]:
        """Check one mapping: TCP, TLS for tcp-tls, and the mail server's greeting."""
        return (await service.check(state, virtual)).to_json()

    # -- trust store ----------------------------------------------------------------------------------------------

    def truststore_page(
        request: Request, *, error: PostbridgeError | None = None, alias: str = "", status: int = 200
    ) -> HTMLResponse:
        try:
            entries = service.list_trusted(state)
        except PostbridgeError as exc:
            entries, error = [], error or exc
        context = {"entries": entries, "alias": alias, "max_bytes": service.MAX_CERTIFICATE_BYTES, "error": error}
        return render(request, "connector/truststore.html", context, status=status)

    @app.get("/truststore", response_class=HTMLResponse, include_in_schema=False)
    def truststore_list_page(request: Request) -> HTMLResponse:
        return truststore_page(request)

    @app.post("/truststore", response_class=HTMLResponse, include_in_schema=False)
    async def truststore_add_page(
        request: Request, certificate: Annotated[UploadFile, File()], alias: Annotated[str, Form()] = ""
    ) -> Response:
        data = await certificate.read(service.MAX_CERTIFICATE_BYTES + 1)
        name = certificate.filename or "upload"
        try:
            entries = await asyncio.to_thread(
                service.add_trusted, state, data, alias=alias.strip(), source=name, actor=actor_of(request)
            )
        except PostbridgeError as exc:
            return await asyncio.to_thread(truststore_page, request, error=exc, alias=alias, status=http_status(exc))
        for entry in entries:
            flash(request, f"trusted {entry.alias}: {entry.info.subject} (SHA-256 {entry.info.fingerprint})")
        return redirect("/truststore")

    @app.post("/truststore/remove", response_class=HTMLResponse, include_in_schema=False)
    def truststore_remove_page(request: Request, alias: Annotated[str, Form()] = "") -> Response:
        try:
            entry = service.remove_trusted(state, alias, actor=actor_of(request))
        except PostbridgeError as exc:
            return truststore_page(request, error=exc, status=http_status(exc))
        flash(request, f"removed {entry.alias} from the trust store")
        return redirect("/truststore")

    @app.get("/api/v1/truststore", tags=["trust store"])
    def api_truststore() -> list[dict[str, Any]]:
        """Trusted CA certificates with validity, fingerprint and an expiry ``warning`` (null when fine)."""
        return service.list_trusted(state)

    @app.post("/api/v1/truststore", tags=["trust store"], status_code=201)
    async def api_truststore_add(
        request: Request, certificate: Annotated[UploadFile, File()], alias: Annotated[str, Form()] = ""
    ) -> dict[str, Any]:
        """Upload CA certificate(s), PEM or DER, at most 1 MiB (413 above). 400 when the file holds no usable CA
        certificate, 409 when it is stored already."""
        data = await certificate.read(service.MAX_CERTIFICATE_BYTES + 1)
        entries = await asyncio.to_thread(
            service.add_trusted,
            state,
            data,
            alias=alias.strip(),
            source=certificate.filename or "upload",
            actor=actor_of(request),
        )
        return {
            "added": [
                {"alias": entry.alias, "subject": entry.info.subject, "fingerprint": entry.info.fingerprint}
                for entry in entries
            ]
        }

    @app.delete("/api/v1/truststore/{alias}", tags=["trust store"])
    def api_truststore_remove(request: Request, alias: str) -> dict[str, Any]:
        """Stop trusting a certificate (alias or SHA-256 fingerprint)."""
        entry = service.remove_trusted(state, alias, actor=actor_of(request))
        return {"removed": {"alias": entry.alias, "fingerprint": entry.info.fingerprint}}

    # -- audit log ------------------------------------------------------------------------------------------------

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(
        request: Request, kind: str = "all", mapping: str = "", since: str = "", until: str = "", page: int = 1
    ) -> HTMLResponse:
        filters = {"kind": kind, "mapping": mapping, "since": since, "until": until}
        context: dict[str, Any] = {"filters": filters, "kinds": audit_service.AUDIT_KINDS, "page": None, "query": {}}
        try:
            mappings = [str(m.virtual) for m in service.list_mappings(state)]
        except PostbridgeError:
            mappings = []
        context["mappings"] = mappings
        try:
            query = audit_service.audit_query(kind, mapping, since, until)
            number = max(1, page)
            offset = (number - 1) * AUDIT_PAGE_SIZE
            result = audit_service.audit_records(state, query, offset=offset, limit=AUDIT_PAGE_SIZE)
        except PostbridgeError as exc:
            return render(request, "connector/audit.html", context | {"error": exc}, status=http_status(exc))
        pages = max(1, -(-result.total // AUDIT_PAGE_SIZE))
        context.update({"result": result, "query": query.to_params(), "number": number, "pages": pages})
        return render(request, "connector/audit.html", context)

    @app.get("/audit.csv", include_in_schema=False)
    def audit_csv_page(
        request: Request, kind: str = "all", mapping: str = "", since: str = "", until: str = ""
    ) -> Response:
        return csv_response(audit_service.audit_csv(state, audit_service.audit_query(kind, mapping, since, until)))

    @app.get("/api/v1/audit", tags=["audit log"])
    def api_audit(
        kind: Annotated[str, Query(description="all, allowed, denied or config")] = "all",
        mapping: Annotated[str, Query(description="virtual host:port")] = "",
        since: Annotated[str, Query(description="ISO 8601, UTC when without zone")] = "",
        until: Annotated[str, Query(description="ISO 8601, exclusive")] = "",
        offset: int = 0,
        limit: int = AUDIT_PAGE_SIZE,
    ) -> dict[str, Any]:
        """Audit records, newest first, filtered; ``total`` counts every match."""
        query = audit_service.audit_query(kind, mapping, since, until)
        return audit_service.audit_records(state, query, offset=offset, limit=limit).to_json()

    @app.get("/api/v1/audit.csv", tags=["audit log"], response_class=Response)
    def api_audit_csv(kind: str = "all", mapping: str = "", since: str = "", until: str = "") -> Response:
        """The filtered audit log as CSV (newest first)."""
        return csv_response(audit_service.audit_csv(state, audit_service.audit_query(kind, mapping, since, until)))

    # -- monitoring and settings ------------------------------------------------------------------------------------

    @app.get("/monitoring", response_class=HTMLResponse, include_in_schema=False)
    async def monitoring_page(request: Request) -> HTMLResponse:
        return render(request, "connector/monitoring.html", {"stats": service.monitoring(connector)})

    @app.get("/api/v1/monitoring", tags=["monitoring"])
    async def api_monitoring() -> dict[str, Any]:
        """Per virtual host: active and total connections, denied and failed ones, bytes in/out, recent errors."""
        return service.monitoring(connector)

    @app.get("/settings", response_class=HTMLResponse, include_in_schema=False)
    def settings_page(request: Request) -> HTMLResponse:
        return render(request, "connector/settings.html", settings_context())

    def settings_context() -> dict[str, Any]:
        return {"level": service.log_level(), "levels": service.LOG_LEVELS, "trace_path": state.trace_path}

    @app.post("/settings/log-level", response_class=HTMLResponse, include_in_schema=False)
    def settings_level_page(request: Request, level: Annotated[str, Form()] = "") -> Response:
        try:
            name = service.set_log_level(state, level, actor=actor_of(request))
        except PostbridgeError as exc:
            return render(
                request, "connector/settings.html", settings_context() | {"error": exc}, status=http_status(exc)
            )
        flash(request, f"log level is now {name} (until the connector restarts)")
        return redirect("/settings")

    @app.get("/api/v1/settings", tags=["settings"])
    def api_settings() -> dict[str, Any]:
        """The running process's log level."""
        return {"log_level": service.log_level(), "levels": list(service.LOG_LEVELS)}

    @app.put("/api/v1/settings/log-level", tags=["settings"])
    def api_set_level(request: Request, body: LogLevelIn) -> dict[str, Any]:
        """Change the running process's log level (stderr and trace.log) until it restarts."""
        return {"log_level": service.set_log_level(state, body.level, actor=actor_of(request))}

    return app


def csv_response(text: str) -> Response:
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="postbridge-audit.csv"'},
    )
