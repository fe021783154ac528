"""Cluster-grade stores on a head node: a PostgreSQL cluster and an `mlflow server` on it (`hisf-bench stores serve`)."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
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
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from orchestrator.paths import DeletionRefused, remove_tree

PG_USER = "hisf"  # the database role every client connects as (superuser of this cluster only)
DATABASES = ("mlflow", "optuna")
AUTH_DATABASE = "mlflow_auth"  # MLflow's basic-auth users, when credentials are on
PASSWORD_ENV = "HISF_STORES_PASSWORD"
MIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter passwords


class StoresError(RuntimeError):
    """A store that cannot be set up or started, with what to do about it."""


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: $HISF_PG_BIN, then PATH, then Debian's /usr/lib/postgresql/<version>/bin."""
    folders = [os.environ["HISF_PG_BIN"]] if os.environ.get("HISF_PG_BIN") else []
    found = shutil.which(name)
    if found:
        folders.append(str(Path(found).resolve().parent))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                      if p.parent.name.isdigit() else 0, reverse=True)
    folders += [str(p) for p in versions]
    for folder in folders:
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    raise StoresError(f"PostgreSQL's `{name}` was not found (HISF_PG_BIN, PATH, /usr/lib/postgresql/*/bin): "
                      "install the server, e.g. `apt-get install postgresql`, or set HISF_PG_BIN to its bin folder")


@dataclass(frozen=True)
class Account:
    """The unprivileged OS user PostgreSQL runs as (it refuses to run as root); None fields: this process's."""

    name: str
    uid: int | None = None
    gid: int | None = None


def postgres_account(run_as: str | None = None) -> Account:
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() != 0:
        if run_as not in (None, me):
            raise StoresError(f"--run-as {run_as}: only root can run PostgreSQL as another user (you are {me})")
        return Account(me)
    name = run_as or "postgres"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise StoresError(f"PostgreSQL refuses to run as root and there is no user {name!r}: pass --run-as USER, an "
                          "unprivileged user (Debian's postgresql package creates `postgres`)") from None
    if entry.pw_uid == 0:
        raise StoresError(f"--run-as {name}: that user is root; PostgreSQL needs an unprivileged one")
    return Account(name, entry.pw_uid, entry.pw_gid)


def _die_with_parent(sig: int):
    """preexec_fn: the child gets `sig` if this process dies (even SIGKILLed), so no server outlives us."""
    def set_pdeathsig() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG; after the uid change, so it sticks
    return set_pdeathsig


def _as(account: Account) -> dict:
    return {} if account.uid is None else {"user": account.uid, "group": account.gid, "extra_groups": []}


def _chown(path: Path, account: Account) -> None:
    if account.uid is not None:
        os.chown(path, account.uid, account.gid)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class Postgres:
    """One PostgreSQL cluster in `data` (initdb'd on first start, reused after), run as a child process.

    The unix socket lives in a private temporary folder (mode 0700, the server's user): over it the server's
    own tools (database creation, MLflow's server) connect without a password. TCP listens on `listen`;
    with a password every TCP client authenticates with scram-sha-256, else loopback clients are trusted.
    """

    def __init__(self, data: Path, port: int, listen: str = "127.0.0.1", account: Account | None = None,
                 log: Path | None = None, password: str | None = None, durable: bool = True):
        self.data, self.port, self.listen = Path(data), int(port), listen
        # durable=False (tests' throwaway clusters only): no fsync, so starting and stopping cost no disk flushes.
        self.durable = durable
        self.account = account or postgres_account()
        self.log = Path(log) if log else self.data.parent / "postgres.log"
        self.password = password
        self.socket_dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def _check_not_served(self) -> None:
        pid_file = self.data / "postmaster.pid"
        if not pid_file.is_file():
            return
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().split()[0])
            # A live process of that pid that is a postgres (a stale file's pid may belong to anything now).
            if b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes():
                raise StoresError(f"{self.data} is served already (PostgreSQL pid {pid}): stop that `stores serve` "
                                  "first, or pass another --root")

    def _initdb(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        _chown(self.data, self.account)
        reach = subprocess.run(["/bin/sh", "-c", 'cd "$1" && test -w .', "sh", str(self.data)], **_as(self.account),
                               capture_output=True)
        if reach.returncode != 0:
            raise StoresError(f"the PostgreSQL user {self.account.name!r} cannot write {self.data}: give it search "
                              "permission on every folder above it (chmod o+x), or pick a --root it can reach")
        out = subprocess.run([postgres_bin("initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust",
                              "-E", "UTF8", "--no-locale"], **_as(self.account), capture_output=True, text=True,
                             cwd="/")
        if out.returncode != 0:
            raise StoresError(f"initdb {self.data} failed: {out.stderr.strip()[-2000:]}")

    def _write_hba(self) -> None:
        method = "scram-sha-256" if self.password else "trust"
        lines = ["# Written by `hisf-bench stores serve` at each start.",
                 "# The unix socket is in a private folder only the server's own user (and root) can open.",
                 "local all all trust",
                 f"host all {PG_USER} 127.0.0.1/32 {method}", f"host all {PG_USER} ::1/128 {method}"]
        if self.password:
            lines += [f"host all {PG_USER} 0.0.0.0/0 scram-sha-256", f"host all {PG_USER} ::/0 scram-sha-256"]
        hba = self.data / "pg_hba.conf"
        hba.write_text("\n".join(lines) + "\n")
        _chown(hba, self.account)

    def start(self, timeout: float = 90) -> "Postgres":
        self._check_not_served()
        if not self.initialized:
            self._initdb()
        self._write_hba()
        if self.socket_dir is None:
            # Short and private: unix socket paths are limited to ~107 bytes. Kept over restarts (MLflow's
            # server connects through it), removed by close().
            self.socket_dir = Path(tempfile.mkdtemp(prefix="hisf-pg-"))
            _chown(self.socket_dir, self.account)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [postgres_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.socket_dir),
               "-c", f"listen_addresses={self.listen}", "-c", "max_connections=300",
               "-c", "password_encryption=scram-sha-256"]
        if not self.durable:
            cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with open(self.log, "a") as log:
            # SIGINT is PostgreSQL's fast shutdown: what it gets if this process dies.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent(signal.SIGINT),
                                         cwd="/", **_as(self.account))
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StoresError(f"PostgreSQL exited with {self.proc.returncode}; its log {self.log}:\n{_tail(self.log)}")
            try:
                with self.admin() as conn:
                    conn.execute("select 1")
                break
            except Exception:
                if time.monotonic() > end:
                    raise StoresError(f"PostgreSQL did not accept connections in {timeout:.0f}s; {self.log}:\n"
                                      f"{_tail(self.log)}") from None
                time.sleep(0.2)
        self._prepare()
        return self

    @contextlib.contextmanager
    def admin(self, dbname: str = "postgres"):
        import psycopg

        conn = psycopg.connect(host=str(self.socket_dir), port=self.port, user=PG_USER, dbname=dbname,
                               autocommit=True, connect_timeout=5)
        try:
            yield conn
        finally:
            conn.close()

    def _prepare(self) -> None:
        from psycopg import sql

        with self.admin() as conn:
            have = {r[0] for r in conn.execute("select datname from pg_database")}
            for db in DATABASES + ((AUTH_DATABASE,) if self.password else ()):
                if db not in have:
                    conn.execute(sql.SQL("create database {}").format(sql.Identifier(db)))
            if self.password:
                # The verifier is computed here, so the password itself never reaches the server (or its log).
                verifier = conn.pgconn.encrypt_password(self.password.encode(), PG_USER.encode(), b"scram-sha-256")
                conn.execute(sql.SQL("alter role {} password {}").format(sql.Identifier(PG_USER),
                                                                         sql.Literal(verifier.decode())))

    def url(self, db: str, host: str | None = None) -> str:
        """The SQLAlchemy URL a TCP client uses (no password in it: libpq reads PGPASSWORD or ~/.pgpass)."""
        return f"postgresql+psycopg://{PG_USER}@{_url_host(host or self.listen)}:{self.port}/{db}"

    def socket_url(self, db: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@/{db}?host={self.socket_dir}&port={self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            # fast shutdown (SIGINT): clients are disconnected, the cluster is checkpointed and left clean.
            for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5), (signal.SIGKILL, 5)):
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(wait)

    def close(self) -> None:
        """Stop the server and remove its socket folder."""
        self.stop()
        if self.socket_dir is not None:
            # Made by tempfile.mkdtemp in the temp folder; what cannot be removed stays (as ignore_errors did).
            with contextlib.suppress(OSError, DeletionRefused):
                remove_tree(self.socket_dir, tempfile.gettempdir(), "PostgreSQL socket folder")
            self.socket_dir = None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class MlflowServer:
    """`mlflow server` over PostgreSQL, serving artifacts from a folder it owns; basic auth when a password is set."""

    def __init__(self, backend_uri: str, artifacts: Path, host: str = "127.0.0.1", port: int = 5000,
                 workers: int = 4, log: Path | None = None, auth: dict | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.backend_uri, self.artifacts = backend_uri, Path(artifacts)
        self.host, self.port, self.workers = host, int(port), workers
        self.log = Path(log) if log else self.artifacts.parent / "mlflow.log"
        self.auth = auth  # {"config": ini path, "password": ..., "secret_key": ...}
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    def start(self, timeout: float = 180) -> "MlflowServer":
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
               "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
               "--host", self.host, "--port", str(self.port), "--workers", str(self.workers), *self.extra_args]
        # MLflow 3's server also starts job consumers (GenAI judges, prompt optimisation): a dozen processes
        # a benchmark's tracking never uses.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            env.update({"MLFLOW_AUTH_CONFIG_PATH": str(self.auth["config"]),
                        "MLFLOW_AUTH_ADMIN_PASSWORD": self.auth["password"],
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": self.auth["secret_key"]})
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, cwd=str(self.artifacts.parent),
                                         preexec_fn=_die_with_parent(signal.SIGTERM))
        end = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise StoresError(f"mlflow server exited with {self.proc.returncode}; its log {self.log}:\n"
                                  f"{_tail(self.log)}")
            if time.monotonic() > end:
                raise StoresError(f"mlflow server not healthy after {timeout:.0f}s; {self.log}:\n{_tail(self.log)}")
            time.sleep(0.3)
        return self

    def healthy(self) -> bool:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        try:
            with urllib.request.urlopen(f"http://{_url_host(host)}:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's process group (its uvicorn workers too), SIGKILL what is left."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
            # After SIGTERM's graceful stop, SIGKILL takes whatever of the group (a worker) outlived the supervisor.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)


@dataclass
class Stores:
    """Both servers of one --root, and the flags that point the run commands at them."""

    root: Path
    postgres: Postgres
    mlflow: MlflowServer
    advertise: str

    @property
    def tracking_uri(self) -> str:
        return f"http://{_url_host(self.advertise)}:{self.mlflow.port}"

    @property
    def optuna_storage(self) -> str:
        return self.postgres.url("optuna", self.advertise)

    def flags(self) -> str:
        return f"--tracking-uri {self.tracking_uri} --optuna-storage {self.optuna_storage}"

    def stop(self) -> None:
        self.mlflow.stop()
        self.postgres.close()


def _auth_setup(root: Path, pg: Postgres, password: str) -> dict:
    """MLflow's basic-auth app: its users in PostgreSQL, admin `hisf` with the stores' password (kept in sync)."""
    folder = root / "mlflow"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = folder / "flask_secret_key"  # CSRF key shared by the server's workers; not a user credential
    if not key.is_file():
        key.touch(mode=0o600)
        key.write_text(secrets.token_hex(32))
    db = pg.socket_url(AUTH_DATABASE)
    ini = folder / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                   f"database_uri = {db}\nadmin_username = {PG_USER}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(db)
    # MLflow reads the admin password only when it creates the user: a changed password file updates it here.
    if store.has_user(PG_USER) and not store.authenticate_user(PG_USER, password):
        store.update_user(PG_USER, password=password)
    store.engine.dispose()
    return {"config": ini, "password": password, "secret_key": key.read_text().strip()}


@contextlib.contextmanager
def serving(root: str | Path, host: str = "127.0.0.1", port: int = 5000, pg_port: int = 5433,
            password: str | None = None, run_as: str | None = None, workers: int = 4,
            advertise: str | None = None, allowed_hosts: str | None = None, durable: bool = True) -> Iterator[Stores]:
    """Start (or reuse the cluster of) `root`'s PostgreSQL and an `mlflow server` on it; stop both on exit."""
    if not is_loopback(host) and not password:
        raise StoresError(f"--host {host} is not a loopback address: the stores would be open to the network "
                          f"without credentials; pass --password-file FILE (or set {PASSWORD_ENV}), or put them "
                          "behind a reverse proxy that authenticates and keep --host 127.0.0.1")
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for what, h, p in (("PostgreSQL", host, pg_port), ("mlflow server", host, port)):
        if not port_free(h, p):
            raise StoresError(f"{what}: port {p} on {h} is in use (pass --{'pg-' if what == 'PostgreSQL' else ''}port)")
    logs = root / "logs"
    pg = Postgres(root / "postgres", pg_port, host, postgres_account(run_as), logs / "postgres.log", password, durable)
    ml = None
    try:
        pg.start()
        auth = _auth_setup(root, pg, password) if password else None
        shown = advertise or (socket.gethostname() if host in ("0.0.0.0", "::") else host)
        ml = MlflowServer(pg.socket_url("mlflow"), root / "mlflow-artifacts", host, port, workers,
                          logs / "mlflow.log", auth, _allowed_hosts(host, shown, port, allowed_hosts)).start()
        yield Stores(root, pg, ml, shown)
    finally:
        if ml is not None:
            ml.stop()
        pg.close()


def _allowed_hosts(host: str, shown: str, port: int, extra: str | None) -> tuple[str, ...]:
    """`mlflow server --allowed-hosts`: MLflow's own defaults (localhost, private addresses) plus the name the
    printed flags use, so the clients that follow them are not refused (DNS-rebinding protection)."""
    if is_loopback(host) and not extra:
        return ()
    from mlflow.server.security_utils import get_default_allowed_hosts

    hosts = [*get_default_allowed_hosts(), _url_host(shown), f"{_url_host(shown)}:{port}"]
    hosts += [h.strip() for h in (extra or "").split(",") if h.strip()]
    return ("--allowed-hosts", ",".join(dict.fromkeys(hosts)))
