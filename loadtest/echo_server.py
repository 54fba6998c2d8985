"""The physical ceiling for the benchmark: a bare gevent server with the broker's framing and nothing else.

It reads frames (`transport.frames.FrameReader`, as the broker does), and answers every frame with one
fixed small frame (an OK with id 0), all answers of one `recv()` in one `sendall`: the broker's own
batching, minus decoding, actors, state and the WAL.

    python -m loadtest.echo_server --port 7400
"""

from __future__ import annotations

import argparse
import socket

from gevent.server import StreamServer

from transport.frames import FrameError, FrameReader, encode_frame
from transport.messages import Ok

RECV_BYTES = 256 * 1024
REPLY = encode_frame(Ok(id=0))


def handle(sock: socket.socket, _address: object) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = FrameReader()
    try:
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            frames = reader.feed(data)
            if frames:
                sock.sendall(REPLY * len(frames))
    except (OSError, FrameError):
        return
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7400)
    args = parser.parse_args(argv)
    server = StreamServer((args.host, args.port), handle)
    print(f"echo server listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
