"""A bare TLS byte pipe on uvloop, for `make bench-peers` (bench/bench_peers.py): the floor
under the sidecar's own work, measured in the same run.

It does what the sidecar's transport does and nothing of its HTTP work: accept a
connection (with mutual TLS, a client certificate required and verified against the
mesh's roots, when `--server-bundle` is given), open one connection to the upstream
(with mutual TLS when `--client-bundle` is given, the server's certificate verified for
`--sni`), and copy bytes both ways with asyncio Protocols, as asyncio's own examples do.
No parsing, no pool, no log: each client connection has its own upstream connection.

    python tlspipe.py --listen PORT --upstream HOST:PORT
        [--server-bundle PEM --ca PEM] [--client-bundle PEM --ca PEM --sni NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import uvloop


class Upstream(asyncio.Protocol):
    """The pipe's upstream side: bytes from it go to the client."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    """The pipe's client side: reading waits until the upstream connection is open."""

    def __init__(self, upstream: tuple[str, int], ctx: ssl.SSLContext | None, sni: str) -> None:
        self.upstream_addr = upstream
        self.ctx = ctx
        self.sni = sni
        self.up: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self.open())

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.upstream_addr
        try:
            up, _ = await loop.create_connection(
                lambda: Upstream(self.transport),  # type: ignore[arg-type]
                host,
                port,
                ssl=self.ctx,
                server_hostname=self.sni if self.ctx else None,
            )
        except OSError:
            self.transport.close()
            return
        self.up = up
        for data in self.early:
            up.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="HOST:PORT")
    ap.add_argument("--server-bundle", help="key, certificate and chain (PEM): TLS inbound")
    ap.add_argument("--client-bundle", help="key, certificate and chain (PEM): TLS upstream")
    ap.add_argument("--ca", help="the roots peers are verified against")
    ap.add_argument("--sni", default="", help="the upstream's name (SNI, verified SAN)")
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    server_ctx = client_ctx = None
    if args.server_bundle:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(args.server_bundle)
        server_ctx.load_verify_locations(args.ca)
        server_ctx.verify_mode = ssl.CERT_REQUIRED
    if args.client_bundle:
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.load_cert_chain(args.client_bundle)
        client_ctx.load_verify_locations(args.ca)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Client((host, int(port)), client_ctx, args.sni),
            "127.0.0.1",
            args.listen,
            ssl=server_ctx,
        )
        print(f"tlspipe listening on 127.0.0.1:{args.listen}", flush=True)
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
