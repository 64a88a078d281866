"""A real, throwaway PostgreSQL cluster for tests: initdb into a temporary folder, a server on 127.0.0.1 only (its
unix sockets in that folder), trust authentication, removed at the end.

PostgreSQL refuses to run as root: as root, initdb and pg_ctl run as the `postgres` system user, in a folder it
owns (pytest's own tmp_path is private to root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline_utils import free_port

START_TIMEOUT = 120  # seconds, for pg_ctl start -w on two busy cores
SUPERUSER = "mlflow"
INSTALL = "apt-get install postgresql"


def bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin (the newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent  # the real folder: a link on PATH may stand alone
    versions = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (path.parent / "pg_ctl").is_file() and path.parent.parent.name.isdigit()
    ]
    return max(versions, key=lambda path: int(path.parent.name), default=None)


def _as_root() -> bool:
    return os.geteuid() == 0


def missing() -> str | None:
    """Why a PostgreSQL-backed test cannot run here, or None when it can."""
    if bin_dir() is None:
        return f"PostgreSQL is not installed (no initdb or pg_ctl on PATH or in /usr/lib/postgresql/*/bin): {INSTALL}"
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2, MLflow's PostgreSQL driver, is not installed: pip install psycopg2-binary (in the dev extras)"
    if _as_root():
        if shutil.which("runuser") is None:
            return "as root, PostgreSQL runs as the postgres user, but runuser (util-linux) is not installed"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return f"as root, PostgreSQL runs as the postgres system user, which does not exist: {INSTALL}"
    return None


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; create_database() gives each user its own database."""

    def __init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError(missing())
        self.bin = found
        self.dir: Path | None = None
        self.port = 0

    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "data"

    def _as_owner(self, *args: str | Path) -> list[str]:
        """A command line run as the cluster's owner: the postgres user when we are root, else ourselves."""
        command = [str(arg) for arg in args]
        return ["runuser", "-u", "postgres", "--", *command] if _as_root() else command

    def _run(self, args: list[str], timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
        result = subprocess.run(
            args, cwd=self.dir, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def start(self) -> PostgresServer:
        self.dir = Path(tempfile.mkdtemp(prefix="postgres-test-"))  # 0700, ours
        try:
            if _as_root():
                shutil.chown(self.dir, user="postgres", group="postgres")
            # No fsync: a throwaway cluster need not survive a power cut, and it saves the busy disk.
            self._run(
                self._as_owner(
                    self.bin / "initdb",
                    "--pgdata",
                    self.data_dir,
                    "--username",
                    SUPERUSER,
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                )
            )
            for attempt in range(3):  # another process may take the free port before the server binds it
                self.port = free_port()
                settings = {
                    "listen_addresses": "'127.0.0.1'",
                    "port": str(self.port),
                    "unix_socket_directories": f"'{self.dir}'",
                    "fsync": "off",
                    "synchronous_commit": "off",
                    "full_page_writes": "off",
                }
                conf = self.data_dir / "postgresql.auto.conf"  # ALTER SYSTEM's file: read last, overrides the rest
                conf.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
                try:
                    self._run(
                        self._as_owner(
                            self.bin / "pg_ctl",
                            "start",
                            "--pgdata",
                            self.data_dir,
                            "--log",
                            self.dir / "server.log",
                            "--wait",
                            "--timeout",
                            str(START_TIMEOUT),
                        ),
                        timeout=START_TIMEOUT + 30,
                    )
                    break
                except AssertionError:
                    if attempt == 2 or "could not bind" not in self.log():
                        raise AssertionError(f"PostgreSQL did not start:\n{self.log()}") from None
            return self
        except BaseException:
            self.stop()
            raise

    def create_database(self, name: str) -> str:
        """A new, empty database; its SQLAlchemy URI, as MLflow's --backend-store-uri and MlflowClient take it."""
        import psycopg2

        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            connection.close()
        return self.uri(name)

    def uri(self, database: str) -> str:
        # The driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, and the dev extras hold psycopg2.
        return f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        path = self.dir / "server.log" if self.dir else None
        return path.read_text(errors="replace")[-5000:] if path and path.exists() else ""

    def stop(self) -> None:
        """Stop at once (nothing needs to be kept) and remove the cluster's files."""
        if self.dir is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    self._as_owner(self.bin / "pg_ctl", "stop", "--pgdata", self.data_dir, "-m", "immediate", "-w"),
                    cwd=self.dir,
                    capture_output=True,
                    timeout=60,
                    stdin=subprocess.DEVNULL,
                )
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()
