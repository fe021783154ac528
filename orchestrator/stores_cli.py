"""`hisf-bench stores serve`: the command line of orchestrator.stores (flags, password, signals, what it prints)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from orchestrator.stores import MIN_PASSWORD, PASSWORD_ENV, PG_USER, Stores, StoresError, serving


def read_password(password_file: str | None) -> str | None:
    if password_file:
        try:
            password = Path(password_file).read_text().strip("\r\n")
        except OSError as e:
            raise StoresError(f"--password-file {password_file}: {e.strerror}") from None
        source = f"--password-file {password_file}"
    elif os.environ.get(PASSWORD_ENV):
        password, source = os.environ[PASSWORD_ENV], PASSWORD_ENV
    else:
        return None
    if len(password) < MIN_PASSWORD:
        raise StoresError(f"{source}: the password must be at least {MIN_PASSWORD} characters "
                          "(MLflow's basic-auth app refuses shorter ones)")
    return password


class _Stop(Exception):
    pass


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="hisf-bench stores", description=(
        "Serve the stores a cluster sweep needs from a head node: PostgreSQL (MLflow's backend and Optuna's "
        "storage) and an `mlflow server` on it. Prints the --tracking-uri and --optuna-storage flags to pass "
        "to `hisf-bench run`, `status` and `report`; Ctrl-C stops both servers."))
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start (or reuse) the stores in --root and serve them until Ctrl-C")
    s.add_argument("--root", required=True, help="folder of the stores: PostgreSQL's cluster, MLflow's artifacts, logs")
    s.add_argument("--host", default=None, help="interface both servers bind (default 127.0.0.1: this machine "
                                                "only; another address needs --password-file)")
    s.add_argument("--port", type=int, default=None, help="mlflow server port (default 5000)")
    s.add_argument("--pg-port", type=int, default=None, help="PostgreSQL port (default 5433: 5432 is often a system one)")
    s.add_argument("--password-file", default=None,
                   help=f"file holding the password (>= {MIN_PASSWORD} chars) of user `{PG_USER}` for both servers "
                        f"(or set {PASSWORD_ENV}); turns on scram-sha-256 and MLflow's basic auth")
    s.add_argument("--advertise", default=None, help="host name the printed flags use (default: --host, or this "
                                                     "machine's name when binding 0.0.0.0)")
    s.add_argument("--run-as", default=None, help="as root: the unprivileged user PostgreSQL runs as (default postgres)")
    s.add_argument("--workers", type=int, default=4, help="mlflow server worker processes (default 4)")
    s.add_argument("--allowed-hosts", default=None, help="more Host names clients may reach the mlflow server by "
                                                         "(`mlflow server --allowed-hosts`; localhost, private "
                                                         "addresses and the --advertise name are always allowed)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    state_file = root / "stores.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    # A reused root keeps its ports, so the flags printed the first time stay valid; the interface is never
    # remembered: binding beyond loopback is said each time.
    host = args.host or "127.0.0.1"
    port = args.port or state.get("port", 5000)
    pg_port = args.pg_port or state.get("pg_port", 5433)

    def stop(signum, frame):
        # Once: a second Ctrl-C must not interrupt the orderly stop of both servers.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        password = read_password(args.password_file)
        reused = (root / "postgres" / "PG_VERSION").is_file()
        with serving(root, host, port, pg_port, password, args.run_as, args.workers, args.advertise,
                     args.allowed_hosts) as st:
            state_file.write_text(json.dumps({"port": port, "pg_port": pg_port}))
            _print_served(st, reused, bool(password))
            while st.postgres.running and st.mlflow.running:
                time.sleep(0.5)
            # Reached only when a server died on its own: the finally of serving() stops the other.
            dead = "PostgreSQL" if not st.postgres.running else "mlflow server"
            print(f"stores: {dead} exited; stopping. Logs: {root / 'logs'}", file=sys.stderr)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 1
    except _Stop:
        print("stores: stopped (PostgreSQL and mlflow server are down)", flush=True)
        return 0
    except StoresError as e:
        print(f"hisf-bench stores: {e}", file=sys.stderr)
        return 2


def _print_served(st: Stores, reused: bool, auth: bool) -> None:
    print(f"stores in {st.root} ({'reused' if reused else 'new'}): PostgreSQL on {st.postgres.listen}:"
          f"{st.postgres.port}, mlflow server on {st.mlflow.url} (UI there too); logs in {st.root / 'logs'}")
    print("pass these to hisf-bench run, sweep, search, final, status and report:")
    print(f"  {st.flags()}")
    if auth:
        print(f"clients authenticate as user `{PG_USER}` with the stores' password (never printed): on every machine "
              "that runs the driver or trials, ~/.pgpass and ~/.mlflow/credentials, or PGPASSWORD and "
              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (orchestrator/README.md, On a cluster)")
    print("Ctrl-C stops both.", flush=True)
