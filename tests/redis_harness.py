"""Real Redis servers for the tests: one standalone server, or a three-master cluster.

Each server is a ``redis-server`` child process bound to 127.0.0.1 only, on a free port,
with its own temporary directory; it is stopped and its directory removed when the
``with`` block ends, on :meth:`RedisServer.close`, or at interpreter exit, whichever
comes first. A missing ``redis-server`` skips the test that wanted one, with the reason,
except under CI (``$CI`` set) or ``QUOTAGUARD_REQUIRE_REDIS=1``: there it is an error.

The module talks to the servers with a few lines of RESP over a socket, so starting one
needs nothing but ``redis-server`` (and ``redis-cli`` to create a cluster).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

__all__ = [
    "RedisCluster",
    "RedisError",
    "RedisServer",
    "cluster_seeds",
    "command",
    "flush",
    "free_port",
    "masters",
    "redis_py",
    "redis_required",
    "require_binary",
]

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

Reply = str | int | bytes | list["Reply"] | None


class RedisError(Exception):
    """An error reply from the server (``-ERR ...``), or one that never came."""


def redis_required() -> bool:
    """True under CI or with ``QUOTAGUARD_REQUIRE_REDIS=1``: a missing server is an error."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("QUOTAGUARD_REQUIRE_REDIS") == "1"


def require_binary(name: str) -> str:
    """The path of ``name`` (``redis-server``, ``redis-cli``); skips the test when it is
    missing, or raises where Redis is required (CI)."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (install Redis >= 7 to run the Redis ledger tests)"
    if redis_required():
        raise RuntimeError(f"{reason}; required because $CI or QUOTAGUARD_REQUIRE_REDIS=1 is set")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------- a little RESP


def _encode(args: tuple[str | bytes | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(f: Any) -> Reply:
    line: bytes = f.readline()
    if not line.endswith(b"\r\n"):
        raise RedisError("connection closed before the reply")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisError(body.decode())
    if kind == b":":
        return int(body)
    if kind == b"$":
        n = int(body)
        if n < 0:
            return None
        data: bytes = f.read(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(body)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise RedisError(f"unexpected reply {line!r}")


def command(
    port: int,
    *args: str | bytes | int,
    password: str | None = None,
    timeout: float = 5.0,
) -> Reply:
    """Sends one command to 127.0.0.1:``port`` (after ``AUTH`` when a password is given)
    and returns its reply; an error reply raises :class:`RedisError`, a refused or
    broken connection ``OSError``."""
    with socket.create_connection((HOST, port), timeout=timeout) as s, s.makefile("rb") as f:
        if password is not None:
            s.sendall(_encode(("AUTH", password)))
            _read_reply(f)
        s.sendall(_encode(args))
        return _read_reply(f)


# ---------------------------------------------------------------------- one server


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 at a free port, in a temporary directory of its own.

    ``appendonly`` turns the append-only file on, fsynced before every reply
    (``appendfsync always``), so whatever the server acknowledged survives a kill and a
    restart. ``save`` is the RDB snapshot schedule (``None``: none). ``password`` sets
    ``requirepass``; :attr:`url` then carries it.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        save: str | None = None,
        password: str | None = None,
        port: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.binary = require_binary("redis-server")
        self.appendonly = appendonly
        self.save = save
        self.password = password
        self.extra = dict(extra or {})
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="quotaguard-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        atexit.register(self.close)

    # -- addresses

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{self.address}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, db: int = 0) -> Any:
        """A redis-py client of this server (the caller closes it)."""
        import redis

        return redis.Redis(host=HOST, port=self.port, db=db, password=self.password)

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> Reply:
        return command(self.port, *args, password=self.password, timeout=timeout)

    # -- life cycle

    def _config(self) -> str:
        settings: dict[str, str] = {
            "bind": HOST,
            "port": str(self.port),
            "protected-mode": "yes",
            "daemonize": "no",
            "dir": str(self.dir),
            "logfile": str(self.dir / "redis.log"),
            "pidfile": str(self.dir / "redis.pid"),
            "save": self.save if self.save else '""',
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": "always",
        }
        if self.password is not None:
            settings["requirepass"] = self.password
        settings.update(self.extra)
        return "".join(f"{key} {value}\n" for key, value in settings.items())

    def start(self) -> RedisServer:
        """Starts the server (again, on the same port and directory after a stop) and
        waits until it answers ``PING``."""
        if self._closed:
            raise RuntimeError("this server was closed")
        if self.running:
            return self
        attempts = 1 if self._fixed_port or self.proc is not None else 3
        for attempt in range(attempts):
            if attempt:  # the port was taken between free_port() and the bind: another
                self.port = free_port()
            conf = self.dir / "redis.conf"
            conf.write_text(self._config(), encoding="utf-8")
            conf.chmod(0o600)  # it may hold the password
            self.proc = subprocess.Popen(
                [self.binary, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self.dir,
            )
            if self._wait_ready():
                return self
            self._reap()
        raise RuntimeError(f"redis-server did not start on {self.address}:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                if self.command("PING", timeout=1.0) == "PONG":
                    return True
            except (OSError, RedisError):  # not listening yet, or LOADING the AOF
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stops the server with ``SHUTDOWN NOSAVE`` (the append-only file, when on, keeps
        what was written), else SIGTERM, else SIGKILL. The directory stays for
        :meth:`start`."""
        if not self.running:
            self._reap()
            return
        try:
            self.command("SHUTDOWN", "NOSAVE", timeout=2.0)
        except (OSError, RedisError):  # the reply never comes: the server is gone
            pass
        assert self.proc is not None
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: what an ``appendfsync always`` server acknowledged is on disk."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def restart(self, *, kill: bool = False) -> RedisServer:
        """Stops (or kills) the server and starts it again on the same port and directory,
        so an append-only file is read back."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        """Stops the server and removes its directory; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            atexit.unregister(self.close)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "redis.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.address} {state}>"


# ---------------------------------------------------------------------- a cluster


class RedisCluster:
    """Three Redis Cluster masters (no replicas) on free 127.0.0.1 ports, made with
    ``redis-cli --cluster create``; ready once every node reports ``cluster_state:ok``."""

    MASTERS = 3

    def __init__(self, *, appendonly: bool = False) -> None:
        self.cli = require_binary("redis-cli")
        self.nodes: list[RedisServer] = []
        for _ in range(self.MASTERS):
            cluster = {
                "cluster-enabled": "yes",
                "cluster-config-file": "nodes.conf",
                "cluster-node-timeout": "5000",
                # The bus port is chosen too: port + 10000 may not be free.
                "cluster-port": str(free_port()),
            }
            self.nodes.append(RedisServer(appendonly=appendonly, extra=cluster))

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            created = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(node.address for node in self.nodes),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({created.returncode}):\n"
                    f"{created.stdout[-2000:]}{created.stderr[-2000:]}"
                )
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        info: dict[int, str] = {}
        while time.monotonic() < deadline:
            for node in self.nodes:
                try:
                    reply = node.command("CLUSTER", "INFO", timeout=1.0)
                except (OSError, RedisError) as e:
                    info[node.port] = repr(e)
                    continue
                info[node.port] = reply.decode() if isinstance(reply, bytes) else str(reply)
            if all(
                "cluster_state:ok" in text and f"cluster_known_nodes:{self.MASTERS}" in text
                for text in info.values()
            ) and len(info) == len(self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster did not reach cluster_state:ok: {info}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisCluster {self.url}>"


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The (host, port) seed nodes of ``redis+cluster://h1:p1,h2:p2``."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis+cluster", "rediss+cluster"):
        raise ValueError(f"not a cluster URL: {url!r}")
    netloc = parts.netloc.rpartition("@")[2]
    seeds = []
    for seed in netloc.split(","):
        host, _, port = seed.rpartition(":")
        seeds.append((unquote(host), int(port)))
    return seeds


# ---------------------------------------------------------------------- through redis-py


def redis_py() -> Any:
    """The ``redis`` package (redis-py); skips the test without it, or raises where
    Redis is required (CI)."""
    try:
        import redis
    except ImportError as e:
        reason = "redis-py is not installed (pip install redis)"
        if redis_required():
            raise RuntimeError(
                f"{reason}; required because $CI or QUOTAGUARD_REQUIRE_REDIS=1"
            ) from e
        pytest.skip(reason)
    return redis


def masters(url: str) -> list[Any]:
    """redis-py clients of every master of ``url``: the one server of a ``redis://`` URL
    (its database selected), each master of a ``redis+cluster://`` one. The caller closes
    them."""
    redis = redis_py()
    if not url.startswith(("redis+cluster://", "rediss+cluster://")):
        return [redis.Redis.from_url(url)]
    seeds = [redis.cluster.ClusterNode(host, port) for host, port in cluster_seeds(url)]
    cluster = redis.RedisCluster(startup_nodes=seeds)
    try:
        return [redis.Redis(host=node.host, port=node.port) for node in cluster.get_primaries()]
    finally:
        cluster.close()


def flush(url: str) -> None:
    """Empties the database of a ``redis://`` URL, or every master of a cluster."""
    for client in masters(url):
        try:
            client.flushdb()
        finally:
            client.close()
