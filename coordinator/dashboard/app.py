"""The dashboard's web application (Starlette): one page, its script and style, two JSON
reads, the sample grids and, off loopback, a login.

Read-only by construction: the only routes that accept a POST are the login and the logout,
which change nothing but the caller's own session. Every response carries headers that keep
other sites out: a Content-Security-Policy that runs no inline script and loads nothing from
elsewhere, no framing, no sniffing, no referrer, and resources readable by this origin only;
no CORS header is ever sent, so another site's script cannot read the JSON. The page builds
its DOM from text nodes only (static/app.js): a name or reason is shown as text, never parsed
as markup. On loopback, where there is no login, requests must name a loopback host, so that a
site whose name rebinds to 127.0.0.1 cannot read the page either.
"""

from __future__ import annotations

import hmac
import html
import secrets
import threading
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..registry import Registry, RegistryError
from .data import DashboardData

STATIC = Path(__file__).parent / "static"
COOKIE = "ddm_dashboard"
SESSION_SECONDS = 12 * 3600  # a login lasts this long at most (and never past its token's expiry)
MAX_LOGIN_BODY = 4096
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
LOGOUT = '<form method="post" action="/logout" id="logout"><button type="submit">log out</button></form>'
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-store",
}


class Logins:
    """Dashboard sessions of this process: a random id per login with an operator token, kept
    in memory (a restart logs everyone out)."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._sessions: dict[str, float] = {}  # session id -> when it ends
        self._lock = threading.Lock()

    def login(self, token: str) -> tuple[str, float]:
        """A new session for a valid operator token; raises RegistryError otherwise."""
        _, expires_at = self.registry.operator_login(token)
        now = self.registry.clock.now()
        ends = min(expires_at, now + SESSION_SECONDS)
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions = {s: end for s, end in self._sessions.items() if end > now}
            self._sessions[session] = ends
        return session, ends - now

    def valid(self, session: str | None) -> bool:
        if not session:
            return False
        now = self.registry.clock.now()
        with self._lock:
            for known, ends in self._sessions.items():
                if hmac.compare_digest(known, session):
                    return ends > now
        return False

    def logout(self, session: str | None) -> None:
        with self._lock:
            self._sessions.pop(session or "", None)


class SecurityHeaders:
    """Adds HEADERS (and HSTS over TLS) to every response."""

    def __init__(self, app: ASGIApp, tls: bool):
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in HEADERS.items()]
        if tls:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *(h for h in self.headers if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, with_headers)


class RequireHost:
    """Refuses (400) a request whose Host header names none of ``hosts`` (any port): what a
    page of another site sends when its name has been rebound to this address. IPv6 hosts are
    written in brackets, as in URLs."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]):
        self.app = app
        self.hosts = {h.lower() for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            host = header[: header.find("]") + 1] if header.startswith("[") else header.split(":", 1)[0]
            if host not in self.hosts:
                await PlainTextResponse("this dashboard answers to a loopback name only", status_code=400)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def create_app(
    data: DashboardData, logins: Logins | None, tls: bool, hosts: tuple[str, ...] | None = None
) -> Starlette:
    """The dashboard over ``data``; ``logins``: None serves without a login (loopback only);
    ``hosts``: the Host names requests must carry (None: any)."""

    index = (STATIC / "index.html").read_text()

    def signed_in(request: Request) -> bool:
        return logins is None or logins.valid(request.cookies.get(COOKIE))

    def page(request: Request) -> Response:
        if not signed_in(request):
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse(index.replace("{logout}", LOGOUT if logins is not None else ""))

    def api_status(request: Request) -> Response:
        if not signed_in(request):
            return JSONResponse({"error": "log in first"}, status_code=401)
        return JSONResponse(data.status())

    def api_events(request: Request) -> Response:
        if not signed_in(request):
            return JSONResponse({"error": "log in first"}, status_code=401)
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            return JSONResponse({"error": "limit must be a whole number"}, status_code=400)
        return JSONResponse(data.events(limit, island_id=q.get("island") or None, kind=q.get("kind") or None))

    def grid(request: Request) -> Response:
        if not signed_in(request):
            return Response("log in first", status_code=401, media_type="text/plain")
        path = data.grid(request.path_params["name"])
        if path is None:
            return Response("no such sample grid", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    def static(name: str, media_type: str):
        def serve(request: Request) -> Response:
            return FileResponse(STATIC / name, media_type=media_type)

        return serve

    def login_page(message: str = "", status_code: int = 200) -> HTMLResponse:
        body = (STATIC / "login.html").read_text().replace("{message}", html.escape(message))
        return HTMLResponse(body, status_code=status_code)

    async def login(request: Request) -> Response:
        if logins is None:
            return RedirectResponse("/", status_code=303)
        if request.method == "GET":
            return login_page()
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            return Response("cross-origin login refused", status_code=403, media_type="text/plain")
        body = await request.body()
        if len(body) > MAX_LOGIN_BODY:
            return login_page("that is not an operator token", 400)
        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
        try:
            session, seconds = logins.login(token)
        except RegistryError as exc:
            return login_page(str(exc), 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, session, max_age=int(seconds), httponly=True, secure=tls, samesite="strict", path="/"
        )
        return response

    def logout(request: Request) -> Response:
        if logins is not None:
            logins.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/login" if logins is not None else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/", secure=tls, httponly=True, samesite="strict")
        return response

    routes = [
        Route("/", page),
        Route("/api/status", api_status),
        Route("/api/events", api_events),
        Route("/samples/{name}", grid),
        Route("/static/app.js", static("app.js", "text/javascript; charset=utf-8")),
        Route("/static/style.css", static("style.css", "text/css; charset=utf-8")),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
    ]
    middleware = [Middleware(SecurityHeaders, tls=tls)]
    if hosts is not None:
        middleware.append(Middleware(RequireHost, hosts=hosts))
    return Starlette(routes=routes, middleware=middleware)
