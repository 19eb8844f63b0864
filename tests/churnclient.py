"""A connection-churn client: N new mTLS connections, one GET each, several at a time.

    python tests/churnclient.py HOST:PORT CLIENT_PEM CA_PEM COUNT THREADS [resume]

Each connection makes a full handshake with the client certificate in CLIENT_PEM
(chain and key), sends `GET /churn` with `Connection: close`, reads the answer to
the end and closes. With `resume`, each thread offers the session of its last
connection (a TLS session ticket), as a repeat client does: still a new TLS
connection each time, at a fraction of the handshake's CPU.
Prints one JSON line: {"ok": n, "failed": n, "errors": [...]}
(the first few errors). Run as several processes to use more than one core: the
handshakes take the time, and Python's ssl module releases the GIL during them.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading

REQUEST = b"GET /churn HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n"


def one(
    ctx: ssl.SSLContext, host: str, port: int, session: ssl.SSLSession | None = None
) -> ssl.SSLSession | None:
    """One connection, one request; AssertionError or OSError if the answer is not a 200.
    Returns the connection's session (to offer on the next one)."""
    with socket.create_connection((host, port), timeout=30) as raw:
        with ctx.wrap_socket(raw, session=session) as s:
            s.sendall(REQUEST)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
            kept = s.session
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
    return kept


def main(argv: list[str]) -> int:
    where, client_pem, ca_pem, count, threads, *mode = argv
    resume = mode == ["resume"]
    host, port = where.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=ca_pem)
    ctx.check_hostname = False  # the sidecar is known by its SPIFFE ID, not 127.0.0.1
    ctx.load_cert_chain(client_pem)
    n, t = int(count), int(threads)
    ok, errors = [0], []
    lock = threading.Lock()

    def worker(k: int) -> None:
        session = None
        for _ in range(k):
            try:
                kept = one(ctx, host, int(port), session)
                session = kept if resume else None
            except (OSError, AssertionError) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            else:
                with lock:
                    ok[0] += 1

    shares = [n // t + (1 if i < n % t else 0) for i in range(t)]
    pool = [threading.Thread(target=worker, args=(k,)) for k in shares]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    print(json.dumps({"ok": ok[0], "failed": len(errors), "errors": errors[:5]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
