"""An HTTP proxy in front of moto's S3 that answers chosen requests with an S3 error.

moto cannot be told to fail a GET with a 500; S3 does (InternalError, SlowDown…). The
worker reaches the proxy through ``AWS_ENDPOINT_URL_S3`` (SQS stays direct), so every S3
request it makes passes here: those matching a rule get the error, the others go on to moto
unchanged. Every request is logged (method, path, status) so a test can count what the
worker asked for, and how often.
"""
from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

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

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        body = self._body(handler)
        rule = self._rule_for(method, unquote(path))
        if rule is not None:
            with self.lock:
                self.failed += 1
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{rule.code}</Code>'
                   f'<Message>injected by the test</Message><RequestId>fault</RequestId></Error>').encode()
            handler.send_response(rule.status)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(xml)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(xml)
            self._note(method, path, rule.status)
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
