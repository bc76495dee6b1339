# modelyard: one image with the `modelyard` CLI (router, agent, our container, controller, placement), and a
# second target that adds it to NVIDIA's Triton image for GPU nodes (Triton + agent sidecar in one pod).
#
# Build, from the repository root:
#   docker build -t modelyard:0.1.0 .                              router / agent / controller / our container
#   docker build --target triton -t modelyard-triton:0.1.0 .       NVIDIA Triton (GPU) + modelyard for the agent
#   docker build --build-arg TRITON_IMAGE=nvcr.io/nvidia/tritonserver:<tag>-py3 --target triton ...
#       another Triton release: it must ship Python >= 3.11 (24.12 and later: Ubuntu 24.04 with Python 3.12)
# Run (the router identifies callers by bearer token: mount a tenant-token file, as deploy/k8s does):
#   docker run -p 8001:8001 -p 9464:9464 -e MODELYARD_STORE=etcd://etcd:2379 \
#       -v "$PWD/tenant-tokens:/etc/modelyard/tenants/tokens:ro" modelyard:0.1.0
#   docker run -p 8101:8101 -e MODELYARD_HEALTH_URL=http://127.0.0.1:9465/readyz modelyard:0.1.0 \
#       container --host 0.0.0.0 --memory-bytes 8589934592 --metrics-port 9465
# Kubernetes manifests using both images: deploy/k8s/ (kubectl apply -k deploy/k8s).
#
# No Docker engine runs on this project's development or CI machines, so neither image is built there;
# tests/test_deploy.py checks this file's structure (targets, non-root user, health check, ports) and runs the
# default command line (ENTRYPOINT + CMD with this file's ENV) as a process, as the image would.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.12-py3

# -- build: the modelyard wheel and a virtual environment holding it ------------------------------------------
# setup.py compiles protos/ into modelyard/v1/*_pb2*.py while the wheel is built; pip installs grpcio-tools
# (pyproject's build-system) into its isolated build environment for that, so no runtime stage needs it.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY modelyard modelyard
# The default image also runs MLServer containers (deploy/k8s/mlserver-container.yaml): the mlserver extra.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/modelyard \
 && /opt/modelyard/bin/pip install "$(ls /wheels/*.whl)[mlserver]"

# -- triton: NVIDIA's Triton image plus modelyard (for the agent sidecar) -------------------------------------
# The build stage's venv cannot be copied here (it points at python:3.11-slim's interpreter), so this stage
# installs the same wheel into a venv of the image's own Python; Ubuntu's system Python is externally managed.
# Triton's environment is left alone: only the `modelyard` command is linked onto PATH.
FROM ${TRITON_IMAGE} AS triton
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# python3-venv unpinned on purpose: it must be the one that matches the base image's own python3.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /tmp/wheels
RUN python3 -m venv /opt/modelyard \
 && /opt/modelyard/bin/pip install /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && ln -s /opt/modelyard/bin/modelyard /usr/local/bin/modelyard
# NVIDIA's image runs as root unless told otherwise; uid 1000 is its own `triton-server` user, which owns
# /opt/tritonserver. deploy/k8s/triton-container.yaml runs both of the pod's containers as 1000 too.
USER 1000
EXPOSE 8001 8002 9464
# Triton serves grpc.health.v1 on its gRPC port (SERVING while it is ready).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/opt/modelyard/bin/python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; a = os.environ.get('MODELYARD_HEALTH_ADDRESS', '127.0.0.1:8001'); sys.exit(0 if g.HealthStub(grpc.insecure_channel(a)).Check(h.HealthCheckRequest(), timeout=2).status == h.HealthCheckResponse.SERVING else 1)"]

# -- modelyard (default target, built last): the modelyard CLI as a non-root user -----------------------------
FROM ${PYTHON_IMAGE} AS modelyard
RUN useradd --create-home --uid 10001 --user-group modelyard
COPY --from=build /opt/modelyard /opt/modelyard
# Metrics listen on every interface in a container (the code's default, 127.0.0.1, is for one machine).
# The router's callers are identified by the bearer tokens in MODELYARD_TENANT_TOKENS ('sha256:<hex> TENANT'
# lines, re-read when the file changes): the Secret modelyard-tenants is mounted there in deploy/k8s.
ENV PATH=/opt/modelyard/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MODELYARD_METRICS_HOST=0.0.0.0 \
    MODELYARD_TENANT_TOKENS=/etc/modelyard/tenants/tokens
USER 10001
WORKDIR /home/modelyard
# 8001: router (KServe v2 gRPC + modelyard.v1), 8101: our container, 9464: /metrics
EXPOSE 8000 8001 8101 9464
# Every modelyard process answers /readyz on its plaintext metrics port (--metrics-port): 200 once the router
# has its routing table (and while the store is away: it keeps routing), once an agent has registered its
# container, once a controller follows the store. Plaintext, so it works when the gRPC port requires client
# certificates. Point MODELYARD_HEALTH_URL at the port another command uses. (Kubernetes ignores HEALTHCHECK:
# the manifests declare the same probes.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('MODELYARD_HEALTH_URL', 'http://127.0.0.1:9464/readyz'), timeout=2)"]
ENTRYPOINT ["modelyard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8001", "--http-port", "8000", "--metrics-port", "9464"]
