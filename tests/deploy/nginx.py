"""A loopback nginx in front of lossd replicas, configured from the deployment template.

The routing config is `docker/nginx/lossd.conf.template`, the same file Docker Compose and
Kubernetes render; this module only renders its placeholders the way the nginx image's
envsubst does and wraps it in a minimal nginx.conf with a private prefix, pid and logs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "docker" / "nginx" / "lossd.conf.template"

# Every directory nginx would otherwise take from its build (/var/lib/nginx/...), so that
# the test needs nothing outside its own prefix.
_WRAPPER = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/lossd.conf;
}}
"""


def find_nginx() -> str | None:
    """The nginx binary (Debian installs it to /usr/sbin, not on a user's PATH)."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def render(template: str, values: Mapping[str, str]) -> str:
    """Substitute `${NAME}` and `$NAME` for the given names only, as envsubst does when it
    is told which variables to replace; every other `$...` is nginx's and stays."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values[name] if name in values else match.group(0)

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, template)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wrapper(prefix: Path) -> str:
    """An nginx.conf that keeps everything under `prefix` and includes prefix/lossd.conf."""
    return _WRAPPER.format(prefix=prefix)


def syntax_errors(binary: str, lossd_conf: str) -> str:
    """What `nginx -t` says against a rendered lossd.conf; empty when nginx accepts it."""
    with tempfile.TemporaryDirectory(prefix="lossd-nginx-t-") as tmp:
        prefix = Path(tmp)
        (prefix / "lossd.conf").write_text(lossd_conf)
        (prefix / "nginx.conf").write_text(wrapper(prefix))
        checked = subprocess.run(
            [
                binary,
                "-t",
                "-q",
                "-p",
                str(prefix),
                "-c",
                str(prefix / "nginx.conf"),
                "-e",
                str(prefix / "error.log"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        log = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
    return "" if checked.returncode == 0 else checked.stderr + log


class Nginx:
    """nginx on 127.0.0.1:`port`, hashing over `replicas` ("host:port" each).

    Use as a context manager; `target` is what a LossClient connects to.
    """

    def __init__(self, binary: str, replicas: Sequence[str]) -> None:
        self.binary = binary
        self.replicas = list(replicas)
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        # mkdtemp is private (0700); the workers drop to `nobody` when nginx runs as
        # root, and must still reach their temp directories inside.
        self.prefix = Path(tempfile.mkdtemp(prefix="lossd-nginx-"))
        self.prefix.chmod(0o755)
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The rendered lossd.conf: the template with this test's values."""
        servers = " ".join(f"server {r} max_fails=0;" for r in self.replicas)
        return render(
            TEMPLATE.read_text(),
            {
                "LOSSD_LISTEN": self.target,
                "LOSSD_RESOLVER": "",  # loopback addresses: nothing to resolve
                "LOSSD_UPSTREAM_SERVERS": servers,
            },
        )

    def __enter__(self) -> Nginx:
        errors = syntax_errors(self.binary, self.config())
        if errors:
            self.__exit__()
            raise RuntimeError(f"nginx rejects the rendered template:\n{errors}")
        (self.prefix / "lossd.conf").write_text(self.config())
        (self.prefix / "nginx.conf").write_text(wrapper(self.prefix))
        command = [
            self.binary,
            "-p",
            str(self.prefix),
            "-c",
            str(self.prefix / "nginx.conf"),
            "-e",
            str(self.prefix / "error.log"),
        ]
        self._process = subprocess.Popen(
            [*command, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_until_listening(timeout=10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # graceful: finish running calls
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def error_log(self) -> str:
        """What nginx logged so far (empty when nothing)."""
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait_until_listening(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.error_log()
                self.__exit__()
                raise RuntimeError(f"nginx exited with {self._process.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        log = self.error_log()
        self.__exit__()
        raise RuntimeError(f"nginx did not listen on {self.target} within {timeout} s:\n{log}")
