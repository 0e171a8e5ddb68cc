# The image deploy/k8s runs: spiffe-server, spiffe-agent and spiffe-proxy, from this tree.
#   docker build -t ghcr.io/spiffe-sidecar/spiffe-sidecar:0.1.0 .
# The project's tests do not need it.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY spiffecore spiffecore
COPY spiffeproto spiffeproto
COPY controlplane controlplane
COPY sidecar sidecar
COPY spiffeops spiffeops
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin spiffe
# The Kubernetes manifests set the user per container (the agent runs as root, the rest as 10001).
USER 10001
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
