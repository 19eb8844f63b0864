"""Settings every part agrees on, defined once: the well-known ports (Istio's), the CA's
address inside a cluster, the image, and the rotation defaults."""

from __future__ import annotations

import datetime as dt

# The CA.
CA_PORT = 8443
CA_LISTEN = f"127.0.0.1:{CA_PORT}"  # `meshca serve` without --listen
IN_CLUSTER_CA_URL = f"https://meshca.mesh-system.svc:{CA_PORT}"
IMAGE = "meshca:latest"  # the image injection puts in pods

# The sidecar, as in Istio.
ADMIN_PORT = 15000  # loopback only
OUTBOUND_PORT = 15001  # the app's HTTP proxy
INBOUND_PORT = 15006  # mTLS from other pods
HEALTH_PORT = 15021  # the kubelet's readiness probe
METRICS_PORT = 15090  # Prometheus scrapes /metrics (and /stats/prometheus), as on Istio's Envoy
SIDECAR_UID = 1337

# Rotation (`meshca rotate`).
ROTATION_SHARE = 2 / 3  # replace a CA certificate past this share of its life
PROPAGATION_WAIT = dt.timedelta(hours=1)  # prepare -> activate
RETIRE_WAIT = dt.timedelta(hours=25)  # activate -> retire: 24 h leaves + 1 h margin
