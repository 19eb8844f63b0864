# One image for meshca, the sidecar and the demo services.
# Build: docker build -t meshca:latest .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshca meshca
COPY sidecar sidecar
COPY services services
# Wheels only (cryptography, uvloop, httptools ship binary wheels): no compiler needed here,
# and none reaches the final image.
RUN pip wheel --no-cache-dir --only-binary=:all: --wheel-dir /wheels . \
    || pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN groupadd --gid 10001 meshca \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin meshca
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl && rm -rf /wheels /root/.cache
USER 10001:10001
WORKDIR /tmp
EXPOSE 8443 15001 15006 15021
CMD ["meshca", "--help"]
