"""Wires the broker: storage, recovery, the actors, the TCP server; and takes it down in order.

Start: open DuckDB and recover (snapshot + WAL replay), open a new WAL segment, start the registry,
queue, lease watcher and compactor actors, then listen. Stop (SIGTERM/SIGINT): stop accepting, let the
queue actor answer waiting claims with an empty ASSIGNED and refuse new work, write a final snapshot,
close the WAL and DuckDB, stop every actor. After an essential actor crashed (`actors.hub_actor`) the
broker is not ready at once and the same stop runs without the final snapshot.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

import pykka
from gevent.pywsgi import WSGIServer

from actors.compactor import CompactorActor
from actors.context import ApiKeys, BrokerContext
from actors.envelopes import Shutdown, TakeSnapshot, UseQueue
from actors.history_link import HistoryLink
from actors.http_guard import http_guard, remote_policy
from actors.hub_actor import set_crash_listener
from actors.lease_watcher import LeaseWatcherActor
from actors.metrics import BrokerMetrics, health_app
from actors.queue import WAL_HEADROOM_BYTES, QueueActor, writable_error
from actors.reader import return_large_buffers_to_the_os, serve_connection
from actors.registry import WorkerRegistryActor
from config.settings import Settings
from storage.db_process import DatabaseProcess, HistoryClient
from storage.recovery import recover
from storage.wal import WriteAheadLog
from transport.server import ListenError, TcpServer

log = logging.getLogger("tqbroker")

DB_FILE = "tqbroker.duckdb"
QUERY_REPLY_HEADROOM = 64 * 1024  # frame bytes of a ROWS reply beyond its rows and columns (id, keys, slack)
REPLAY_SNAPSHOT_THRESHOLD = 10_000  # WAL records replayed at start-up that call for a snapshot at once
FINAL_SNAPSHOT_TIMEOUT_S = 10.0  # a million tasks take ~4-5 s; past this the stop goes on (the WAL has it all)


class StartupError(Exception):
    """The broker cannot start; the message names the path or setting and what to do."""


def prepare_data_dir(data_dir: Path) -> list[Path]:
    """Creates `data_dir` and its missing parents; returns the directories it created, deepest first."""
    created = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create data dir {data_dir}: {exc.strerror or exc}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise StartupError(f"data dir {data_dir} is not writable by this user (persistence.data_dir)")
    return created


def remove_empty_dirs(created: list[Path]) -> None:
    """Removes the directories in `created` (deepest first) while they are empty; stops at the first that
    is not, so nothing a start wrote is ever deleted."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context when api.enable_tls is on; a missing or unreadable file stops the start."""
    api = settings.api
    if not api.enable_tls:
        return None
    for key, path in (("api.tls_cert_path", api.tls_cert_path), ("api.tls_key_path", api.tls_key_path)):
        if not path or not os.access(path, os.R_OK):
            raise StartupError(f"TLS is on but {key} ({path}) is missing or unreadable")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(api.tls_cert_path, api.tls_key_path)  # type: ignore[arg-type]
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"cannot load TLS certificate {api.tls_cert_path} / key {api.tls_key_path}: {exc}") from None
    return context


class BrokerSystem:
    def __init__(self, settings: Settings, *, accept_wal_damage: bool = False) -> None:
        self.settings = settings
        self.accept_wal_damage = accept_wal_damage  # --accept-wal-damage: see storage.wal_damage
        self.data_dir = Path(settings.persistence.data_dir).resolve()
        self.started_at = time.time()
        self.ready = False
        self.failure: str | None = None  # why an essential actor crashed: the broker must stop
        self.on_fatal: Any = None  # called (no arguments) once an essential actor crashed
        self.db: DatabaseProcess | None = None
        self.wal: WriteAheadLog | None = None
        self.history: HistoryClient | None = None
        self.server: TcpServer | None = None
        self.queue: Any = None
        self.registry: Any = None
        self.compactor: Any = None
        self.lease_watcher: Any = None
        self.metrics = BrokerMetrics(settings.monitoring.max_queue_labels)
        self.http: WSGIServer | None = None
        self.created_dirs: list[Path] = []  # by this start: a failed start removes them while empty
        self.rest: WSGIServer | None = None

    def start(self) -> None:
        s = self.settings
        self.created_dirs = prepare_data_dir(self.data_dir)
        return_large_buffers_to_the_os()  # RSS falls back once big frames are gone (frame budget)
        ctx = BrokerContext(settings=s, queue=None, registry=None, server=None,
                            keys=ApiKeys(s.auth.api_keys), run_query=self._run_query, metrics=self.metrics)
        self.server = TcpServer(s.broker.host, s.broker.port, partial(serve_connection, ctx),
                                s.broker.max_connections, ssl_context=tls_context(s),
                                handshake_timeout_s=s.broker.connection_timeout_secs)
        ctx.server = self.server
        self.server.bind()
        self._start_http()
        self.db = DatabaseProcess(self.data_dir / DB_FILE)
        self.history = self.db.history
        snapshots = self.db.snapshots
        state = recover(self.data_dir, snapshots, accept_wal_damage=self.accept_wal_damage)
        history_link = HistoryLink(self.history, lookup_timeout_s=s.api.query_timeout_secs)
        if state.finished:
            try:
                self.history.append_dedup(state.finished)
            except Exception as exc:  # keep them: the history writer retries (without the dedup)
                log.error("writing %d recovered finished tasks to history failed: %s", len(state.finished), exc)
                for task in state.finished:
                    history_link.add(task)
        p = s.persistence
        self.wal = WriteAheadLog(self.data_dir / "wal", fsync=p.fsync, sync_interval_ms=p.wal_sync_interval_ms,
                                 segment_bytes=p.wal_segment_bytes)
        self.wal.open(state.next_segment)
        self.wal.on_fsync = self.metrics.wal_fsync.observe

        set_crash_listener(self._essential_crashed)
        self.registry = WorkerRegistryActor.start(
            s.worker.heartbeat_interval_secs,
            min(s.broker.maintenance_interval_secs, s.worker.heartbeat_interval_secs), self.metrics,
        )
        self.queue = QueueActor.start(s, wal=self.wal, history=history_link,
                                      recovered=(state.tasks, state.counters), registry=self.registry,
                                      metrics=self.metrics, ops_state=state.ops)
        self.registry.tell(UseQueue(self.queue))
        self.lease_watcher = LeaseWatcherActor.start(self.queue, s.broker.lease_check_interval_secs)
        self.compactor = CompactorActor.start(self.queue, snapshots, self.history, p)
        if state.replayed_records >= REPLAY_SNAPSHOT_THRESHOLD:  # a crash loop must not grow the WAL forever
            self.compactor.tell(TakeSnapshot())
        ctx.queue, ctx.registry = self.queue, self.registry
        self.server.serve()
        self._start_rest(ctx)
        server = self.server
        self.metrics.connections.set_function(lambda: server.connections)
        self.metrics.frame_budget_reserved.set_function(lambda: ctx.budget.reserved)
        self.ready = True
        log.info("tqbroker listening on %s:%d, data dir %s", s.broker.host, self.server.port, self.data_dir,
                 extra={"host": s.broker.host, "port": self.server.port, "data_dir": str(self.data_dir)})

    def _start_http(self) -> None:
        """/metrics, /healthz and /readyz on monitoring.prometheus_port (0 turns them off)."""
        m = self.settings.monitoring
        if m.prometheus_port == 0:
            return
        auth = self.settings.auth
        app = health_app(self.metrics, self.readiness, http_guard(auth, ApiKeys(auth.api_keys)))
        self.http = WSGIServer((m.prometheus_host, m.prometheus_port), app, log=None,
                               error_log=logging.getLogger("tqbroker.http"))
        try:
            self.http.start()
        except OSError as exc:
            self.http = None
            raise ListenError(f"cannot serve metrics on {m.prometheus_host}:{m.prometheus_port}: "
                              f"{exc.strerror or exc} (monitoring.prometheus_port; 0 turns it off)") from None
        log.info("metrics and health on http://%s:%d (/metrics, /healthz, /readyz); %s", m.prometheus_host,
                 self.http.server_port, remote_policy(auth))

    def _essential_crashed(self, reason: str) -> None:
        """An essential actor crashed (it logged why): not ready from now on, and the process must stop."""
        if self.failure is None:
            self.failure = reason
            self.ready = False
            if self.on_fatal is not None:
                self.on_fatal()

    def _start_rest(self, ctx: BrokerContext) -> None:
        """The REST API and dashboard on api.rest_port (0 turns them off), TLS as api.enable_tls says."""
        api = self.settings.api
        if api.rest_port == 0:
            return
        from actors.http.app import start_server  # Falcon and Jinja2 load only when the API is on
        try:
            self.rest = start_server(ctx, self._run_query, tls_context(self.settings))
        except OSError as exc:
            raise ListenError(f"cannot serve the REST API on {api.rest_host}:{api.rest_port}: "
                              f"{exc.strerror or exc} (api.rest_port; 0 turns it off)") from None
        log.info("REST API and dashboard on %s:%d", api.rest_host, self.rest.server_port,
                 extra={"host": api.rest_host, "port": self.rest.server_port})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = listening, recovered, no actor crashed, and the WAL writable (not out of disk)."""
        if self.failure is not None:
            return False, {"listening": False, "recovered": self.ready, "wal_writable": False,
                           "error": f"stopping after an internal error: {self.failure}"}
        wal = self.wal
        wal_ok = wal is not None and wal.healthy
        details: dict[str, Any] = {"listening": self.ready, "recovered": self.ready, "wal_writable": wal_ok}
        if wal is not None and not wal_ok:
            details["error"] = writable_error(wal)
        elif wal is not None and wal.free_bytes() < WAL_HEADROOM_BYTES:
            wal_ok = details["wal_writable"] = False
            details["error"] = f"disk full: {wal.directory} has {wal.free_bytes()} bytes free"
        return self.ready and wal_ok, details

    def _run_query(self, sql: str) -> Any:
        """A QueryResult whose rows fit one reply frame (QUERY_REPLY_HEADROOM left for the rest)."""
        assert self.history is not None
        return self.history.query_result(sql, self.settings.api.query_timeout_secs,
                                         self.settings.broker.max_frame_bytes - QUERY_REPLY_HEADROOM)

    def stop(self) -> bool:
        """Graceful stop; every step is bounded so the process exits within a few seconds.

        Returns False when something was left running (a final snapshot still being written): the
        caller should then exit the process without waiting for it; the WAL has every change.
        """
        self.ready = False
        if self.server is not None:
            self.server.stop_accepting()
        if self.http is not None:
            self.http.stop(timeout=1)
        if self.rest is not None:
            self.rest.stop(timeout=1)
        clean = True
        try:
            if self.queue is not None:
                self.queue.ask(Shutdown(), timeout=2.0)
            if self.compactor is not None and self.failure is None:  # never a snapshot of crashed memory
                self.compactor.proxy().snapshot().get(timeout=FINAL_SNAPSHOT_TIMEOUT_S)
        except Exception as exc:  # a failed final snapshot loses nothing: the WAL still has it all
            log.warning("final snapshot not finished (%s); the next start replays the WAL instead",
                        type(exc).__name__)
            clean = False
        try:
            pykka.ActorRegistry.stop_all(block=True, timeout=2.0)
        except pykka.Timeout:
            log.warning("some actors did not stop within 2 s")
            clean = False
        if self.wal is not None:
            self.wal.close()
        if self.db is not None and clean:
            self.db.close()
        set_crash_listener(None)
        log.info("tqbroker stopped")
        return clean
