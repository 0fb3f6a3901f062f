"""A read-only HTTP server for the live view (standard library only).

``ThreadingHTTPServer`` with one thread per client and Server-Sent Events as
the push channel is enough here: a handful of clients, a few events per second,
nothing to receive from the browser. Every endpoint is a GET (HEAD) that reads;
any other method gets 405, so nothing on the page can send a command.

Access: bound to a loopback address the page is open to local users (the
``Host`` header must name the loopback too, against DNS rebinding). Any other
bind requires an access token: every request must carry ``?token=...`` (the
first page load sets it as a same-site cookie for the page's own requests),
or it gets 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import socket
import threading
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from .hub import LiveHub, sse

__all__ = ["WebConfigError", "WebServer", "is_loopback", "new_token", "parse_bind", "static_file"]

_COOKIE = "edge_token"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".json": "application/json"}


class WebConfigError(ValueError):
    """Bad ``--web`` address or an unsafe bind (non-local without a token)."""


def new_token() -> str:
    """A fresh random access token (URL-safe, 128 bits)."""
    return secrets.token_urlsafe(16)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_bind(text: str) -> tuple[str, int]:
    """``"[HOST:]PORT"`` -> ``(host, port)``; host defaults to 127.0.0.1.

    Raises
    ------
    WebConfigError
        Not a port in 0..65535 or an empty host.
    """
    host, sep, port = str(text).rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        raise WebConfigError(f"--web expects [HOST:]PORT, got {text!r}") from None
    if not 0 <= p <= 65535 or (sep and not host):
        raise WebConfigError(f"--web expects [HOST:]PORT with a port in 0..65535, got {text!r}")
    return host, p


def static_file(name: str) -> bytes:
    """A file shipped in ``edge/web/static`` (KeyError if there is none)."""
    if "/" in name or "\\" in name or name.startswith("."):
        raise KeyError(name)
    f = resources.files("edge.web").joinpath("static", name)
    if not f.is_file():
        raise KeyError(name)
    return f.read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    server_version = "edge-view"
    sys_version = ""

    def log_message(self, format, *args):  # quiet: the run's status line owns the terminal
        pass

    # -- access -------------------------------------------------------------
    def _authorised(self, query: dict) -> bool:
        token = self.server.token
        if token is None:
            host = self.headers.get("Host") or ""
            host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
            return bool(host) and is_loopback(host)
        given = (query.get("token") or [""])[0]
        if not given:
            c = SimpleCookie()
            try:
                c.load(self.headers.get("Cookie") or "")
            except Exception:
                pass
            given = c[_COOKIE].value if _COOKIE in c else ""
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self._common_headers()
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _common_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                         "connect-src 'self'; form-action 'none'; frame-ancestors 'none'")

    # -- methods --------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._authorised(query):
            self._send(HTTPStatus.FORBIDDEN, b"403 forbidden: this page needs its access token (?token=...)\n")
            return
        extra = {}
        if self.server.token is not None and query.get("token"):
            extra["Set-Cookie"] = f"{_COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, static_file("index.html"), _TYPES[".html"], extra)
            elif path.startswith("/static/"):
                name = path[len("/static/"):]
                suffix = name[name.rfind("."):] if "." in name else ""
                self._send(HTTPStatus.OK, static_file(name), _TYPES.get(suffix, "application/octet-stream"))
            elif path == "/api/snapshot":
                self._send(HTTPStatus.OK, self.server.hub.snapshot_json()[0].encode(), _TYPES[".json"])
            elif path == "/api/frame":
                try:
                    n = int((query.get("n") or [""])[0])
                except ValueError:
                    self._send(HTTPStatus.BAD_REQUEST, b"n must be a frame number\n")
                    return
                img = self.server.hub.saved_frame(n)
                if img is None:
                    self._send(HTTPStatus.NOT_FOUND, b"no saved image for that frame\n")
                else:
                    self._send(HTTPStatus.OK, json.dumps(img).encode(), _TYPES[".json"])
            elif path == "/events":
                self._events()
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n")
        except KeyError:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout, TimeoutError):
            self.close_connection = True

    do_HEAD = do_GET

    def _read_only(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"405: the live view is read-only\n",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only

    def _events(self) -> None:
        srv = self.server
        if not srv.clients.acquire(blocking=False):
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many viewers\n")
            return
        with srv.count_lock:
            srv.n_clients += 1
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self._common_headers()
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            if self.command == "HEAD":
                return
            # a client that stops reading is dropped after this, never waited for
            self.connection.settimeout(srv.write_timeout)
            hub = srv.hub
            snap, seq, iv = hub.snapshot_json()
            self.wfile.write(sse("snapshot", snap))
            idle = 0.0
            while not srv.closing.is_set():
                updates, image, seq, iv = hub.wait(seq, iv, 1.0)
                out = []
                if updates is None:  # fell behind the event buffer: start over
                    snap, seq, iv = hub.snapshot_json()
                    out.append(sse("snapshot", snap))
                else:
                    out.extend(updates)
                    if image:
                        out.append(image)
                if out:
                    self.wfile.write(b"".join(out))
                    idle = 0.0
                else:
                    idle += 1.0
                    if idle >= 10.0:
                        self.wfile.write(b": keepalive\n\n")
                        idle = 0.0
        finally:
            with srv.count_lock:
                srv.n_clients -= 1
            srv.clients.release()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, hub: LiveHub, token: str | None, max_clients: int, write_timeout: float):
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        super().__init__(addr, _Handler)
        self.hub = hub
        self.token = token
        self.clients = threading.BoundedSemaphore(max_clients)
        self.count_lock = threading.Lock()
        self.n_clients = 0
        self.closing = threading.Event()
        self.write_timeout = write_timeout


class WebServer:
    """Serve a :class:`LiveHub` over HTTP in a background thread.

    Parameters
    ----------
    hub : LiveHub
        What to show.
    host : str
        Bind address; loopback by default. Anything else needs ``token``.
    port : int
        TCP port (0 = any free port).
    token : str, optional
        Access token every request must carry. Required for a non-loopback bind.
    max_clients : int
        Concurrent live pages (further ones get 503).
    write_timeout : float
        Seconds a client may stall a write before it is dropped.

    Raises
    ------
    WebConfigError
        Non-loopback bind without a token.
    OSError
        The address cannot be bound.
    """

    def __init__(self, hub: LiveHub, host: str = "127.0.0.1", port: int = 8080, *, token: str | None = None,
                 max_clients: int = 16, write_timeout: float = 5.0) -> None:
        if not is_loopback(host) and not token:
            raise WebConfigError(f"refusing to serve on {host} without an access token "
                                 "(a non-local bind must be protected)")
        self.hub = hub
        self.token = token
        self._srv = _Server((host, int(port)), hub, token, max_clients, write_timeout)
        self.host = host
        self.port = self._srv.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def clients(self) -> int:
        """Pages connected to the event stream now."""
        return self._srv.n_clients

    @property
    def url(self) -> str:
        """The page's address (with the token when one is needed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> "WebServer":
        self._thread = threading.Thread(target=self._srv.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edge-web-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the socket (clients see the stream end)."""
        self._srv.closing.set()
        self._srv.shutdown()
        self._srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
