"""The cloud cockpit: server-rendered pages under ``/cockpit/…`` and their JSON API under ``/api/v1/cockpit/…``.

The app is mounted into the hub's HTTPS API server (:mod:`postbridge.cloud.api`) and runs on the hub's event loop,
so it sees the hub's registry directly. Every page action is a form POST to a page route that calls the SAME
:class:`~postbridge.services.cloud.CloudService` method as its JSON route; routes only parse input, call the service
and render. Blocking work (the connection test, the runtime's state store) runs in a worker thread; whatever
touches the registry or a tunnel (connectors, revocation) stays on the loop.

Pages: subaccounts with their connected connectors and mappings, enrollment tokens, connector certificates,
keystore, credential names, the connection test (with "add to keystore" after a confirmed fingerprint) and the
flows runtime (health, message log, one message's attempts).

Must not: hold configuration logic (the service does), or show a secret other than the one-time client secret of a
subaccount or the text of a token at the moment they are created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from markupsafe import Markup, escape
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from postbridge.errors import PostbridgeError
from postbridge.mail.probe import KINDS, ProbeReport
from postbridge.mail.settings import AuthMethod, Protection, Proxy
from postbridge.runtime.store import MessageRecord, MessageStatus
from postbridge.services import InvalidInput, NotFound
from postbridge.services.cloud import ADMIN_COMMAND, MAX_CERTIFICATE_UPLOAD, CloudService, admin_path, anchor_candidates
from postbridge.services.cloud_views import TEST_TIMEOUT, ConnectionTestRequest, MessageDetail, ago
from postbridge.web.pages import flash, http_status, install_common, redirect, render, templates

if TYPE_CHECKING:
    from postbridge.cloud.hub import Hub

T = TypeVar("T")
TITLE = "postbridge cloud cockpit"
NAV = (
    ("Subaccounts", "/cockpit/subaccounts"),
    ("Tokens", "/cockpit/tokens"),
    ("Certificates", "/cockpit/certificates"),
    ("Keystore", "/cockpit/keystore"),
    ("Credentials", "/cockpit/credentials"),
    ("Connection test", "/cockpit/test"),
    ("Flows", "/cockpit/flows"),
)
API = "/api/v1/cockpit"


# -- request bodies of the JSON API -----------------------------------------------------------------------------------


class SubaccountIn(BaseModel):
    name: str


class TokenIn(BaseModel):
    subaccount: str
    location: str = ""
    ttl_minutes: float = 15


class CertificateIn(BaseModel):
    certificate: str  # PEM text: one certificate or several
    alias: str = ""


class ConnectionTestIn(BaseModel):
    kind: str = "imap"
    address: str = ""
    proxy: str = "internet"
    location_id: str = ""
    subaccount: str = ""
    protection: str = "starttls-mandatory"
    auth: str = ""
    credential: str = ""
    tls_server_name: str = ""
    check_auth: bool = False
    timeout: float = TEST_TIMEOUT


class AddAnchorIn(ConnectionTestIn):
    fingerprint: str = ""
    confirm: bool = False


# -- JSON shapes ----------------------------------------------------------------------------------------------------


def _plain(value: Any) -> dict[str, Any]:
    """A view (a dataclass instance) as a JSON object."""
    return dataclasses.asdict(value)


def report_json(report: ProbeReport) -> dict[str, Any]:
    """The test report with what 'add to keystore' would trust (empty when adding would not help)."""
    return {
        **report.to_json(),
        "anchor_candidates": [
            {**cert.to_json(), "sha256": cert.info.fingerprint} for cert in anchor_candidates(report)
        ],
    }


def detail_json(detail: MessageDetail) -> dict[str, Any]:
    return {**dataclasses.asdict(detail.record), "history": [dataclasses.asdict(a) for a in detail.attempts]}


# -- template helpers -----------------------------------------------------------------------------------------------


def _utc(moment: float | str | None) -> str:
    if moment is None or moment == "":
        return "-"
    if isinstance(moment, str):
        try:
            parsed = datetime.fromisoformat(moment)
        except ValueError:
            return moment
        return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _breakable(text: str, every: int = 8) -> Markup:
    """Long serials and fingerprints may wrap (a phone is narrower than 64 hex digits)."""
    return Markup("<wbr>").join(escape(text[start : start + every]) for start in range(0, len(text), every))


templates.env.filters["cockpit_breakable"] = _breakable
templates.env.filters["cockpit_utc"] = _utc
templates.env.filters["cockpit_age"] = ago


def build_cockpit(hub: Hub) -> FastAPI:
    """The cockpit app of ``hub`` (pages, JSON API, login, OpenAPI at ``/api/openapi.json``)."""
    service = CloudService(hub.state, hub=hub, flows_file=hub.config.flows_file)
    app = FastAPI(
        title=TITLE,
        description="The hub operator's cockpit: subaccounts, connectors, enrollment tokens, certificates, "
        "keystore, credential names, the connection test and the flows runtime. Log in with POST /api/v1/login "
        "and send the CSRF token it returns as 'X-CSRF-Token' on every POST and DELETE.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    install_common(app, title=TITLE, nav=NAV, admin_path=admin_path(service.home), admin_command=ADMIN_COMMAND)
    _add_api(app, service)
    _add_pages(app, service)
    return app


async def _blocking(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(function, *args, **kwargs)


# -- JSON API -------------------------------------------------------------------------------------------------------


def _add_api(app: FastAPI, service: CloudService) -> None:
    @app.get(f"{API}/subaccounts", tags=["subaccounts"])
    async def api_subaccounts() -> list[dict[str, Any]]:
        """Subaccounts, each with its connected connectors (by location) and the mappings they report."""
        return [_plain(view) for view in await service.subaccounts_with_connectors()]

    @app.post(f"{API}/subaccounts", tags=["subaccounts"], status_code=201)
    async def api_add_subaccount(body: SubaccountIn) -> dict[str, Any]:
        """Create a subaccount; the answer holds its client secret, shown only this once."""
        return _plain(service.add_subaccount(body.name))

    @app.get(f"{API}/tokens", tags=["enrollment tokens"])
    async def api_tokens() -> list[dict[str, Any]]:
        """Enrollment tokens with expiry and state (unused, used, expired, revoked); never their text."""
        return [_plain(view) for view in service.tokens()]

    @app.post(f"{API}/tokens", tags=["enrollment tokens"], status_code=201)
    async def api_create_token(body: TokenIn) -> dict[str, Any]:
        """A one-time enrollment token for a connector of ``subaccount`` at ``location``; its text is shown once."""
        return _plain(service.create_token(body.subaccount, body.location, body.ttl_minutes))

    @app.post(f"{API}/tokens/{{token_id}}/revoke", tags=["enrollment tokens"])
    async def api_revoke_token(token_id: str) -> dict[str, Any]:
        """Make an unused token unusable."""
        return _plain(service.revoke_token(token_id))

    @app.get(f"{API}/certificates", tags=["certificates"])
    async def api_certificates() -> list[dict[str, Any]]:
        """Issued connector certificates with expiry, revocation and whether a tunnel uses them now."""
        return [_plain(view) for view in service.certificates()]

    @app.post(f"{API}/certificates/{{serial}}/revoke", tags=["certificates"])
    async def api_revoke_certificate(serial: str) -> dict[str, Any]:
        """Revoke a connector certificate: its tunnel closes now and the hub refuses it from then on."""
        return _plain(service.revoke_certificate(serial))

    @app.get(f"{API}/keystore", tags=["keystore"])
    async def api_keystore() -> list[dict[str, Any]]:
        """The CA certificates the mail adapter trusts (HOME/keystore)."""
        return [_plain(entry) for entry in await _blocking(service.keystore)]

    @app.post(f"{API}/keystore", tags=["keystore"], status_code=201)
    async def api_keystore_add(body: CertificateIn) -> list[dict[str, Any]]:
        """Trust the CA certificate(s) in ``certificate`` (PEM); 400 for an unreadable one, 413 over 1 MiB."""
        data = body.certificate.encode("utf-8")
        return [_plain(entry) for entry in await _blocking(service.keystore_add, data, alias=body.alias)]

    @app.delete(f"{API}/keystore/{{alias}}", tags=["keystore"])
    async def api_keystore_remove(alias: str) -> dict[str, Any]:
        """Stop trusting an entry (alias or SHA-256 fingerprint)."""
        return _plain(await _blocking(service.keystore_remove, alias))

    @app.get(f"{API}/credentials", tags=["credentials"])
    async def api_credentials() -> list[dict[str, str]]:
        """Names, kinds and users of the credential store; never a secret."""
        return await _blocking(service.credentials)

    @app.post(f"{API}/connection-test", tags=["connection test"])
    async def api_connection_test(body: ConnectionTestIn) -> dict[str, Any]:
        """Test a channel step by step (as 'postbridge test' does); 200 with ``ok`` false when a step fails."""
        request = ConnectionTestRequest.parse(body.model_dump())
        return report_json(await _blocking(service.connection_test, request))

    @app.post(f"{API}/connection-test/add-to-keystore", tags=["connection test"])
    async def api_add_anchor(body: AddAnchorIn) -> dict[str, Any]:
        """Without ``confirm``: what would be added (the test runs again; nothing changes). With ``confirm`` true
        and the ``fingerprint`` shown: trust that certificate if the server still presents it, and test again."""
        request = ConnectionTestRequest.parse(body.model_dump(exclude={"fingerprint", "confirm"}))
        if not body.confirm:
            report = await _blocking(service.connection_test, request)
            return {"confirm_needed": True, "added": [], "report": report_json(report)}
        if not body.fingerprint:
            raise InvalidInput(
                "confirming needs the SHA-256 fingerprint that was shown", hint="send 'fingerprint' with 'confirm'"
            )
        result = await _blocking(service.add_test_anchor, request, body.fingerprint)
        return {
            "confirm_needed": False,
            "added": [_plain(entry) for entry in result.added],
            "report": report_json(result.report),
        }

    @app.get(f"{API}/flows", tags=["flows"])
    async def api_flows() -> list[dict[str, Any]]:
        """Health of every flow (healthy, stale, failing, disabled), last poll and backlog; 404 without --flows."""
        return [_plain(view) for view in await _blocking(service.flows)]

    @app.get(f"{API}/messages", tags=["flows"])
    async def api_messages(
        flow: str = "", status: str = "", since: str = "", search: str = "", limit: int = 100
    ) -> list[dict[str, Any]]:
        """The message processing log, newest first; ``since`` is 30m, 2h, 1d or an ISO date."""
        records = await _blocking(service.messages, flow=flow, status=status, since=since, search=search, limit=limit)
        return [_plain(record) for record in records]

    @app.get(API + "/messages/{key:path}", tags=["flows"])
    async def api_message(key: str) -> list[dict[str, Any]]:
        """One message (key or idempotency key) with every attempt."""
        return [detail_json(detail) for detail in await _blocking(service.message, key)]


# -- pages ----------------------------------------------------------------------------------------------------------


def _failed(request: Request, name: str, context: dict[str, Any], exc: PostbridgeError) -> HTMLResponse:
    """The page again, with the error above it and the user's input kept."""
    return render(request, name, {**context, "error": exc}, status=http_status(exc))


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str) and key != "csrf_token"}


def _test_choices(service: CloudService) -> dict[str, Any]:
    try:
        credentials = [entry["name"] for entry in service.credentials()]
    except PostbridgeError:
        credentials = []
    return {
        "kinds": KINDS,
        "proxies": [proxy.value for proxy in Proxy],
        "protections": [protection.value for protection in Protection],
        "auths": [method.value for method in AuthMethod],
        "subaccount_names": [view.name for view in service.subaccounts()],
        "credential_names": credentials,
    }


def _add_pages(app: FastAPI, service: CloudService) -> None:
    @app.get("/", include_in_schema=False)
    @app.get("/cockpit", include_in_schema=False)
    @app.get("/cockpit/", include_in_schema=False)
    async def home() -> Response:
        return redirect("/cockpit/subaccounts")

    # subaccounts
    @app.get("/cockpit/subaccounts", response_class=HTMLResponse, include_in_schema=False)
    async def subaccounts_page(request: Request) -> HTMLResponse:
        views = await service.subaccounts_with_connectors()
        return render(request, "cloud/subaccounts.html", {"subaccounts": views, "form": {}})

    @app.post("/cockpit/subaccounts", response_class=HTMLResponse, include_in_schema=False)
    async def subaccounts_add(request: Request) -> HTMLResponse:
        form = await _form(request)
        try:
            created = service.add_subaccount(form.get("name", ""))
        except PostbridgeError as exc:
            views = await service.subaccounts_with_connectors()
            return _failed(request, "cloud/subaccounts.html", {"subaccounts": views, "form": form}, exc)
        views = await service.subaccounts_with_connectors()
        return render(request, "cloud/subaccounts.html", {"subaccounts": views, "form": {}, "created": created})

    # enrollment tokens
    def tokens_context(form: dict[str, str]) -> dict[str, Any]:
        names = [view.name for view in service.subaccounts()]
        return {"tokens": service.tokens(), "subaccount_names": names, "form": form}

    @app.get("/cockpit/tokens", response_class=HTMLResponse, include_in_schema=False)
    async def tokens_page(request: Request) -> HTMLResponse:
        return render(request, "cloud/tokens.html", tokens_context({}))

    @app.post("/cockpit/tokens", response_class=HTMLResponse, include_in_schema=False)
    async def tokens_create(request: Request) -> HTMLResponse:
        form = await _form(request)
        try:
            ttl = _number(form.get("ttl_minutes", "15"), "token lifetime")
            created = service.create_token(form.get("subaccount", ""), form.get("location", ""), ttl)
        except PostbridgeError as exc:
            return _failed(request, "cloud/tokens.html", tokens_context(form), exc)
        return render(request, "cloud/tokens.html", {**tokens_context({}), "created": created})

    @app.post("/cockpit/tokens/{token_id}/revoke", include_in_schema=False)
    async def tokens_revoke(request: Request, token_id: str) -> Response:
        try:
            service.revoke_token(token_id)
        except PostbridgeError as exc:
            return _failed(request, "cloud/tokens.html", tokens_context({}), exc)
        flash(request, f"token {token_id} revoked: it can no longer enroll a connector")
        return redirect("/cockpit/tokens")

    # certificates
    @app.get("/cockpit/certificates", response_class=HTMLResponse, include_in_schema=False)
    async def certificates_page(request: Request) -> HTMLResponse:
        return render(request, "cloud/certificates.html", {"certificates": service.certificates()})

    @app.post("/cockpit/certificates/{serial}/revoke", include_in_schema=False)
    async def certificates_revoke(request: Request, serial: str) -> Response:
        try:
            revoked = service.revoke_certificate(serial)
        except PostbridgeError as exc:
            return _failed(request, "cloud/certificates.html", {"certificates": service.certificates()}, exc)
        flash(request, f"certificate {revoked.serial} of connector {revoked.connector_id} revoked")
        return redirect("/cockpit/certificates")

    # keystore and credentials
    async def keystore_context(form: dict[str, str]) -> dict[str, Any]:
        try:
            entries, problem = await _blocking(service.keystore), None
        except PostbridgeError as exc:
            entries, problem = [], exc
        return {"entries": entries, "problem": problem, "form": form, "limit": MAX_CERTIFICATE_UPLOAD}

    @app.get("/cockpit/keystore", response_class=HTMLResponse, include_in_schema=False)
    async def keystore_page(request: Request) -> HTMLResponse:
        return render(request, "cloud/keystore.html", await keystore_context({}))

    @app.post("/cockpit/keystore", response_class=HTMLResponse, include_in_schema=False)
    async def keystore_upload(request: Request) -> Response:
        form = await request.form()
        alias = str(form.get("alias") or "")
        upload = form.get("file")
        try:
            if not isinstance(upload, UploadFile) or not upload.filename:
                raise InvalidInput("no certificate file was chosen", hint="choose a PEM or DER file to upload")
            data = await upload.read(MAX_CERTIFICATE_UPLOAD + 1)
            added = await _blocking(service.keystore_add, data, alias=alias, source=f"'{upload.filename}'")
        except PostbridgeError as exc:
            return _failed(request, "cloud/keystore.html", await keystore_context({"alias": alias}), exc)
        flash(request, "added to the keystore: " + ", ".join(f"{e.alias} ({e.subject})" for e in added))
        return redirect("/cockpit/keystore")

    @app.post("/cockpit/keystore/{alias}/remove", include_in_schema=False)
    async def keystore_remove(request: Request, alias: str) -> Response:
        try:
            removed = await _blocking(service.keystore_remove, alias)
        except PostbridgeError as exc:
            return _failed(request, "cloud/keystore.html", await keystore_context({}), exc)
        flash(request, f"removed {removed.alias} ({removed.subject}) from the keystore")
        return redirect("/cockpit/keystore")

    @app.get("/cockpit/credentials", response_class=HTMLResponse, include_in_schema=False)
    async def credentials_page(request: Request) -> HTMLResponse:
        try:
            return render(request, "cloud/credentials.html", {"credentials": await _blocking(service.credentials)})
        except PostbridgeError as exc:
            return _failed(request, "cloud/credentials.html", {"credentials": []}, exc)

    # connection test
    @app.get("/cockpit/test", response_class=HTMLResponse, include_in_schema=False)
    async def test_page(request: Request) -> HTMLResponse:
        defaults = ConnectionTestRequest().to_json()
        return render(request, "cloud/test.html", {**_test_choices(service), "form": defaults})

    @app.post("/cockpit/test", response_class=HTMLResponse, include_in_schema=False)
    async def test_run(request: Request) -> HTMLResponse:
        form = await _form(request)
        context = {**_test_choices(service), "form": form}
        try:
            test = ConnectionTestRequest.parse(form)
            report = await _blocking(service.connection_test, test)
        except PostbridgeError as exc:
            return _failed(request, "cloud/test.html", context, exc)
        return render(request, "cloud/test.html", {**context, "form": test.to_json(), "report": report_json(report)})

    @app.post("/cockpit/test/add-to-keystore", response_class=HTMLResponse, include_in_schema=False)
    async def test_add_anchor(request: Request) -> HTMLResponse:
        form = await _form(request)
        fingerprint, confirmed = form.pop("fingerprint", ""), form.pop("confirm", "") == "yes"
        context = {**_test_choices(service), "form": form}
        try:
            test = ConnectionTestRequest.parse(form)
            if not confirmed:
                report = report_json(await _blocking(service.connection_test, test))
                confirm = {"form": test.to_json(), "report": report, "fingerprint": fingerprint}
                return render(request, "cloud/test_confirm.html", confirm)
            result = await _blocking(service.add_test_anchor, test, fingerprint)
        except PostbridgeError as exc:
            return _failed(request, "cloud/test.html", context, exc)
        added = [f"{entry.alias} (SHA-256 {entry.fingerprint})" for entry in result.added]
        page = {**context, "form": test.to_json(), "report": report_json(result.report), "added": added}
        return render(request, "cloud/test.html", page)

    # flows runtime
    @app.get("/cockpit/flows", response_class=HTMLResponse, include_in_schema=False)
    async def flows_page(
        request: Request, flow: str = "", status: str = "", since: str = "", search: str = "", limit: int = 100
    ) -> HTMLResponse:
        filters = {"flow": flow, "status": status, "since": since, "search": search, "limit": limit}
        context: dict[str, Any] = {"filters": filters, "statuses": [s.value for s in MessageStatus]}
        try:
            context["flows"] = await _blocking(service.flows)
        except NotFound as exc:
            return render(request, "cloud/flows.html", {**context, "flows": None, "missing": exc})
        except PostbridgeError as exc:
            return _failed(request, "cloud/flows.html", {**context, "flows": [], "messages": []}, exc)
        try:
            records: list[MessageRecord] = await _blocking(
                service.messages, flow=flow, status=status, since=since, search=search, limit=limit
            )
        except PostbridgeError as exc:
            return _failed(request, "cloud/flows.html", {**context, "messages": []}, exc)
        return render(request, "cloud/flows.html", {**context, "messages": records})

    @app.get("/cockpit/messages/{key:path}", response_class=HTMLResponse, include_in_schema=False)
    async def message_page(request: Request, key: str) -> HTMLResponse:
        try:
            details = await _blocking(service.message, key)
        except PostbridgeError as exc:
            return _failed(request, "cloud/message.html", {"key": key, "details": []}, exc)
        return render(request, "cloud/message.html", {"key": key, "details": details})


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"{what} '{text}' is not a number", hint="e.g. 15") from None
