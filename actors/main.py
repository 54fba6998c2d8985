"""The command line: `tqbroker [broker flags]` (also `python -m actors`), or a command (worker, sql, ...).

The broker itself runs here: settings are loaded (file < environment < flags), a bad one exits with
status 2 and one line naming the key, a busy port with status 1, and SIGTERM/SIGINT stop it cleanly
(status 0). A crash of an essential actor stops it without a final snapshot, with status 70
(EX_SOFTWARE), so a supervisor restarts it and the restart replays the WAL.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from config.settings import ConfigError, Settings, load_settings, settings_summary

WORKER_HELP = "run the @task functions of Python modules, claiming their tasks from the broker"
EXIT_SOFTWARE = 70  # an essential actor crashed (sysexits.h EX_SOFTWARE)
CRASH_STOP_DEADLINE_S = 15.0  # after a crash the bounded stop gets this long, then the process just exits

log = logging.getLogger("tqbroker")


def command_lines() -> list[tuple[str, str]]:
    """Every command with its one-line help, in the order `tqbroker --help` lists them."""
    from actors.cli import all_commands

    return [("worker", WORKER_HELP), *((name, command.help) for name, command in all_commands().items())]


def broker_parser() -> argparse.ArgumentParser:
    lines = command_lines()
    width = max(len(name) for name, _ in lines)
    parser = argparse.ArgumentParser(
        prog="tqbroker",
        usage="tqbroker [broker flags]\n       tqbroker COMMAND [arguments]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="tqbroker: a durable task-queue broker. Without a command, runs the broker.",
        epilog="commands:\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in lines)
               + "\n\nSee `tqbroker COMMAND --help`. Every setting can also be set with TQ_<SECTION>__<KEY>,"
                 "\ne.g. TQ_BROKER__PORT=7000. `python -m actors` is the same program.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file overriding config/default.yaml")
    parser.add_argument("--host", help="address to listen on (broker.host, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="TCP port of the protocol (broker.port, default 6379)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where the WAL and DuckDB live (persistence.data_dir, default ./data)")
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error (monitoring.log_level)")
    parser.add_argument("--accept-wal-damage", action="store_true",
                        help="if a WAL segment is damaged (not a torn tail), move it and every later segment to "
                             "DATA_DIR/wal/damaged-<time>/ and start from the records before the damage; changes "
                             "after it may be lost (logged at ERROR). Without it such a start stops, exit status 1")
    return parser


def load_broker_settings(argv: list[str]) -> Settings:
    return _settings_from(broker_parser().parse_args(argv))


def _settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, overrides={
        "broker.host": args.host, "broker.port": args.port,
        "persistence.data_dir": args.data_dir, "monitoring.log_level": args.log_level,
    })


def main(argv: list[str]) -> int:
    """Run the broker, or the command named by argv[0]; the exit status (2: bad usage)."""
    if argv and argv[0] == "worker":
        from actors.worker.runner import main as worker_main

        return worker_main(argv[1:])
    if argv and not argv[0].startswith("-"):
        from actors.cli import all_commands, unknown_command
        from actors.cli import main as cli_main

        if argv[0] in all_commands():
            return cli_main(argv, offline_query=_offline_query)
        print(f"tqbroker: {unknown_command(argv[0], [name for name, _ in command_lines()])}", file=sys.stderr)
        return 2
    args = broker_parser().parse_args(argv)
    try:
        settings = _settings_from(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return run_broker(settings, accept_wal_damage=args.accept_wal_damage)


def run_broker(settings: Settings, *, accept_wal_damage: bool = False) -> int:
    import gevent  # here, not at the top: the operator commands import this module and never need gevent
    import gevent.event

    from actors.logs import setup_logging
    from actors.system import BrokerSystem, StartupError, remove_empty_dirs
    from storage.errors import StorageError
    from storage.wal import WalError
    from transport.server import ListenError

    setup_logging(settings.monitoring.log_level, settings.monitoring.json_logging)
    log.debug("settings: %s", settings_summary(settings))
    system = BrokerSystem(settings, accept_wal_damage=accept_wal_damage)
    stop = gevent.event.Event()
    system.on_fatal = stop.set
    for signum in (signal.SIGTERM, signal.SIGINT):  # before start: recovery may take seconds
        gevent.signal_handler(signum, stop.set)
    try:
        system.start()
    except (StartupError, StorageError, WalError, ListenError, OSError) as exc:
        print(f"tqbroker: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        system.stop()
        remove_empty_dirs(system.created_dirs)
        return 1
    stop.wait()
    if system.failure is not None:
        return _stop_after_crash(system)
    log.info("stopping: signal received")
    clean = system.stop()
    status = EXIT_SOFTWARE if system.failure is not None else 0  # an actor may crash during the stop itself
    if not clean:
        logging.shutdown()
        os._exit(status)  # a snapshot thread is still in DuckDB: do not wait for it (the WAL holds everything)
    return status


def _stop_after_crash(system: Any) -> int:
    """The bounded stop after an essential actor crashed: no final snapshot, exit status 70."""
    import gevent  # local, like run_broker's: the operator commands import this module without gevent

    log.warning("stopping after an internal error, without a final snapshot (the next start replays the WAL); "
                "exit status %d", EXIT_SOFTWARE)
    gevent.spawn_later(CRASH_STOP_DEADLINE_S, os._exit, EXIT_SOFTWARE)
    system.stop()
    logging.shutdown()
    return EXIT_SOFTWARE


def _offline_query(sql: str, data_dir: str | None = None) -> Any:
    """`sql` with the broker stopped: open the DuckDB file of `data_dir` (default persistence.data_dir)
    read-only in a database process of our own (a real thread there can be interrupted at
    api.query_timeout_secs; a patched one here could not)."""
    from pathlib import Path

    from actors.system import DB_FILE, QUERY_REPLY_HEADROOM
    from storage.db_process import DatabaseProcess

    settings = load_settings(overrides={"persistence.data_dir": data_dir})
    path = Path(settings.persistence.data_dir).absolute() / DB_FILE
    if not path.exists():
        raise FileNotFoundError(f"no history database at {path}; pass --data-dir DIR (or set "
                                "TQ_PERSISTENCE__DATA_DIR) to the broker's data directory")
    db = DatabaseProcess(path, read_only=True)
    try:
        return db.history.query_result(sql, settings.api.query_timeout_secs,
                                       settings.broker.max_frame_bytes - QUERY_REPLY_HEADROOM)
    finally:
        db.close()
