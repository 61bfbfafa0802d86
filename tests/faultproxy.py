"""Faults moto cannot produce, injected between BEC and moto by real proxies.

``FaultProxy`` is an HTTP proxy in front of moto's S3 that answers chosen requests with an
S3 error, or fails them all the way a ``mode`` says: a missing key answered 403 AccessDenied
(S3 does so for a caller without s3:ListBucket), every request refused as with expired
credentials, or every connection reset (an outage). ``PgReplyCutter`` is a TCP proxy for
PostgreSQL that lets one chosen statement reach the server and commit, then cuts the
connection before the reply gets back (a failover or a reset at the worst moment).

About the S3 proxy:

moto cannot be told to fail a GET with a 500; S3 does (InternalError, SlowDown…). The
worker reaches the proxy through ``AWS_ENDPOINT_URL_S3`` (SQS stays direct), so every S3
request it makes passes here: those matching a rule get the error, the others go on to moto
unchanged. Every request is logged (method, path, status) so a test can count what the
worker asked for, and how often.
"""
from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from dataclasses import dataclass
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

PASS, DENY_MISSING, EXPIRED, RESET = "pass", "deny_missing", "expired", "reset"

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "te", "trailer",
              "upgrade", "proxy-connection"}


@dataclass
class Rule:
    method: str
    contains: str           # a substring of the (unquoted) request path
    status: int = 500
    code: str = "InternalError"
    times: int | None = None  # answer with the error this many times per path; None: always

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.contains in path


class FaultProxy:
    """Rules (:meth:`fail`) or a predicate ``fails(method, path)`` decide which requests get an
    S3 error instead of moto's answer; ``failed`` counts the errors given."""

    def __init__(self, upstream: str, fails: Callable[[str, str], bool] | None = None) -> None:
        parts = urlsplit(upstream)
        self.fails = fails
        self.failed = 0
        # mode: pass | deny_missing (a 404 for a key, and HeadBucket unless deny_head_bucket is
        # False, becomes 403 AccessDenied) | expired (400 ExpiredToken) | reset (no answer)
        self.mode = PASS
        self.deny_head_bucket = True
        self.counts: dict[str, int] = {}
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self._failed: dict[tuple[int, str], int] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

            do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, method: str, contains: str, status: int = 500, code: str = "InternalError",
             times: int | None = None) -> Rule:
        rule = Rule(method, contains, status, code, times)
        with self.lock:
            self.rules.append(rule)
        return rule

    def heal(self) -> None:
        with self.lock:
            self.rules.clear()

    def count(self, method: str, contains: str, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for m, p, s in self.log
                       if m == method and contains in p and (status is None or s == status))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- one request ---------------------------------------------------------------------------------
    def _rule_for(self, method: str, path: str) -> Rule | None:
        if self.fails is not None and self.fails(method, path):
            return Rule(method, path)
        with self.lock:
            for n, rule in enumerate(self.rules):
                if not rule.matches(method, path):
                    continue
                if rule.times is not None:
                    used = self._failed.get((n, path), 0)
                    if used >= rule.times:
                        continue
                    self._failed[(n, path)] = used + 1
                return rule
        return None

    def _body(self, handler: BaseHTTPRequestHandler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return data
                data += handler.rfile.read(size)
                handler.rfile.readline()
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
               f'<Message>{message}</Message><RequestId>fault</RequestId></Error>').encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(xml)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(xml)
        self._note(handler.command, handler.path, status)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        body = self._body(handler)
        mode = self.mode
        with self.lock:
            self.counts[mode] = self.counts.get(mode, 0) + 1
        if mode == RESET:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == EXPIRED:
            self._error(handler, 400, "ExpiredToken", "The provided token has expired.")
            return
        rule = self._rule_for(method, unquote(path))
        if rule is not None:
            with self.lock:
                self.failed += 1
            self._error(handler, rule.status, rule.code, "injected by the test")
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked" or body:
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        is_key = len([p for p in urlsplit(path).path.split("/") if p]) >= 2
        if (mode == DENY_MISSING and answer.status == 404 and method in ("GET", "HEAD")
                and (is_key or self.deny_head_bucket)):
            self._error(handler, 403, "AccessDenied", "Access Denied")
            return
        handler.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in HOP_BY_HOP:
                handler.send_header(key, value)
        length = answer.getheader("Content-Length") if method == "HEAD" else None
        handler.send_header("Content-Length", length if length is not None else str(len(data)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)
        self._note(method, path, answer.status)

    def _note(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, unquote(path), status))


#: The name the outage tests use: the same proxy, driven by its ``mode``.
S3FaultProxy = FaultProxy


class TcpProxy:
    """A TCP proxy on a free local port: every connection is pumped both ways to ``upstream``
    through :meth:`passes`, which a subclass overrides to delay or drop what goes by."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def passes(self, data: bytes, from_client: bool, state: dict[str, bool]) -> bool:
        """Whether ``data`` goes on (False closes both ends); ``state`` is the connection's."""
        return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            state: dict[str, bool] = {}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], from_client: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if not self.passes(data, from_client, state):
                    break
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


class PgReplyCutter(TcpProxy):
    """A TCP proxy in front of PostgreSQL. ``cut_reply_to(marker)``: the next client message
    holding ``marker`` (a piece of a statement's text) goes through to the server, which runs
    and commits it; the server's reply is then dropped and both connections closed. The
    client sees a connection lost in the middle of its statement, not knowing it committed."""

    def __init__(self, host: str, port: int) -> None:
        self.marker: bytes | None = None
        self.cuts = 0
        super().__init__(host, port)

    def cut_reply_to(self, marker: str) -> None:
        with self.lock:
            self.marker = marker.encode()

    def passes(self, data: bytes, from_client: bool, state: dict[str, bool]) -> bool:
        with self.lock:
            if from_client:
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    state["armed"] = True
                return True
            if state.get("armed"):
                self.cuts += 1
                return False  # the reply is lost: close both ends
        return True
