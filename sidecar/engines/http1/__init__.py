"""The HTTP/1.1 engine: `framing` (pure), `exchange` (one request and its answer),
`downstream` (the client's connection), `upstream` (a connection to the app or a peer)."""
