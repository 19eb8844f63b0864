"""Holds the current authorization policy and reloads it when its file changes.

Start-up fails closed: a policy file that cannot be loaded stops the sidecar
with every problem named. Later, a bad edit keeps the last good policy and
says why in the log and on the admin endpoint (`GET /policy`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sidecar.config import PolicyConfig
from sidecar.policy.authz import Policy, PolicyError, load_policy

log = logging.getLogger("sidecar.policy")


class PolicyHolder:
    """The current Policy (read per request) and its reload loop."""

    def __init__(self, cfg: PolicyConfig | None, issuers: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        self.issuers = issuers  # the JWT issuers request principals are read against
        self.current: Policy = Policy() if cfg is None else load_policy(cfg.file, issuers)
        self.last_error: str | None = None
        self.loaded_at = time.time()
        self.reloads = 0
        self._mtime = cfg.file.stat().st_mtime_ns if cfg is not None else None

    def check(self) -> bool:
        """Reload if the file changed; True if a new policy was swapped in."""
        if self.cfg is None:
            return False
        try:
            mtime = self.cfg.file.stat().st_mtime_ns
        except OSError as e:
            self._fail(f"{self.cfg.file}: cannot read ({e.strerror})")
            return False
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            policy = load_policy(self.cfg.file, self.issuers)
        except PolicyError as e:
            self._fail("; ".join(e.problems))
            return False
        self.current = policy
        self.last_error = None
        self.loaded_at = time.time()
        self.reloads += 1
        log.info("policy reloaded from %s: %d rules", self.cfg.file, len(policy.rules))
        return True

    def _fail(self, why: str) -> None:
        if why != self.last_error:
            log.warning("keeping the last good policy: %s", why)
        self.last_error = why

    async def watch(self) -> None:
        """Poll the file forever; never dies."""
        if self.cfg is None:
            return
        while True:
            await asyncio.sleep(self.cfg.reload_interval)
            try:
                self.check()
            except Exception:
                log.exception("policy reload failed")

    def status(self) -> dict[str, Any]:
        """What GET /policy shows."""
        p = self.current
        return {
            "source": p.source,
            "default": p.default,
            "rules": [{"name": r.name, "action": r.action, "dry_run": r.dry_run} for r in p.rules],
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
            "reloads": self.reloads,
            "last_error": self.last_error,
        }
