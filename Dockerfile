# syntax=docker/dockerfile:1
# ttaserve CPU image: the demo model (models/) or a mounted package, served on 0.0.0.0:8000.
#   docker build -t ttaserve:0.1.0 .
#   docker run -p 8000:8000 ttaserve:0.1.0
# Build args: TORCH_VERSION and TORCH_INDEX_URL (the CPU wheel index keeps CUDA out);
# WITH_CXX=1 adds g++, which TTASERVE_COMPILE_POLICIES (torch.compile's inductor) needs at
# run time: docker build --build-arg WITH_CXX=1 -t ttaserve:0.1.0-compile .

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index, so that installing the project does not pull a CUDA build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ttaserve/ ttaserve/
COPY server/ server/
COPY adapters/ adapters/
COPY clients/ clients/
COPY models/ models/
RUN pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
ARG WITH_CXX=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if [ "${WITH_CXX}" = "1" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --system --gid 10001 ttaserve \
    && useradd --system --uid 10001 --gid ttaserve --no-create-home \
       --home-dir /tmp --shell /usr/sbin/nologin ttaserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TTASERVE_HOST=0.0.0.0 \
    TTASERVE_PORT=8000
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# slim images have no curl: probe liveness with the interpreter that is there anyway
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('TTASERVE_PORT', '8000'), timeout=2)"]
CMD ["ttaserve", "serve"]
