"""`sidecar init-net`: transparent interception rules for a pod's network namespace (istio-init).

Run once per pod, with NET_ADMIN, before the app starts. NAT rules send
incoming TCP for the app's port to the sidecar's inbound port, and the app's
outgoing TCP to the outbound port; the sidecar's own traffic (its uid) and
loopback traffic are left alone, so nothing loops. The outbound listener then
finds where the app meant to go with SO_ORIGINAL_DST and maps it to a service
(`outbound.services.<name>.addresses`). Apps need neither HTTP_PROXY nor a
code change.

The rules are built here (pure) and applied in one `iptables-restore --noflush`
call, so they are in place whole or not at all.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from meshca import defaults

INBOUND_CHAIN = "MESHCA_INBOUND"
OUTPUT_CHAIN = "MESHCA_OUTPUT"


class InitNetError(RuntimeError):
    """The rules could not be applied; the message says why."""


@dataclass(frozen=True)
class NetPlan:
    """What to intercept."""

    app_ports: tuple[int, ...] = ()
    inbound_port: int = defaults.INBOUND_PORT
    outbound_port: int = defaults.OUTBOUND_PORT
    sidecar_uid: int = defaults.SIDECAR_UID
    exclude_outbound_ports: tuple[int, ...] = ()


def rules(plan: NetPlan) -> str:
    """The nat-table rules in iptables-restore format."""
    lines = ["*nat", f":{INBOUND_CHAIN} - [0:0]", f":{OUTPUT_CHAIN} - [0:0]"]
    if plan.app_ports:
        lines.append(f"-A PREROUTING -p tcp -j {INBOUND_CHAIN}")
        for port in plan.app_ports:
            lines.append(
                f"-A {INBOUND_CHAIN} -p tcp --dport {port} -j REDIRECT "
                f"--to-ports {plan.inbound_port}"
            )
    lines += [
        f"-A OUTPUT -p tcp -j {OUTPUT_CHAIN}",
        # the sidecar's own connections (to the CA, to other sidecars) go out as they are
        f"-A {OUTPUT_CHAIN} -m owner --uid-owner {plan.sidecar_uid} -j RETURN",
        f"-A {OUTPUT_CHAIN} -o lo -j RETURN",
        f"-A {OUTPUT_CHAIN} -d 127.0.0.0/8 -j RETURN",
    ]
    for port in plan.exclude_outbound_ports:
        lines.append(f"-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN")
    lines += [
        f"-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {plan.outbound_port}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def _iptables(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise InitNetError(f"{binary} not found (install iptables)")
    return path


def installed(iptables: str = "iptables") -> bool:
    """True when the chains already exist (init-net ran in this namespace)."""
    res = subprocess.run(
        [_iptables(iptables), "-t", "nat", "-S", OUTPUT_CHAIN], capture_output=True, text=True
    )
    return res.returncode == 0


def apply(plan: NetPlan, iptables: str = "iptables") -> bool:
    """Install the rules; False (and nothing changed) if they are already there."""
    if installed(iptables):
        return False
    res = subprocess.run(
        [_iptables(f"{iptables}-restore"), "--noflush"],
        input=rules(plan),
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise InitNetError(f"iptables-restore failed: {res.stderr.strip()}")
    return True


def parse_ports(values: Sequence[str], flag: str) -> tuple[int, ...]:
    """Port numbers from repeated/comma-separated flags; ValueError naming the flag."""
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                raise ValueError(f"{flag}: {part!r} is not a port")
            out.append(int(part))
    return tuple(out)
