"""Wires the broker: storage, recovery, the actors, the TCP server; and takes it down in order.

Start: open DuckDB and recover (snapshot + WAL replay), open a new WAL segment, start the registry,
queue, lease watcher and compactor actors, then listen. Stop (SIGTERM/SIGINT): stop accepting, let the
queue actor answer waiting claims with an empty ASSIGNED and refuse new work, write a final snapshot,
close the WAL and DuckDB, stop every actor.
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

from actors.compactor import CompactorActor, TakeSnapshot
from actors.connection import serve_connection
from actors.context import ApiKeys, BrokerContext
from actors.envelopes import Shutdown
from actors.history_link import HistoryLink
from actors.lease_watcher import LeaseWatcherActor
from actors.metrics import BrokerMetrics, health_app
from actors.queue import WAL_HEADROOM_BYTES, QueueActor, writable_error
from actors.registry import UseQueue, WorkerRegistryActor
from config.settings import Settings
from storage.db_process import DatabaseProcess, HistoryClient
from storage.recovery import recover
from storage.wal import WriteAheadLog
from transport.server import ListenError, TcpServer

log = logging.getLogger("tqbroker")

DB_FILE = "tqbroker.duckdb"
REPLAY_SNAPSHOT_THRESHOLD = 10_000  # WAL records replayed at start-up that call for a snapshot at once
FINAL_SNAPSHOT_TIMEOUT_S = 10.0  # a million tasks take ~4-5 s; past this the stop goes on (the WAL has it all)


class StartupError(Exception):
    """The broker cannot start; the message names the path or setting and what to do."""


def prepare_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create data dir {data_dir}: {exc.strerror or exc}") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise StartupError(f"data dir {data_dir} is not writable by this user (persistence.data_dir)")


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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.persistence.data_dir).resolve()
        self.started_at = time.time()
        self.ready = False
        self.db: DatabaseProcess | None = None
        self.wal: WriteAheadLog | None = None
        self.history: HistoryClient | None = None
        self.server: TcpServer | None = None
        self.queue: Any = None
        self.registry: Any = None
        self.compactor: Any = None
        self.lease_watcher: Any = None
        self.metrics = BrokerMetrics()
        self.http: WSGIServer | None = None

    def start(self) -> None:
        s = self.settings
        prepare_data_dir(self.data_dir)
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
        state = recover(self.data_dir, snapshots)
        history_link = HistoryLink(self.history)
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
        server = self.server
        self.metrics.connections.set_function(lambda: server.connections)
        self.ready = True
        log.info("tqbroker listening on %s:%d, data dir %s", s.broker.host, self.server.port, self.data_dir,
                 extra={"host": s.broker.host, "port": self.server.port, "data_dir": str(self.data_dir)})

    def _start_http(self) -> None:
        """/metrics, /healthz and /readyz on monitoring.prometheus_port (0 turns them off)."""
        m = self.settings.monitoring
        if m.prometheus_port == 0:
            return
        self.http = WSGIServer((m.prometheus_host, m.prometheus_port), health_app(self.metrics, self.readiness),
                               log=None, error_log=logging.getLogger("tqbroker.http"))
        try:
            self.http.start()
        except OSError as exc:
            self.http = None
            raise ListenError(f"cannot serve metrics on {m.prometheus_host}:{m.prometheus_port}: "
                              f"{exc.strerror or exc} (monitoring.prometheus_port; 0 turns it off)") from None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready = listening, recovered, and the WAL writable (not out of disk)."""
        wal = self.wal
        wal_ok = wal is not None and wal.healthy
        details: dict[str, Any] = {"listening": self.ready, "recovered": self.ready, "wal_writable": wal_ok}
        if wal is not None and not wal_ok:
            details["error"] = writable_error(wal)
        elif wal is not None and wal.free_bytes() < WAL_HEADROOM_BYTES:
            wal_ok = details["wal_writable"] = False
            details["error"] = f"disk full: {wal.directory} has {wal.free_bytes()} bytes free"
        return self.ready and wal_ok, details

    def _run_query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        assert self.history is not None
        return self.history.query(sql, timeout=self.settings.api.query_timeout_secs)

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
        clean = True
        try:
            if self.queue is not None:
                self.queue.ask(Shutdown(), timeout=2.0)
            if self.compactor is not None:
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
        log.info("tqbroker stopped")
        return clean
