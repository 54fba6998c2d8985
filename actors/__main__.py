"""`tqbroker` (the console script) and `python -m actors`: one entry point.

The broker and the worker run on gevent: they are patched before anything else is imported. The
operator commands (stats, sql, ...) are plain client code on OS threads and are not patched.
"""

import sys

GEVENT_COMMANDS = frozenset({"worker"})


def needs_gevent(argv: list[str]) -> bool:
    """True for the broker (no command, or only flags) and for the commands that run on gevent."""
    return not argv or argv[0].startswith("-") or argv[0] in GEVENT_COMMANDS


def run() -> None:
    """Entry of the `tqbroker` console script; exits with the command's status."""
    argv = sys.argv[1:]
    if needs_gevent(argv):
        from gevent import monkey

        monkey.patch_all()
    from actors.main import main

    sys.exit(main(argv))


if __name__ == "__main__":
    run()
