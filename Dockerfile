# modelyard: one image with the `modelyard` CLI (router, agent, our container, controller, placement).
#
#   docker build -t modelyard .                        router / agent / controller / our container (CPU)
#   docker build --target triton -t modelyard-triton . Triton (GPU, NVIDIA's image) + modelyard for the agent
#
# No Docker engine runs on this project's development or CI machines, so these images are not built there;
# tests/test_deploy.py checks this file's structure instead.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.08-py3

# -- build: a virtual environment with modelyard (setup.py compiles protos/ with grpcio-tools here) -----
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY modelyard modelyard
COPY router router
COPY placement placement
COPY backends backends
RUN python -m venv /opt/modelyard \
 && /opt/modelyard/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/modelyard/bin/pip install --no-cache-dir .

# -- triton: NVIDIA's Triton image plus modelyard, for GPU nodes (Triton + agent in one pod) ----------------
FROM ${TRITON_IMAGE} AS triton
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/modelyard
COPY --from=build /src /src
RUN /opt/modelyard/bin/pip install --no-cache-dir /src && rm -rf /src
ENV PATH=/opt/modelyard/bin:$PATH
# Triton's image runs as root by default; its Kubernetes manifest sets runAsUser 1000 (the image's triton-server user).
USER 1000
EXPOSE 8001 9464

# -- default target: the modelyard CLI, non-root ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS modelyard
RUN useradd --create-home --uid 10001 modelyard
COPY --from=build /opt/modelyard /opt/modelyard
ENV PATH=/opt/modelyard/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/modelyard
EXPOSE 8001 8101 9464
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; sys.exit(0 if g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')).Check(h.HealthCheckRequest(), timeout=2).status == h.HealthCheckResponse.SERVING else 1)"
ENTRYPOINT ["modelyard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "9464"]
