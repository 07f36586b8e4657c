"""A shared MLflow tracking server: runs in PostgreSQL, artifacts in a local folder.

    python -m stages.server [--dir .mlflow-server] [--host 127.0.0.1] [--port 5000] [--pg-port N]

starts a private PostgreSQL cluster in <dir>/postgres (made on first use, superuser `mlflow`, trust
authentication for local connections only), then `mlflow server` on it, storing artifacts in
<dir>/artifacts, and runs until Ctrl-C or SIGTERM, which stop both cleanly. Point the pipeline at it
with `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000`. Logs go to <dir>/mlflow.log and
<dir>/postgres.log. Tests use the same thing through `serve(folder)`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import UserError, run_stage

ROOT = Path(__file__).resolve().parents[1]
SUPERUSER = "mlflow"
DATABASE = "mlflow"
START_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0
# Where Debian's postgresql-NN packages put their programs, one folder per major version.
DEBIAN_POSTGRES = Path("/usr/lib/postgresql")


def postgres_bin() -> Path:
    """The folder holding initdb and postgres: Debian's newest, else the one on PATH."""
    debian = sorted(
        DEBIAN_POSTGRES.glob("*/bin/initdb"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    found = debian[-1] if debian else shutil.which("initdb")
    if not found:
        raise UserError(
            "PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): "
            "install it, e.g. `apt-get install postgresql`"
        )
    return Path(found).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    with socket.socket() as probe:
        # As the servers themselves do, so a port left in TIME_WAIT by a stopped server counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"{what} cannot listen on {host}:{port} ({error.strerror}): free it or pass another {option}")


def allowed_hosts() -> list[str]:
    """The Host headers the MLflow server answers: MLflow's defaults and this machine's names."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = sorted({socket.gethostname(), socket.getfqdn()} - {""})
    return [*get_default_allowed_hosts(), *names, *(f"{name}:*" for name in names)]


def client_uri(host: str, port: int) -> str:
    """The tracking URI clients use: on every interface (0.0.0.0, ::), this machine's name, which
    other machines can reach and the server allows (http://0.0.0.0:5000 works on this machine only)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn() or socket.gethostname()
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return f"({path} is empty)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def as_postgres_user() -> dict[str, Any]:
    """Popen arguments that run a PostgreSQL program as `postgres` when we are root.

    PostgreSQL refuses to run as root, so a root user's cluster belongs to the `postgres` user.
    """
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise UserError(
            "PostgreSQL refuses to run as root and there is no `postgres` user to run it as: "
            "create one (`useradd --system postgres`) or start the server as another user"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def stop_process(process: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process and wait; kill its whole session's group if it lingers."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # A child that outlived its parent (uvicorn, if `mlflow server` died first) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@dataclass
class Server:
    """One MLflow server on one PostgreSQL cluster, both kept in `folder`."""

    folder: Path
    host: str = "127.0.0.1"
    port: int = 5000
    postgres_port: int = 0
    _postgres: subprocess.Popen | None = field(default=None, repr=False)
    _mlflow: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def postgres_uri(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.postgres_port}/{DATABASE}"

    @property
    def backend_store_uri(self) -> str:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver we install is psycopg2.
        return self.postgres_uri.replace("postgresql://", "postgresql+psycopg2://", 1)

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    @property
    def data(self) -> Path:
        return self.folder / "postgres"

    @property
    def sockets(self) -> Path:
        return self.folder / "socket"

    def start_postgres(self) -> None:
        """Start PostgreSQL (making the cluster on first use) and create the `mlflow` database."""
        bin_folder = postgres_bin()
        run_as = as_postgres_user()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if run_as:
            os.chown(self.sockets, run_as["user"], run_as["group"])
        if not (self.data / "PG_VERSION").exists():
            # A folder without PG_VERSION is an initdb that was cut short: start again.
            shutil.rmtree(self.data, ignore_errors=True)
            self.init_cluster(bin_folder, run_as)
        self.postgres_port = self.postgres_port or free_port()
        check_port_free("127.0.0.1", self.postgres_port, "PostgreSQL", "--pg-port")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": self.postgres_port,
            "unix_socket_directories": self.sockets,
        }
        command = [str(bin_folder / "postgres"), "-D", str(self.data)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        log = self.folder / "postgres.log"
        with open(log, "a") as out:
            # Its own session, so a Ctrl-C meant for us reaches it only through stop_postgres.
            self._postgres = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True, **run_as
            )
        self.wait_until(self.create_database, self._postgres, "PostgreSQL", log)

    def init_cluster(self, bin_folder: Path, run_as: dict[str, Any]) -> None:
        self.data.mkdir(mode=0o700, exist_ok=True)
        if run_as:
            os.chown(self.data, run_as["user"], run_as["group"])
            if subprocess.run(["test", "-w", str(self.data)], check=False, **run_as).returncode != 0:
                raise UserError(
                    f"PostgreSQL runs as the `postgres` user, which cannot reach {self.data}: "
                    "let it through every parent folder (chmod o+x) or pass another --dir"
                )
        command = [str(bin_folder / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-E", "UTF8", "--locale=C"]
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=self.folder, **run_as)
        if result.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)
            raise UserError(f"initdb failed in {self.data}:\n{result.stdout}{result.stderr}")
        # Trust, but only for this machine: the Unix socket and 127.0.0.1 (which is all it listens on).
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )

    def create_database(self) -> bool:
        """Create the `mlflow` database if missing; False while PostgreSQL is not yet accepting."""
        import psycopg2

        try:
            connection = psycopg2.connect(
                host="127.0.0.1", port=self.postgres_port, user=SUPERUSER, dbname="postgres", connect_timeout=5
            )
        except psycopg2.OperationalError:
            return False
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            connection.close()
        return True

    def start_mlflow(self) -> None:
        """Start `mlflow server` on the running PostgreSQL and wait until it answers /health."""
        check_port_free(self.host, self.port, "The MLflow server", "--port")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            # Clients send artifacts to the server, which keeps them here: they need no access to the folder.
            "--serve-artifacts", "--artifacts-destination", str(self.artifacts.resolve()),
            "--host", self.host, "--port", str(self.port),
            # One worker is plenty for a team's training runs, and starts and stops quickest.
            "--workers", "1",
        ]  # fmt: skip
        # The job runner serves MLflow's GenAI jobs (judges, prompt optimisation), which image
        # classifiers never use; without it there is one process fewer to start and stop.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # A client naming this machine (http://gpu-box:5000) is let through MLflow's guard against DNS
        # rebinding, which otherwise answers 403 to any name but localhost's and private addresses.
        # MLFLOW_SERVER_ALLOWED_HOSTS, if set (a proxy's name), is MLflow's own list and is kept.
        env.setdefault("MLFLOW_SERVER_ALLOWED_HOSTS", ",".join(allowed_hosts()))
        log = self.folder / "mlflow.log"
        with open(log, "a") as out:
            self._mlflow = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.wait_until(self.healthy, self._mlflow, "The MLflow server", log)

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.uri}/health", timeout=5).ok
        except requests.RequestException:
            return False

    def wait_until(self, ready: Any, process: subprocess.Popen, what: str, log: Path) -> None:
        """Poll `ready()` until it is true; if `process` dies or time runs out, say why from its log."""
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if process.poll() is not None:
                raise UserError(f"{what} stopped (exit status {process.returncode}); last lines of {log}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                stop_process(process, signal.SIGTERM)
                raise UserError(f"{what} did not start within {START_TIMEOUT:.0f} s; last lines of {log}:\n{log_tail(log)}")
            time.sleep(0.2)

    def stop_mlflow(self) -> None:
        if self._mlflow is not None:
            stop_process(self._mlflow, signal.SIGTERM)
            self._mlflow = None

    def stop_postgres(self) -> None:
        if self._postgres is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: it ends open sessions, then checkpoints.
            stop_process(self._postgres, signal.SIGINT)
            self._postgres = None

    def wait(self) -> None:
        """Block while the MLflow server runs; if it stops by itself, say so."""
        assert self._mlflow is not None, "start_mlflow() first"
        status = self._mlflow.wait()
        raise UserError(f"the MLflow server stopped by itself (exit status {status}); see {self.folder / 'mlflow.log'}")


@contextlib.contextmanager
def serve(
    folder: Path, port: int | None = None, host: str = "127.0.0.1", postgres_port: int | None = None
) -> Iterator[Server]:
    """PostgreSQL and an MLflow server kept in `folder`, on `port` (a free one if None), until exit."""
    server = Server(Path(folder).resolve(), host, port or free_port(host), postgres_port or 0)
    # A busy port is found before PostgreSQL is started for nothing.
    check_port_free(server.host, server.port, "The MLflow server", "--port")
    try:
        server.start_postgres()
        server.start_mlflow()
        yield server
    finally:
        server.stop_mlflow()
        server.stop_postgres()


def interrupt(signum: int, frame: Any) -> None:
    """Turn SIGTERM (like Ctrl-C) into KeyboardInterrupt once; further signals wait for the clean stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=ROOT / ".mlflow-server", help="where the database, artifacts and logs live")
    parser.add_argument("--host", default="127.0.0.1", help="interface the MLflow server listens on")
    parser.add_argument("--port", type=int, default=5000, help="MLflow server port")
    parser.add_argument("--pg-port", type=int, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        with serve(args.dir, args.port, args.host, args.pg_port) as server:
            print(
                f"MLflow server at {server.uri} (PostgreSQL at {server.postgres_uri}, artifacts in {server.artifacts}); "
                f"export MLFLOW_TRACKING_URI={client_uri(args.host, args.port)}",
                flush=True,
            )
            server.wait()
    except KeyboardInterrupt:
        print("MLflow server and PostgreSQL stopped", flush=True)


if __name__ == "__main__":
    run_stage(main)
