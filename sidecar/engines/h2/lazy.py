"""The HTTP/2 engines, loaded at their first use: `h2`, `hpack` and `hyperframe` stay out of a
sidecar that never sees an HTTP/2 connection.

An idle sidecar's memory is almost all what it imported (docs/sidecar.md, "Memory"): the
HTTP/2 engines and the libraries under them come to about 1.6 MiB, so the listeners and
routers name these stand-ins, which import the real class when the first HTTP/2
connection is made and make an instance of it. Nothing per request: a stand-in is called
once per HTTP/2 connection (a call and a lookup in `sys.modules` more than the class
itself). The import takes 70-90 ms of the event loop (this busy 2-core machine), once;
a sidecar whose config names HTTP/2 (an h2c app, an http2 service) imports the engines
at start-up instead (cli.run), so only an unannounced HTTP/2 connection (a peer's
`meshca-h2`, an app's prior-knowledge HTTP/2 to an http service) waits for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.engines.h2.downstream import H2Downstream
    from sidecar.engines.h2.upstream import H2Upstream
else:

    def H2Downstream(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (stands in for a class)
        """A new `engines.h2.downstream.H2Downstream`."""
        from sidecar.engines.h2.downstream import H2Downstream as cls

        return cls(*args, **kwargs)

    def H2Upstream(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (stands in for a class)
        """A new `engines.h2.upstream.H2Upstream`."""
        from sidecar.engines.h2.upstream import H2Upstream as cls

        return cls(*args, **kwargs)


__all__ = ["H2Downstream", "H2Upstream"]
