"""The ceiling of figure i1: `python -m loadtest.wsgi_ceiling PORT` serves gevent.pywsgi with a WSGI app
that does nothing but answer 201 with a task-id-sized JSON body.

The REST API runs on gevent.pywsgi (a decision of the design card: HTTP in the broker process, on
gevent's WSGI server), so what this server does one request at a time over keep-alive bounds what the
REST API can do on the same machine; `loadtest.rest_bench` measures both with the same client.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402 - after the patch, like the broker
import sys  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

BODY = b'{"task_id":"0194a1b2c3d4e5f60718293a4b000001","duplicate":false}'


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    environ["wsgi.input"].read()
    start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))])
    return [BODY]


def main(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the broker's REST server does
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    WSGIServer(listener, app, log=None).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
