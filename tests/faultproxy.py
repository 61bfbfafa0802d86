"""Faults moto cannot produce, injected between BEC and moto by real proxies.

* ``S3FaultProxy``: an HTTP proxy for S3 (``AWS_ENDPOINT_URL_S3``) that can answer a missing
  key with 403 AccessDenied (S3 does so for a caller without s3:ListBucket), refuse every
  request as with expired credentials, or reset every connection (an outage).
* ``PgReplyCutter``: a TCP proxy for PostgreSQL that lets one chosen statement reach the
  server and commit, then cuts the connection before the reply gets back (a failover or a
  reset at the worst moment).
"""
from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

PASS, DENY_MISSING, EXPIRED, RESET = "pass", "deny_missing", "expired", "reset"

_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>FAULTPROXY</RequestId></Error>')


class S3FaultProxy:
    """Forwards S3 requests to ``upstream`` (moto), or fails them the way ``mode`` says:

    * ``pass``: as they are;
    * ``deny_missing``: a 404 for a key (and HeadBucket) becomes 403 AccessDenied, as for a
      caller without s3:ListBucket; with ``deny_head_bucket`` False only keys are denied;
    * ``expired``: every request answers 400 ExpiredToken (expired credentials);
    * ``reset``: every connection is closed without an answer (S3 unreachable).
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.mode = PASS
        self.deny_head_bucket = True
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str) -> None:
                body = _ERROR_XML.format(code=code, message=message).encode()
                self._reply(status, [("Content-Type", "application/xml")], body)

            def _handle(self) -> None:
                body = self._body()
                mode = proxy.mode
                with proxy.lock:
                    proxy.counts[mode] = proxy.counts.get(mode, 0) + 1
                if mode == RESET:
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == EXPIRED:
                    self._error(400, "ExpiredToken", "The provided token has expired.")
                    return
                status, headers, answer = proxy.forward(self.command, self.path, dict(self.headers), body)
                parts = [p for p in urlsplit(self.path).path.split("/") if p]
                is_key = len(parts) >= 2
                if (mode == DENY_MISSING and status == 404 and self.command in ("GET", "HEAD")
                        and (is_key or proxy.deny_head_bucket)):
                    self._error(403, "AccessDenied", "Access Denied")
                    return
                self._reply(status, headers, answer)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes
                ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            headers["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            return response.status, response.getheaders(), data
        finally:
            conn.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class PgReplyCutter:
    """A TCP proxy in front of PostgreSQL. ``cut_reply_to(marker)``: the next client message
    holding ``marker`` (a piece of a statement's text) goes through to the server, which runs
    and commits it; the server's reply is then dropped and both connections closed. The
    client sees a connection lost in the middle of its statement, not knowing it committed."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.marker: bytes | None = None
        self.cuts = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_reply_to(self, marker: str) -> None:
        with self.lock:
            self.marker = marker.encode()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            state = {"armed": False}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if from_client:
                    with self.lock:
                        if self.marker is not None and self.marker in data:
                            self.marker = None
                            state["armed"] = True
                elif state["armed"]:
                    with self.lock:
                        self.cuts += 1
                    break  # the reply is lost: close both ends
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self.listener.close()
