# One image for meshca, the sidecar and the demo services.
# Build: docker build -t meshca:latest .
#
# The build stage makes a venv in /opt/venv with the project installed from /opt/meshca
# (a path entry, not a copy: the sidecar's request path is compiled with mypyc beside its
# sources, and its guard checks the build against those sources; sidecar/compiled.py),
# compiles the request path, and precompiles the bytecode. The final stage copies both
# directories to the same paths; no compiler, mypy or pip cache reaches it.
FROM python:3.11-slim AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/meshca
COPY pyproject.toml README.md ./
COPY meshca meshca
COPY sidecar sidecar
COPY services services
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --config-settings editable_mode=compat -e . \
    && /opt/venv/bin/pip install --no-cache-dir mypy types-PyYAML \
    && /opt/venv/bin/python -m sidecar.mypycbuild \
    && /opt/venv/bin/pip uninstall -y mypy types-PyYAML \
    && /opt/venv/bin/python -m compileall -q /opt/meshca /opt/venv/lib \
    && /opt/venv/bin/python -c "import sys, sidecar.compiled as c; \
print('sidecar request path:', c.state()); sys.exit(c.state() != 'compiled')"

FROM python:3.11-slim
RUN groupadd --gid 10001 meshca \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin meshca
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/meshca /opt/meshca
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
WORKDIR /tmp
EXPOSE 8443 15001 15006 15021
CMD ["meshca", "--help"]
