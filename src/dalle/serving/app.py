"""The HTTP side of ``dalle serve``: one page and a small JSON API over a :class:`GenerationService`.

    GET  /               the web UI (page.html: no external scripts, styles or fonts; works offline)
    GET  /api/info       the models' sizes, the server's limits and defaults
    POST /api/generate   {"caption", "n", "keep", "temperature", "top_k", "top_p", "seed"}: all but the caption optional
    POST /api/complete   the same plus "image" (base64 file or data: URL) and "keep_rows" (default: half the grid)

Answers are JSON. A bad request is answered with ``{"error": "..."}`` and 400 (413 for a body over the limit, 404 for
an unknown path); a fault of ours with 500 and the traceback in the server's log, never in the answer. Only the
standard library's ``http.server`` is used: it is enough for one user or a small team and installs nothing.
"""

from __future__ import annotations

import errno
import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from dalle.errors import UserError
from dalle.serving.service import GenerationService

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes of a request body: room for an uploaded photo as base64


def page() -> bytes:
    return resources.files("dalle.serving").joinpath("page.html").read_bytes()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client never keeps the process alive after Ctrl-C

    def __init__(self, address: tuple[str, int], service: GenerationService, max_body: int = DEFAULT_MAX_BODY):
        self.service, self.max_body, self.page = service, max_body, page()
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def make_server(service: GenerationService, host: str = "127.0.0.1", port: int = 8000,
                max_body: int = DEFAULT_MAX_BODY) -> Server:
    """Bind (port 0: any free port; see ``server.url``) without serving yet; ``serve_forever()`` starts it."""
    try:
        return Server((host, port), service, max_body)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use: pick another with --port") from None
        if e.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port}: use a port above 1023") from None
        # An unknown host name (socket.gaierror), an address this machine does not have, ...
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "dalle"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.server.service.info())
        elif path == "/favicon.ico":  # asked for by every browser; there is none
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        routes = {"/api/generate": self.server.service.generate, "/api/complete": self.server.service.complete}
        if path not in routes:
            self._drain()
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {path}"})
            return
        request = self._read_json()
        if request is None:
            return  # already answered
        try:
            answer = routes[path](request)
        except UserError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception:
            log.exception("error while serving POST %s", path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error; the server's log has the details"})
        else:
            self._json(HTTPStatus.OK, answer)

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _read_json(self) -> Any | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "the request needs a Content-Length header"})
            return None
        if int(length) > self.server.max_body:
            self.close_connection = True  # the unread body must not be taken for the next request
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"the request body is {int(length):,} bytes; this server takes at most "
                                 f"{self.server.max_body:,} (--max-body)"})
            return None
        body = self.rfile.read(int(length))
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"the request body is not JSON: {e}"})
            return None

    def _drain(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) <= self.server.max_body:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # The page loads nothing from elsewhere; images arrive as data: URLs.
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
                         "script-src 'unsafe-inline'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)
