"""The command line: `python -m actors [broker flags]`, or a subcommand (worker, sql, stats, ...).

The broker itself runs here: settings are loaded (file < environment < flags), a bad one exits with
status 2 and one line naming the key, a busy port with status 1, and SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import gevent
import gevent.event

from config.settings import ConfigError, Settings, load_settings, settings_summary

CLIENT_COMMANDS = {"stats", "workers", "status", "cancel", "submit", "sql"}
QUEUE_COMMANDS = {  # actors/cli_queues.py
    "queues", "pause", "resume", "ratelimit", "purge", "tasks", "dead", "requeue", "dead-delete", "schedules",
    "schedule",
}

log = logging.getLogger("tqbroker")


def broker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m actors",
        description="tqbroker: a durable task-queue broker. Without a command, runs the broker.",
        epilog="commands: worker MODULE... (run tasks), sql QUERY, stats, workers, status ID, cancel ID, "
               "submit KIND; see `python -m actors COMMAND --help`. Every setting can also be set with "
               "TQ_<SECTION>__<KEY>, e.g. TQ_BROKER__PORT=7000.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file overriding config/default.yaml")
    parser.add_argument("--host", help="address to listen on (broker.host, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="TCP port of the protocol (broker.port, default 6379)")
    parser.add_argument("--data-dir", help="where the WAL and DuckDB live (persistence.data_dir, default ./data)")
    parser.add_argument("--log-level", help="debug, info, warning, error (monitoring.log_level)")
    return parser


def load_broker_settings(argv: list[str]) -> Settings:
    args = broker_parser().parse_args(argv)
    return load_settings(args.config, overrides={
        "broker.host": args.host, "broker.port": args.port,
        "persistence.data_dir": args.data_dir, "monitoring.log_level": args.log_level,
    })


def main(argv: list[str]) -> int:
    if argv and (argv[0] in CLIENT_COMMANDS or argv[0] in QUEUE_COMMANDS):
        from actors.cli import main as cli_main

        return cli_main(argv, offline_query=_offline_query)
    if argv and argv[0] == "worker":
        from actors.worker.runner import main as worker_main

        return worker_main(argv[1:])
    try:
        settings = load_broker_settings(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return run_broker(settings)


def run_broker(settings: Settings) -> int:
    from actors.logs import setup_logging
    from actors.system import BrokerSystem, StartupError
    from storage.errors import StorageError
    from storage.wal import WalError
    from transport.server import ListenError

    setup_logging(settings.monitoring.log_level, settings.monitoring.json_logging)
    log.debug("settings: %s", settings_summary(settings))
    system = BrokerSystem(settings)
    stop = gevent.event.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before start: recovery may take seconds
        gevent.signal_handler(signum, stop.set)
    try:
        system.start()
    except (StartupError, StorageError, WalError, ListenError, OSError) as exc:
        print(f"tqbroker: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        system.stop()
        return 1
    stop.wait()
    log.info("stopping: signal received")
    if not system.stop():
        logging.shutdown()
        os._exit(0)  # a snapshot thread is still in DuckDB: do not wait for it (the WAL holds everything)
    return 0


def _offline_query(sql: str) -> tuple[list[str], list[list[object]]]:
    """`sql` with the broker stopped: open the DuckDB file read-only in a database process of our own
    (a real thread there can be interrupted at api.query_timeout_secs; a patched one here could not)."""
    from pathlib import Path

    from actors.system import DB_FILE
    from storage.db_process import DatabaseProcess

    settings = load_settings()
    path = Path(settings.persistence.data_dir) / DB_FILE
    if not path.exists():
        raise FileNotFoundError(f"no history database at {path} (persistence.data_dir)")
    db = DatabaseProcess(path, read_only=True)
    try:
        return db.history.query(sql, timeout=settings.api.query_timeout_secs)
    finally:
        db.close()
