"""Shared fixtures: a throwaway PostgreSQL cluster, one fresh database per test on each backend,
config files written per test, and the service run in-process or as a real process."""

from __future__ import annotations

import gc
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests import support
from tests.dnsserver import ZoneServer
from tests.support import AppThread, ServerProcess, write_config

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


class PostgresCluster:
    """initdb + pg_ctl on a free loopback port, in a temporary directory."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="mailproc-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root; Debian's package brings a 'postgres' user.
            self.user = "postgres"
            shutil.chown(self.root, user="postgres")

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.root,
        )

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c fsync=on -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="session", autouse=True)
def dns_server() -> Iterator[ZoneServer]:
    """One authoritative DNS server on loopback for the whole suite."""
    with ZoneServer(ttl=0, negative_ttl=0) as server:
        support.TEST_DNS[:] = [server.address]
        yield server
        support.TEST_DNS.clear()


@pytest.fixture
def zone(dns_server: ZoneServer) -> Iterator[ZoneServer]:
    """The suite's DNS server, emptied and without faults after the test."""
    try:
        yield dns_server
    finally:
        dns_server.clear()
        dns_server.clear_faults()
        dns_server.set_down(False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    bindir = _pg_bindir()
    if bindir is None:
        message = "PostgreSQL server not installed (run tests/ensure_postgres.sh as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PostgresCluster(bindir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def create_pg_database(cluster: PostgresCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(cluster: PostgresCluster, name: str) -> None:
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new database on the throwaway cluster."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mailproc.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = create_pg_database(cluster)
    try:
        yield cluster.url(name)
    finally:
        # Collect this test's garbage now, while its engines are still whole: SQLAlchemy's
        # finalizers then return any connection a thread left checked out, and a connection
        # really left open warns here, in the test that made it, not in a later one.
        gc.collect()
        drop_pg_database(cluster, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mailproc.db'}"


@pytest.fixture
def config_file(tmp_path: Path, database_url: str) -> Path:
    return write_config(tmp_path / "mailproc.toml", database_url=database_url)


@pytest.fixture
def app(tmp_path: Path, database_url: str) -> Iterator[AppThread]:
    """The service in-process (its own event loop in a thread) on a free port."""
    with AppThread.running(database_url) as running:
        yield running


@pytest.fixture
def server_process(tmp_path: Path, database_url: str) -> Iterator[ServerProcess]:
    """`mailproc serve` as a real child process; the test starts and signals it."""
    port = free_port()
    config = write_config(tmp_path / "mailproc.toml", database_url=database_url, port=port)
    process = ServerProcess(config, port, log_path=tmp_path / "serve.log")
    try:
        yield process
    finally:
        process.kill()


def pg_database_name(url: str) -> str:
    return str(make_url(url).database)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The reliability suite's counts (sent, accepted, decided, lost, duplicated), one line per
    test, whatever the capture setting."""
    from tests.reliability.counts import summary

    lines = summary(terminalreporter.config)
    if lines:
        terminalreporter.section("reliability counts")
        for line in lines:
            terminalreporter.write_line(line)
