"""What every postbridge web app shares: templates, rendering, errors, login/logout, ``/healthz`` and ``/static``.

An app is built like this (call :func:`install_common` BEFORE adding routes: it registers the session/CSRF guard
as a dependency of every route added after it)::

    app = FastAPI(title="postbridge connector", openapi_url="/api/openapi.json", docs_url="/api/docs", redoc_url=None)
    auth = install_common(app, title="postbridge connector", nav=[("Overview", "/"), ...], admin_path=...)

    @app.get("/mappings")
    def mappings_page(request: Request) -> HTMLResponse:
        return render(request, "connector/mappings.html", {"mappings": ...})

Owns:

* the guard: every route except the public ones (``/login``, ``/api/v1/login``, ``/healthz``; ``/static`` and the
  OpenAPI document are not routes of the app router) needs a live session (cookie); every unsafe method (POST,
  PUT, PATCH, DELETE) also needs the session's CSRF token as the form field ``csrf_token`` or the header
  ``X-CSRF-Token``. Pages without a session are redirected to ``/login?next=…``; API calls get a 401.
* one error handler: a :class:`PostbridgeError` becomes ``{"error": message, "hint": hint}`` with the status of
  :func:`http_status` under ``/api/``, and the error page otherwise. Page routes that show a form catch the error
  themselves and render the form again with ``error`` in the context (``base.html`` shows it above the content in a
  ``role="alert"`` box) and the user's input kept.
* login and logout for pages (``GET/POST /login``, ``POST /logout``) and the API (``POST /api/v1/login`` with
  ``{"password": …}`` answers ``{"csrf_token": …}`` and sets the cookie, ``POST /api/v1/logout``,
  ``GET /api/v1/session``).
* response headers: a strict Content-Security-Policy (no inline script), no framing, no caching of pages; bodies
  larger than :data:`MAX_BODY` are refused with 413 before they are read.

Must not: hold any configuration logic (services do), or log a password or a session/CSRF token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from postbridge.errors import (
    AuthenticationError,
    ConfigurationError,
    NetworkError,
    PostbridgeError,
    ProtocolError,
    StreamRefused,
    TrustError,
)
from postbridge.web.auth import AdminStore, LoginRequired, LoginThrottled, Session, WebAuth

TEMPLATES_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY = 2 * 1024 * 1024 + 64 * 1024  # largest request body read at all (uploads are limited to 1 MiB by services)
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
PUBLIC_PATHS = frozenset({"/login", "/api/v1/login", "/healthz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


@dataclass(frozen=True)
class WebApp:
    """What :func:`install_common` keeps in ``app.state.web``."""

    title: str
    nav: tuple[tuple[str, str], ...]
    auth: WebAuth
    cookie_name: str


class LoginRequest(BaseModel):
    password: str


def install_common(
    app: FastAPI,
    *,
    title: str,
    nav: Sequence[tuple[str, str]],
    admin_path: Path,
    admin_command: str = "postbridge connector admin set-password",
    auth: WebAuth | None = None,
) -> WebAuth:
    """Add the shared parts to ``app`` (see the module docstring) and return its :class:`WebAuth`.

    ``nav`` is the list of (label, href) shown in every page's navigation; ``admin_path`` the password file
    (``HOME/connector/admin.json``); ``admin_command`` the command that sets it (named in hints); ``auth`` lets
    tests pass sessions and a throttle with a fake clock. Raises RuntimeError when ``app`` already has routes of
    its own (they would escape the guard).
    """
    if any(isinstance(route, APIRoute) for route in app.routes):
        raise RuntimeError("install_common() must be called before the app's own routes are added")
    web_auth = auth if auth is not None else WebAuth(AdminStore(admin_path, command=admin_command))
    # cookies do not tell ports apart: two UIs on one host need different cookie names
    suffix = hashlib.sha256(str(admin_path).encode()).hexdigest()[:10]
    web = WebApp(title=title, nav=tuple(nav), auth=web_auth, cookie_name=f"postbridge_session_{suffix}")
    app.state.web = web
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    app.router.dependencies.append(Depends(_guard))
    app.add_exception_handler(PostbridgeError, _postbridge_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.middleware("http")(_headers_and_limits)
    _add_login_routes(app, web)
    return web_auth


def web_of(request: Request) -> WebApp:
    web = request.app.state.web
    assert isinstance(web, WebApp)
    return web


def current_session(request: Request) -> Session:
    """The session the guard found for this request; raises LoginRequired on a public route without one."""
    session = getattr(request.state, "session", None)
    if isinstance(session, Session):
        return session
    raise LoginRequired("not logged in", hint="log in first")


def flash(request: Request, message: str, kind: str = "ok") -> None:
    """Show ``message`` on the next page of this session (after a redirect); ``kind`` is ok, warning or error."""
    current_session(request).flash(message, kind)


def redirect(url: str) -> RedirectResponse:
    """The answer to a successful form POST: 303 See Other to ``url`` (the page then shows the flash)."""
    return RedirectResponse(url, status_code=303)


def render(request: Request, name: str, context: dict[str, Any] | None = None, status: int = 200) -> HTMLResponse:
    """Render template ``name`` with ``context`` plus ``app_title``, ``nav`` (label, href, current), ``user``,
    ``csrf_token`` and ``flash`` (the session's pending messages as (kind, text))."""
    web = web_of(request)
    session = getattr(request.state, "session", None)
    if not isinstance(session, Session):
        session = web.auth.sessions.get(request.cookies.get(web.cookie_name))
    path = request.url.path
    nav = [(label, href, href == path or (href != "/" and path.startswith(href + "/"))) for label, href in web.nav]
    full: dict[str, Any] = {
        "app_title": web.title,
        "nav": nav if session is not None else [],
        "user": session.user if session is not None else None,
        "csrf_token": session.csrf_token if session is not None else "",
        "flash": session.take_flashes() if session is not None else [],
        "error": None,
    }
    full.update(context or {})
    return templates.TemplateResponse(request, name, full, status_code=status)


def http_status(exc: PostbridgeError) -> int:
    """The HTTP status of an error: its own ``http_status`` (services, auth), else 401 for authentication,
    400 for configuration and trust problems, 502 for a failure on the other side, 400 otherwise."""
    status = getattr(exc, "http_status", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, AuthenticationError):
        return 401
    if isinstance(exc, ConfigurationError | TrustError):
        return 400
    if isinstance(exc, NetworkError | ProtocolError | StreamRefused):
        return 502
    return 400


def error_body(exc: PostbridgeError) -> dict[str, str]:
    """The JSON body of an error: ``{"error": message, "hint": hint}``."""
    return {"error": exc.message, "hint": exc.hint}


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


# -- guard ----------------------------------------------------------------------------------------------------------


async def _guard(request: Request) -> None:
    if request.url.path in PUBLIC_PATHS:
        return
    web = web_of(request)
    session = web.auth.session(request.cookies.get(web.cookie_name))
    request.state.session = session
    if request.method in SAFE_METHODS:
        return
    supplied = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if not supplied and content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        value = (await request.form()).get(CSRF_FIELD)
        supplied = value if isinstance(value, str) else None
    web.auth.check_csrf(session, supplied)


# -- errors ---------------------------------------------------------------------------------------------------------


async def _postbridge_error(request: Request, exc: PostbridgeError) -> Response:
    status = http_status(exc)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, LoginThrottled) else None
    if is_api(request):
        return JSONResponse(error_body(exc), status_code=status, headers=headers)
    if isinstance(exc, LoginRequired):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return redirect(f"/login?next={quote(target, safe='')}")
    response = render(request, "error.html", {"status": status, "error": exc}, status=status)
    if headers:
        response.headers.update(headers)
    return response


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = []
    for item in exc.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query", "path", "form"))
        problems.append(f"{where or 'input'}: {item.get('msg', 'invalid')}")
    error = ConfigurationError(
        "invalid request: " + "; ".join(problems), hint="see the API description at /api/docs for the fields"
    )
    if is_api(request):
        return JSONResponse(error_body(error), status_code=422)
    return render(request, "error.html", {"status": 422, "error": error}, status=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404 and is_api(request):
        error = PostbridgeError(
            f"there is no API route '{request.url.path}'", hint="the routes are listed in /api/openapi.json"
        )
    elif exc.status_code == 404:
        error = PostbridgeError(f"there is no page '{request.url.path}'", hint="use the navigation")
    elif exc.status_code == 405:
        error = PostbridgeError(f"'{request.method}' is not allowed on '{request.url.path}'")
    else:
        error = PostbridgeError(str(exc.detail))
    if is_api(request):
        return JSONResponse(error_body(error), status_code=exc.status_code)
    return render(request, "error.html", {"status": exc.status_code, "error": error}, status=exc.status_code)


async def _headers_and_limits(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        error = PostbridgeError(
            f"the request body has {int(length)} bytes, more than the {MAX_BODY} bytes accepted",
            hint="uploads may have at most 1 MiB",
        )
        return JSONResponse(error_body(error), status_code=413, headers={"Connection": "close"})
    response = await call_next(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if not request.url.path.startswith("/api/docs"):  # Swagger UI needs its own scripts
        response.headers.setdefault("Content-Security-Policy", _CSP)
    if not request.url.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


# -- login and logout -------------------------------------------------------------------------------------------------


def _safe_next(target: str) -> str:
    """Only local paths: '/mappings' yes, '//evil.example' or 'https://…' no."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _set_cookie(request: Request, response: Response, web: WebApp, session: Session) -> None:
    response.set_cookie(
        web.cookie_name,
        session.token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _add_login_routes(app: FastAPI, web: WebApp) -> None:
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        if web.auth.sessions.get(request.cookies.get(web.cookie_name)) is not None:
            return redirect(_safe_next(next))
        return render(request, "login.html", {"next": _safe_next(next)})

    @app.post("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_submit(request: Request) -> Response:
        form = await request.form()
        password = form.get("password")
        target = _safe_next(str(form.get("next") or "/"))
        try:
            session = await run_in_threadpool(web.auth.login, password if isinstance(password, str) else "")
        except PostbridgeError as exc:
            page = render(request, "login.html", {"next": target, "error": exc}, status=http_status(exc))
            if isinstance(exc, LoginThrottled):
                page.headers["Retry-After"] = str(exc.retry_after)
            return page
        response = redirect(target)
        _set_cookie(request, response, web, session)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout_submit(request: Request) -> Response:
        web.auth.logout(current_session(request))
        response = redirect("/login")
        response.delete_cookie(web.cookie_name, path="/")
        return response

    @app.post("/api/v1/login", tags=["session"])
    async def api_login(request: Request, body: LoginRequest) -> JSONResponse:
        """Log in as the administrator: sets the session cookie and returns the CSRF token for unsafe requests
        (send it as the header ``X-CSRF-Token``). 401 for a wrong password, 429 after 5 failures in a minute."""
        session = await run_in_threadpool(web.auth.login, body.password)
        response = JSONResponse(_session_json(web, session))
        _set_cookie(request, response, web, session)
        return response

    @app.post("/api/v1/logout", tags=["session"])
    def api_logout(request: Request) -> JSONResponse:
        """End the session."""
        web.auth.logout(current_session(request))
        response = JSONResponse({"status": "logged out"})
        response.delete_cookie(web.cookie_name, path="/")
        return response

    @app.get("/api/v1/session", tags=["session"])
    def api_session(request: Request) -> dict[str, Any]:
        """The current session: user, CSRF token and timeouts."""
        return _session_json(web, current_session(request))


def _session_json(web: WebApp, session: Session) -> dict[str, Any]:
    return {
        "user": session.user,
        "csrf_token": session.csrf_token,
        "idle_timeout_s": web.auth.sessions.idle,
        "absolute_timeout_s": web.auth.sessions.absolute,
    }
