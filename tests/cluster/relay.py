"""A TCP relay from a socket on host loopback to an address inside the cluster's network namespace.

The harness opens the listening socket in its own network namespace and starts this program
inside the cluster's namespace (``nsenter --net``) with that socket inherited: each accepted
connection is joined to a new connection to ``--target``, dialled from inside the namespace. So a
test on the host reaches the API server (or a Service) and no packet leaves either namespace's
loopback or bridge.

    nsenter --net=/run/netns/NS python -m tests.cluster.relay --fd 3 --target 127.0.0.1:6443
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _join(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    try:
        target_reader, target_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    except (OSError, TimeoutError) as exc:
        # The target is down: the client sees its connection closed, the log says why.
        print(f"relay: cannot reach {host}:{port}: {exc!r}", file=sys.stderr, flush=True)
        client_writer.close()
        return
    try:
        await asyncio.gather(_pipe(client_reader, target_writer), _pipe(target_reader, client_writer))
    finally:
        for writer in (client_writer, target_writer):
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


async def serve(listener: socket.socket, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(lambda r, w: _join(r, w, host, port), sock=listener)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.relay")
    parser.add_argument("--fd", type=int, required=True, help="an inherited listening TCP socket")
    parser.add_argument("--target", required=True, help="HOST:PORT to dial for each connection")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    listener = socket.socket(fileno=args.fd)
    asyncio.run(serve(listener, host, int(port)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
