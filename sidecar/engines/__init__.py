"""Engines: the protocols the sidecar's listeners speak (HTTP/1.1 today, in `http1`)."""
