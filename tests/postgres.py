"""A throw-away PostgreSQL server for tests: Debian's ``postgresql`` binaries, a temporary
cluster on 127.0.0.1 and a free port, stopped and deleted at the end.

Why not a container or a mock: the tests prove that Optuna studies work on the real server
tune.py users point their workers at. Install the server with ``apt-get install postgresql``
(``.ci/run`` does); where it is absent, :func:`postgres_server` skips with the reason.
PostgreSQL refuses to run as root, so as root the cluster is owned by and run as the
``postgres`` system user (created by the Debian package) or else ``nobody``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: where Debian installs the server binaries (``initdb`` and ``pg_ctl`` are not on PATH there)
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
#: tried in this order as the cluster's owner when the tests run as root
UNPRIVILEGED_USERS = ("postgres", "nobody")


class PostgresUnavailable(RuntimeError):
    """The server cannot be had here; the message says why (the tests skip with it)."""


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    data_dir: Path

    def url(self, database: str = "postgres") -> str:
        """``postgresql://`` URL of ``database`` as tune.py users write it; no password."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; its SQLAlchemy URL."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian version."""
    on_path = shutil.which("initdb"), shutil.which("pg_ctl")
    if all(on_path):
        return Path(on_path[0]).parent
    folders = sorted(glob.glob(DEBIAN_BIN_GLOB),
                     key=lambda p: [int(x) for x in Path(p).parent.name.split(".")
                                    if x.isdigit()])
    for folder in reversed(folders):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH nor "
                              f"in {DEBIAN_BIN_GLOB}: apt-get install postgresql")


def server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and neither of the users "
                              f"{UNPRIVILEGED_USERS} exists to own the PostgreSQL cluster")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _run(command: list[str], account: pwd.struct_passwd | None, cwd: Path,
         timeout: float = 120) -> subprocess.CompletedProcess:
    as_user = {} if account is None else {"user": account.pw_uid, "group": account.pw_gid,
                                          "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    if account is not None:
        env.update(HOME=str(cwd), USER=account.pw_name, LOGNAME=account.pw_name)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **as_user)


@contextlib.contextmanager
def postgres_server(host: str = "127.0.0.1") -> Iterator[PostgresServer]:
    """A running server (superuser ``postgres``, trust authentication on ``host`` only)."""
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's driver for postgresql:// URLs)
    except ImportError as error:
        raise PostgresUnavailable(f"the PostgreSQL driver is not installed ({error}): "
                                  "pip install -e '.[dev]'") from error
    binaries = find_binaries()
    account = server_account()
    # not under pytest's tmp folder: that is private to root, and the server's user must reach it
    folder = Path(tempfile.mkdtemp(prefix="ser-pipeline-pg-"))
    data_dir = folder / "data"
    try:
        if account is not None:
            os.chown(folder, account.pw_uid, account.pw_gid)
        initdb = _run([str(binaries / "initdb"), "-D", str(data_dir), "-U", "postgres",
                       "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"], account, folder)
        if initdb.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {initdb.stderr.strip()[-2000:]}")
        for attempt in range(3):  # the free port may be taken between the probe and the start
            port = free_port(host)
            # no fsync (a throw-away cluster); the unix socket in our folder, not /var/run
            options = f"-h {host} -p {port} -k {folder} -F -c max_connections=50"
            started = _run([str(binaries / "pg_ctl"), "-D", str(data_dir), "-l",
                            str(folder / "server.log"), "-o", options, "-w", "-t", "60",
                            "start"], account, folder)
            if started.returncode == 0:
                break
            if attempt == 2:
                log_text = (folder / "server.log").read_text(errors="replace")[-2000:] \
                    if (folder / "server.log").exists() else ""
                raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()} "
                                          f"{log_text}")
        try:
            yield PostgresServer(host, port, "postgres", data_dir)
        finally:
            _run([str(binaries / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"],
                 account, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
