"""The shared web pieces: password KDF, administrator file, login throttling, sessions (fake clock), CSRF, first start.

The app-level tests drive a small FastAPI app built with :func:`postbridge.web.pages.install_common` through
httpx's in-process ASGI transport; the connector's real server is tested in test_web_connector.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, Response

from postbridge.errors import ConfigurationError
from postbridge.web.auth import (
    AdminStore,
    CsrfRefused,
    LoginRequired,
    LoginThrottle,
    LoginThrottled,
    SessionStore,
    WebAuth,
    WrongPassword,
    first_start,
    hash_password,
    verify_password,
)
from postbridge.web.pages import flash, install_common, redirect, render

PASSWORD = "correct horse battery"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- KDF and the administrator file ---------------------------------------------------------------------------------


def test_hash_is_argon2id_salted_and_verifies() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first.startswith("$argon2id$")
    assert first != second  # a fresh salt every time
    assert PASSWORD not in first
    assert verify_password(first, PASSWORD)
    assert verify_password(second, PASSWORD)
    assert not verify_password(first, PASSWORD + "x")
    assert not verify_password(first, "")


def test_too_short_password_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="too short"):
        hash_password("short")


def test_damaged_hash_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="not an argon2 hash"):
        verify_password("plain-text-password", PASSWORD)


def test_admin_file_is_private_and_holds_only_the_hash(tmp_path: Path) -> None:
    admin = AdminStore(tmp_path / "connector" / "admin.json")
    assert not admin.is_set
    assert not admin.verify(PASSWORD)  # no password set: nobody gets in
    admin.set_password(PASSWORD)
    assert stat.S_IMODE(os.stat(admin.path).st_mode) == 0o600
    text = admin.path.read_text()
    assert PASSWORD not in text
    assert json.loads(text)["kdf"] == "argon2id"
    assert admin.verify(PASSWORD)
    assert not admin.verify("wrong password")
    admin.set_password("another password")
    assert not admin.verify(PASSWORD)
    assert admin.verify("another password")


def test_broken_admin_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    admin = AdminStore(tmp_path / "admin.json")
    admin.path.write_text('{"hash": ""}')
    with pytest.raises(ConfigurationError, match=r"admin\.json") as caught:
        admin.verify(PASSWORD)
    assert "set-password" in caught.value.hint


def test_first_start_prints_a_working_password_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    admin = AdminStore(tmp_path / "admin.json")
    console = io.StringIO()
    assert first_start(admin, what="connector UI", stream=console)
    printed = console.getvalue()
    password = next(line.split()[-1] for line in printed.splitlines() if line.startswith("***   "))
    assert len(password) >= 20
    assert admin.verify(password)
    assert password not in admin.path.read_text()
    assert password not in caplog.text  # the console only, never a log record
    again = io.StringIO()
    assert not first_start(admin, what="connector UI", stream=again)
    assert again.getvalue() == ""
    assert admin.verify(password)  # the second start keeps the first password


# -- throttling, sessions, CSRF (fake clock) -------------------------------------------------------------------------


def test_throttle_after_five_failures_within_a_minute() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(clock=clock)
    for _ in range(4):
        throttle.failed()
        clock.advance(1)
    throttle.check()  # four failures: still allowed
    throttle.failed()
    with pytest.raises(LoginThrottled) as caught:
        throttle.check()
    assert 55 <= caught.value.retry_after <= 60
    clock.advance(caught.value.retry_after)  # the oldest failure is now a minute old
    throttle.check()


def test_login_wrong_password_and_throttling_refuse_even_the_right_password(tmp_path: Path) -> None:
    clock = FakeClock()
    admin = AdminStore(tmp_path / "admin.json")
    admin.set_password(PASSWORD)
    auth = WebAuth(admin, sessions=SessionStore(clock=clock), throttle=LoginThrottle(clock=clock))
    for _ in range(5):
        with pytest.raises(WrongPassword, match="wrong password"):
            auth.login("not the password")
    with pytest.raises(LoginThrottled):
        auth.login(PASSWORD)
    clock.advance(61)
    session = auth.login(PASSWORD)
    assert auth.session(session.token) is session
    assert len(session.token) >= 40 and len(session.csrf_token) >= 40
    assert session.token != session.csrf_token


def test_session_idle_timeout(tmp_path: Path) -> None:
    clock = FakeClock()
    sessions = SessionStore(clock=clock)
    session = sessions.create()
    clock.advance(29 * 60)
    assert sessions.get(session.token) is session  # used: the idle timer starts again
    clock.advance(29 * 60)
    assert sessions.get(session.token) is session
    clock.advance(30 * 60)
    assert sessions.get(session.token) is None
    assert sessions.get(session.token) is None  # and it stays gone
    assert len(sessions) == 0


def test_session_absolute_timeout_even_when_used(tmp_path: Path) -> None:
    clock = FakeClock()
    sessions = SessionStore(clock=clock)
    session = sessions.create()
    for _ in range(71):  # every 10 minutes for 11 h 50 min
        clock.advance(600)
        assert sessions.get(session.token) is session
    clock.advance(600)  # 12 h after login
    assert sessions.get(session.token) is None


def test_unknown_or_missing_token_is_no_session() -> None:
    sessions = SessionStore()
    sessions.create()
    assert sessions.get("") is None
    assert sessions.get(None) is None
    assert sessions.get("forged-token") is None


def test_new_password_ends_open_sessions(tmp_path: Path) -> None:
    admin = AdminStore(tmp_path / "admin.json")
    admin.set_password(PASSWORD)
    auth = WebAuth(admin)
    session = auth.login(PASSWORD)
    auth.session(session.token)
    admin.set_password("a completely new one")
    with pytest.raises(LoginRequired):
        auth.session(session.token)


def test_check_csrf() -> None:
    auth = WebAuth(AdminStore(Path("/nonexistent/admin.json")))
    session = auth.sessions.create()
    auth.check_csrf(session, session.csrf_token)
    for wrong in (None, "", session.csrf_token[:-1], session.token):
        with pytest.raises(CsrfRefused, match="CSRF"):
            auth.check_csrf(session, wrong)


# -- the guard in a real (in-process) app ----------------------------------------------------------------------------


def build_app(tmp_path: Path, clock: FakeClock) -> FastAPI:
    admin = AdminStore(tmp_path / "admin.json")
    admin.set_password(PASSWORD)
    app = FastAPI(openapi_url="/api/openapi.json", docs_url="/api/docs", redoc_url=None)
    auth = WebAuth(admin, sessions=SessionStore(clock=clock), throttle=LoginThrottle(clock=clock))
    install_common(app, title="Test UI", nav=[("Home", "/"), ("Things", "/things")], admin_path=admin.path, auth=auth)
    things: list[str] = []

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> HTMLResponse:
        return render(request, "error.html", {"status": 200, "things": things})

    @app.post("/things")
    def add_thing(request: Request, name: str = Form(...)) -> Response:
        things.append(name)
        flash(request, f"added {name}")
        return redirect("/")

    @app.post("/api/v1/things")
    def api_add_thing(body: dict[str, str]) -> dict[str, list[str]]:
        things.append(body["name"])
        return {"things": things}

    app.state.things = things
    return app


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def test_install_common_refuses_routes_added_before_it(tmp_path: Path) -> None:
    app = FastAPI()

    @app.get("/early")
    def early() -> str:
        return "unguarded"

    with pytest.raises(RuntimeError, match="before"):
        install_common(app, title="x", nav=[], admin_path=tmp_path / "admin.json")


async def test_csrf_required_on_post_with_and_without_the_token(tmp_path: Path) -> None:
    app = build_app(tmp_path, FakeClock())
    async with client(app) as http:
        # no session at all: the API says 401, a page sends the browser to the login form
        assert (await http.post("/api/v1/things", json={"name": "a"})).status_code == 401
        page = await http.get("/?x=1")
        assert page.status_code == 303 and page.headers["location"] == "/login?next=%2F%3Fx%3D1"
        login = await http.post("/api/v1/login", json={"password": PASSWORD})
        assert login.status_code == 200
        token = login.json()["csrf_token"]
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie  # plain http
        # logged in, but without the token: refused and nothing done
        refused = await http.post("/api/v1/things", json={"name": "a"})
        assert refused.status_code == 403
        assert "CSRF" in refused.json()["error"] and refused.json()["hint"]
        assert (await http.post("/things", data={"name": "b"})).status_code == 403
        assert (await http.post("/things", data={"name": "c", "csrf_token": "wrong"})).status_code == 403
        assert app.state.things == []
        # with the token: as a header (API) and as the form field (pages)
        ok = await http.post("/api/v1/things", json={"name": "a"}, headers={"X-CSRF-Token": token})
        assert ok.status_code == 200 and ok.json() == {"things": ["a"]}
        posted = await http.post("/things", data={"name": "b", "csrf_token": token})
        assert posted.status_code == 303 and posted.headers["location"] == "/"
        assert app.state.things == ["a", "b"]
        home = await http.get("/")
        assert "added b" in home.text and 'role="status"' in home.text
        assert 'aria-current="page"' in home.text
        assert home.headers["content-security-policy"].startswith("default-src 'self'")
        # logout needs the token too, then the session is gone
        assert (await http.post("/api/v1/logout")).status_code == 403
        assert (await http.post("/api/v1/logout", headers={"X-CSRF-Token": token})).status_code == 200
        assert (await http.get("/api/v1/session")).status_code == 401


async def test_login_api_wrong_password_then_throttled(tmp_path: Path) -> None:
    clock = FakeClock()
    app = build_app(tmp_path, clock)
    async with client(app) as http:
        for _ in range(5):
            wrong = await http.post("/api/v1/login", json={"password": "guess"})
            assert wrong.status_code == 401
            assert wrong.json()["error"] == "wrong password"
            assert "set-cookie" not in wrong.headers
        throttled = await http.post("/api/v1/login", json={"password": PASSWORD})
        assert throttled.status_code == 429
        assert "too many failed logins" in throttled.json()["error"]
        assert int(throttled.headers["retry-after"]) > 0
        page = await http.post("/login", data={"password": PASSWORD})  # the form is throttled as well
        assert page.status_code == 429 and "too many failed logins" in page.text and 'role="alert"' in page.text
        clock.advance(60)
        assert (await http.post("/api/v1/login", json={"password": PASSWORD})).status_code == 200


async def test_login_form_session_expiry_and_safe_redirect(tmp_path: Path) -> None:
    clock = FakeClock()
    app = build_app(tmp_path, clock)
    async with client(app) as http:
        form = await http.get("/login")
        assert form.status_code == 200 and '<label for="password">' in form.text
        wrong = await http.post("/login", data={"password": "nope", "next": "/things"})
        assert wrong.status_code == 401 and "wrong password" in wrong.text
        offsite = await http.post("/login", data={"password": PASSWORD, "next": "//evil.example/x"})
        assert offsite.status_code == 303 and offsite.headers["location"] == "/"
        assert (await http.get("/")).status_code == 200
        clock.advance(31 * 60)  # idle for longer than 30 minutes
        expired = await http.get("/")
        assert expired.status_code == 303 and expired.headers["location"].startswith("/login")
        assert (await http.get("/api/v1/session")).status_code == 401


async def test_public_routes_need_no_session(tmp_path: Path) -> None:
    app = build_app(tmp_path, FakeClock())
    async with client(app) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert "/api/v1/login" in (await http.get("/api/openapi.json")).json()["paths"]
        css = await http.get("/static/postbridge.css")
        assert css.status_code == 200 and "@media (max-width: 700px)" in css.text
        missing = await http.get("/api/v1/nothing")
        assert missing.status_code == 404 and "no API route" in missing.json()["error"]
