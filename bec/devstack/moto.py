"""A moto server (real HTTP S3 + SQS endpoint) as a child process."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _moto_command(port: int, host: str) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    if exe.exists():
        return [str(exe), "-H", host, "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", host, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]


def is_up(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen | None

    def reset(self) -> None:
        """Forget every bucket and queue (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None,
          detach: bool = False, timeout: float = 30.0) -> MotoServer:
    """Start moto_server and wait until it answers. ``detach`` lets it outlive us (bec dev up)."""
    port = port or free_port(host)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    env = dict(os.environ)
    env.pop("AWS_ENDPOINT_URL", None)
    proc = subprocess.Popen(_moto_command(port, host), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=detach)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}"
                               + (f"; see {log_path}" if log_path else ""))
        if is_up(url, 0.5):
            return MotoServer(url, proc)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout:.0f}s")
