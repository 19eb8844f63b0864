"""SPIFFE IDs: parsing and validating `spiffe://<trust-domain>/<path>` (shared with the sidecar).

Follows the SPIFFE-ID specification: lowercase trust domain of letters, digits,
`.`, `-` and `_`; a path of non-empty segments of letters, digits, `.`, `-` and
`_`, with no `.` or `..` segment; no query, fragment, port or user info.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TD_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_ID_LENGTH = 2048
MAX_TD_LENGTH = 255
DEFAULT_TRUST_DOMAIN = "cluster.local"


class InvalidSpiffeId(ValueError):
    """The text is not a valid SPIFFE ID (or trust domain); the message says why."""


def validate_trust_domain(td: str) -> str:
    """Return `td` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    if not td:
        raise InvalidSpiffeId("trust domain is empty")
    if len(td) > MAX_TD_LENGTH:
        raise InvalidSpiffeId(f"trust domain is longer than {MAX_TD_LENGTH} characters")
    if not _TD_RE.match(td):
        raise InvalidSpiffeId(
            "trust domain may only contain lowercase letters, digits, '.', '-' and '_'"
        )
    return td


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID; `str()` gives the canonical URI."""

    trust_domain: str
    path: str  # begins with "/" for workload IDs, "" for the trust domain itself

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse and validate `text`; raise InvalidSpiffeId naming the problem."""
        if not isinstance(text, str):
            raise InvalidSpiffeId("SPIFFE ID must be a string")
        if len(text) > MAX_ID_LENGTH:
            raise InvalidSpiffeId(f"SPIFFE ID is longer than {MAX_ID_LENGTH} characters")
        scheme, sep, rest = text.partition("://")
        if not sep or scheme != "spiffe":
            raise InvalidSpiffeId("SPIFFE ID must start with 'spiffe://'")
        if any(c in rest for c in "?#"):
            raise InvalidSpiffeId("SPIFFE ID must not contain a query or fragment")
        td, slash, path = rest.partition("/")
        if "@" in td or ":" in td:
            raise InvalidSpiffeId("SPIFFE ID trust domain must not contain user info or a port")
        validate_trust_domain(td)
        if not slash:
            return cls(td, "")
        segments = path.split("/")
        for seg in segments:
            if seg == "":
                raise InvalidSpiffeId("SPIFFE ID path must not contain empty segments")
            if seg in (".", ".."):
                raise InvalidSpiffeId("SPIFFE ID path must not contain '.' or '..' segments")
            if not _SEGMENT_RE.match(seg):
                raise InvalidSpiffeId(
                    "SPIFFE ID path may only contain letters, digits, '.', '-' and '_'"
                )
        return cls(td, "/" + path)

    @classmethod
    def for_service_account(cls, trust_domain: str, namespace: str, account: str) -> SpiffeId:
        """The Istio-style workload ID `spiffe://<td>/ns/<namespace>/sa/<account>`."""
        for what, seg in (("namespace", namespace), ("service account", account)):
            if not isinstance(seg, str) or not _SEGMENT_RE.match(seg) or seg in (".", ".."):
                raise InvalidSpiffeId(f"{what} {seg!r} is not a single valid path segment")
        return cls.parse(f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def is_workload(self) -> bool:
        """True for an ID with a path (a workload), False for a bare trust-domain ID."""
        return bool(self.path)
