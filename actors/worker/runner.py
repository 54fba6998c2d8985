"""`tqbroker worker MODULE [MODULE...]`: the worker process.

It imports the task modules, serves every `@task` they define, and runs as Pykka actors on gevent (the
monkey patching already applied by `actors/__main__.py`): a LinkActor owning the two connections, a
ClaimerActor long-polling CLAIM, an ExecutorActor running tasks on real threads or processes, a
HeartbeatActor and a ReporterActor (see `link.py` and `roles.py`).

Shutdown: the first SIGTERM/SIGINT stops claiming, lets running tasks finish for up to
`worker.graceful_shutdown_timeout_secs`, delivers their results, DEREGISTERs (the broker returns any
unfinished task to pending without counting the attempt) and exits 0. A second signal exits at once
with status 1, still trying DEREGISTER first. Exit status 2: bad arguments, settings or task modules.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.event
import pykka

from actors.worker.heartbeat import HeartbeatActor
from actors.worker.link import DeregisterNow, LinkActor, Listen, Registration, Stopping
from actors.worker.messages import RunningTasks, Stop, UndeliveredCount, WhenDone
from actors.worker.pool import Backend, ProcessBackend, ThreadBackend, terminate_children
from actors.worker.roles import ClaimerActor, ExecutorActor, ReporterActor
from actors.worker.sdk import cron_schedules, registered_tasks
from config.settings import ConfigError, Settings, load_settings
from transport.client_settings import ClientSettings, ClientSettingsError
from transport.messages import MAX_QUEUE_NAME, QUEUE_NAME_PATTERN

log = logging.getLogger("tqbroker.worker")

CLAIM_WAIT_MS = 5000
FORCED_DEREGISTER_TIMEOUT_S = 1.0
QUEUE_NAME = re.compile(QUEUE_NAME_PATTERN)


class UsageError(Exception):
    """Bad arguments, settings or task modules: one line for stderr, exit status 2."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tqbroker worker",
        description="Run the @task functions of the given modules, claiming them from the broker.",
        epilog="Settings come from config/default.yaml, --config, TQ_<SECTION>__<KEY> variables (worker.*, "
               "broker.host/port) and these flags; the API key from --api-key or TQ_API_KEY.",
    )
    p.add_argument("modules", nargs="+", metavar="MODULE",
                   help="importable module(s) defining @task functions")
    p.add_argument("--queues", help="comma-separated queues to claim from (default: the queues of the tasks)")
    p.add_argument("--concurrency", type=int, help="tasks run at once (worker.concurrency, default 4)")
    p.add_argument("--pool", choices=("threads", "processes"), default="threads",
                   help="run tasks on OS threads (default) or in a pool of processes")
    p.add_argument("--host", help="broker host (else TQ_BROKER__HOST, broker.host, 127.0.0.1; 0.0.0.0 dials loopback)")
    p.add_argument("--port", type=int, help="broker port (else TQ_BROKER__PORT, broker.port, 6379)")
    p.add_argument("--api-key", help="API key for HELLO (default TQ_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca-file or TQ_TLS_CA)")
    p.add_argument("--ca-file", help="CA certificate that signed the broker's (default TQ_TLS_CA)")
    p.add_argument("--name", help="worker name shown in WORKERS (default HOSTNAME-PID)")
    p.add_argument("--config", metavar="FILE", help="YAML file overriding config/default.yaml")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error (monitoring.log_level)")
    return p


def import_task_modules(names: Sequence[str]) -> None:
    """Import each module; a missing one or one that fails to import is a UsageError naming it."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                raise UsageError(f"cannot import task module {name!r}: no module named {exc.name!r} "
                                 f"(run from the directory that contains it, or set PYTHONPATH)") from None
            traceback.print_exc()
            raise UsageError(f"task module {name!r} failed to import: {exc}") from None
        except Exception as exc:
            traceback.print_exc()
            raise UsageError(f"task module {name!r} failed to import: {type(exc).__name__}: {exc}") from None


class WorkerConfig:
    """Everything the worker needs, resolved from flags > TQ_* environment > config files > defaults."""

    def __init__(self, argv: Sequence[str]) -> None:
        args = parser().parse_args(list(argv))
        try:
            settings: Settings = load_settings(args.config, overrides={
                "worker.concurrency": args.concurrency, "monitoring.log_level": args.log_level,
            })
        except ConfigError as exc:
            raise UsageError(f"config error: {exc}") from None
        self.settings = settings
        self.modules: list[str] = args.modules
        self.pool: str = args.pool
        self.concurrency = settings.worker.concurrency
        try:
            self.client = ClientSettings.resolve(args.host, args.port, args.api_key, args.tls, args.ca_file,
                                                 config_host=settings.broker.host, config_port=settings.broker.port)
        except ClientSettingsError as exc:
            raise UsageError(str(exc)) from None
        self.host, self.port = self.client.host, self.client.port
        self.name: str = (args.name or f"{socket.gethostname()}-{os.getpid()}")[:200]
        self.queue_flag: list[str] | None = None
        if args.queues:
            self.queue_flag = [q.strip() for q in args.queues.split(",") if q.strip()]
            bad = [q for q in self.queue_flag if not QUEUE_NAME.match(q) or len(q) > MAX_QUEUE_NAME]
            if bad or not self.queue_flag:
                raise UsageError(f"--queues: invalid queue name(s) {bad or args.queues!r} "
                                 "(1-200 characters of A-Z a-z 0-9 _ . : -)")

    def registration(self, kinds: dict[str, Any]) -> Registration:
        queues = self.queue_flag or sorted({t.queue for t in kinds.values()})
        return Registration(
            name=self.name, hostname=socket.gethostname()[:255], pid=os.getpid(), queues=queues,
            concurrency=self.concurrency,
            metadata={"kinds": ",".join(sorted(kinds))[:4096], "pool": self.pool,
                      "modules": ",".join(self.modules)[:4096]},
            schedules=cron_schedules(kinds),
        )


class Worker:
    """The running worker: its actors, and the shutdown sequence."""

    def __init__(self, config: WorkerConfig, kinds: dict[str, Any]) -> None:
        self.config = config
        self.kinds = kinds
        self.registration = config.registration(kinds)
        self.stop_event = gevent.event.Event()
        self.exit_code = 0
        self.signals = 0
        s = config.settings.worker
        self.control = config.client.client(client_name="tqbroker-worker", connect=False)
        self.claims = config.client.client(client_name="tqbroker-worker-claims", connect=False)
        self.backend: Backend = (
            ProcessBackend(config.concurrency, config.modules) if config.pool == "processes"
            else ThreadBackend(config.concurrency)
        )
        self.link = LinkActor.start(self.control, self.claims, self.registration, s.max_inactivity_secs,
                                    self._fatal)
        self.heartbeat = HeartbeatActor.start(self.control, self.link, s.heartbeat_interval_secs,
                                              with_children=config.pool == "processes")
        self.reporter = ReporterActor.start(self.control, self.link, self.heartbeat)
        self.executor = ExecutorActor.start(self.backend, kinds, self.reporter, self.heartbeat)
        self.claimer = ClaimerActor.start(self.claims, self.link, self.executor, self.registration.queues,
                                          config.concurrency, CLAIM_WAIT_MS)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self._on_signal, signum)
        log.info("worker %s starting: %d kind(s) on queues %s, concurrency %d, %s pool, broker %s:%d",
                 self.registration.name, len(self.kinds), ",".join(self.registration.queues),
                 self.config.concurrency, self.backend.name, self.config.host, self.config.port)
        self.link.tell(Listen(listeners=[self.heartbeat, self.reporter, self.claimer]))
        self.stop_event.wait()
        return self.shutdown()

    def _fatal(self, reason: str) -> None:
        self.exit_code = 1
        self.stop_event.set()

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.info("stopping: %s received; finishing running tasks (up to %.0f s); send it again to exit "
                     "at once", name, self.config.settings.worker.graceful_shutdown_timeout_secs)
            self.stop_event.set()
        else:
            log.warning("second %s: exiting now", name)
            gevent.spawn(self._force_exit)

    def _force_exit(self) -> None:
        """Exit at once: a short DEREGISTER on a fresh connection (the others may be busy), no waiting."""
        worker_id = self.registration.worker_id
        if worker_id is not None:
            try:
                with self.config.client.client(timeout=FORCED_DEREGISTER_TIMEOUT_S) as client:
                    client.deregister(worker_id)
                log.info("worker deregistered", extra={"worker_id": worker_id})
            except Exception as exc:  # exiting anyway; the broker reclaims the tasks when heartbeats stop
                log.warning("DEREGISTER on forced exit failed: %s", exc)
        _hard_exit(1)

    def shutdown(self) -> int:
        """Stop claiming, wait for running tasks (bounded), deliver results, DEREGISTER, stop the actors."""
        grace = self.config.settings.worker.graceful_shutdown_timeout_secs
        deadline = time.monotonic() + grace
        self.link.tell(Stopping())
        self.claimer.tell(Stop())
        self.executor.tell(Stop())
        self.claims.close()  # ends a waiting CLAIM now rather than when its wait_ms runs out
        idle: pykka.ThreadingFuture[bool] = pykka.ThreadingFuture()
        self.executor.tell(WhenDone(idle))
        unfinished: list[str] = []
        try:
            idle.get(timeout=grace)
        except pykka.Timeout:
            unfinished = self.executor.ask(RunningTasks(), block=True, timeout=2.0)
            log.warning("%d task(s) still running after %.1f s; the broker gets them back at DEREGISTER",
                        len(unfinished), grace, extra={"count": len(unfinished)})
        delivered: pykka.ThreadingFuture[bool] = pykka.ThreadingFuture()
        self.reporter.tell(WhenDone(delivered))
        try:
            delivered.get(timeout=max(deadline - time.monotonic(), 2.0))
        except pykka.Timeout:
            undelivered = self.reporter.ask(UndeliveredCount(), block=True, timeout=2.0)
            log.warning("%d result(s) could not be delivered before exiting", undelivered)
        self.heartbeat.tell(Stop())
        try:
            self.link.ask(DeregisterNow(timeout_s=5.0), timeout=15.0)  # the link may be mid-dial
        except pykka.Timeout:
            log.warning("DEREGISTER skipped: the broker connection is busy re-dialing")
        if unfinished:
            _hard_exit(self.exit_code)  # a thread running user code can be neither stopped nor joined
        pykka.ActorRegistry.stop_all(block=True, timeout=2.0)
        self.control.close()
        self.backend.close(idle=True)
        log.info("worker stopped")
        return self.exit_code


def _hard_exit(code: int) -> None:
    terminate_children()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str]) -> int:
    """Entry point of `tqbroker worker ...`; returns the exit status."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        print("the worker runs under gevent: start it with `tqbroker worker ...` (or `python -m actors worker`)",
              file=sys.stderr)
        return 2
    try:
        config = WorkerConfig(argv)
        from actors.logs import setup_logging

        monitoring = config.settings.monitoring
        setup_logging(monitoring.log_level, monitoring.json_logging)
        import_task_modules(config.modules)
        kinds = registered_tasks()
        if not kinds:
            raise UsageError(f"no @task functions found in {', '.join(config.modules)}")
    except UsageError as exc:
        print(f"tqbroker worker: {exc}", file=sys.stderr)
        return 2
    return Worker(config, kinds).run()
