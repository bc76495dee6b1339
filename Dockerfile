# modelyard: one image with the `modelyard` CLI (router, agent, placement, local fleet).
# Build:  docker build -t modelyard .                       (router / agent / placement)
#         docker build --build-arg EXTRAS=triton -t modelyard:triton .   (+ CPU tritonserver for `modelyard up`)
# Docker builds cannot run on the development machines of this project (no Docker engine); CI does not build it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY modelyard modelyard
COPY router router
COPY placement placement
COPY backends backends
ARG EXTRAS=""
RUN python -m venv /opt/modelyard \
 && /opt/modelyard/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/modelyard/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 modelyard
COPY --from=build /opt/modelyard /opt/modelyard
ENV PATH=/opt/modelyard/bin:$PATH PYTHONUNBUFFERED=1
USER modelyard
WORKDIR /home/modelyard
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD python -c "import sys, tritonclient.grpc as g; sys.exit(0 if g.InferenceServerClient('127.0.0.1:8001').is_server_live() else 1)"
ENTRYPOINT ["modelyard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8001"]
