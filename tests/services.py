"""Throwaway services for the scale-out test: a PostgreSQL cluster and an `mlflow server`, both on loopback.

Each session fixture starts its service in a temporary folder on a free port of 127.0.0.1, waits until it
answers, and stops it and removes its files at the end of the session. The test therefore needs no running
services, only the PostgreSQL server binaries (Debian package `postgresql`, which `.ci/run` installs); without
them it is skipped, saying so.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

_START_TIMEOUT_S = 120


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the service binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The folder holding `initdb`, `pg_ctl` and `postgres`: Debian's /usr/lib/postgresql/<version>/bin (newest
    first; Debian puts no server binaries on PATH), else wherever `pg_ctl` on PATH really lives."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    for folder in candidates:
        if all(os.access(os.path.join(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


@dataclass(frozen=True)
class Postgres:
    """A running throwaway cluster: one database owned by one password-protected user."""

    host: str
    port: int
    user: str
    password: str
    database: str

    @property
    def url(self) -> str:
        """The SQLAlchemy URL, password included."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


class _Cluster:
    """initdb + pg_ctl in one folder. PostgreSQL refuses to run as root: as root, every server command runs as
    the `postgres` system user (created by the Debian package), which then owns the folder."""

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="ocrdet-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base)
                pytest.skip("running as root, and PostgreSQL will not run as root: needs the `postgres` system "
                            "user (the Debian package `postgresql` creates it)")
            os.chown(self.base, self.owner.pw_uid, self.owner.pw_gid)

    def run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin_dir / tool), *args]
        if self.owner is not None:
            cmd = ["runuser", "-u", self.owner.pw_name, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_START_TIMEOUT_S)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stderr[-2000:]}\n{log}")

    def write_private(self, name: str, text: str) -> Path:
        path = self.base / name
        path.write_text(text)
        path.chmod(0o600)
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        return path

    def start(self, port: int, user: str, password: str) -> None:
        # The password only ever exists in this file, for initdb, and in the test's own memory.
        pwfile = self.write_private("pwfile", password + "\n")
        try:
            self.run("initdb", "-D", str(self.data), "-U", user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                     "--encoding=UTF8", "--no-sync")
        finally:
            pwfile.unlink()
        # TCP on loopback only, no Unix socket (its default folder may not exist or be writable), no fsync: the
        # data is thrown away.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                 "-t", str(_START_TIMEOUT_S), "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1:<free port> with user `ocrdet` (random password) and database `optuna`."""
    # The driver SQLAlchemy (2.1+) loads for postgresql:// URLs: psycopg 3, test extra `psycopg[binary]`.
    import psycopg

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH: "
                    "install the Debian package `postgresql` (.ci/run does)")
    cluster = _Cluster(bin_dir)
    server = Postgres("127.0.0.1", free_port(), "ocrdet", f"pw-{secrets.token_hex(12)}", "optuna")
    try:
        cluster.start(server.port, server.user, server.password)
        # autocommit: CREATE DATABASE cannot run inside a transaction.
        with psycopg.connect(host=server.host, port=server.port, user=server.user, password=server.password,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {server.database}")
        yield server
    finally:
        cluster.stop()


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`: its URI and the files behind it (backend store and served artifacts)."""

    uri: str
    backend_db: Path
    artifacts: Path


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {_START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1:<free port> with a SQLite backend store and served (proxied) artifacts, so
    clients upload artifacts through it and experiments need no artifact location of their own."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", root / "mlflow.db", root / "artifacts")
    log = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{server.backend_db}", "--serve-artifacts",
           "--artifacts-destination", str(server.artifacts)]
    with open(log, "w") as out:
        # Its own session: the server's worker processes are stopped with it, as one process group.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    try:
        _wait_healthy(f"{server.uri}/health", proc, log)
        yield server
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
