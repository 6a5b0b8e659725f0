# CPU image serving a SAM checkpoint with `sam-hf serve` (see docs/serving.md).
#
#   docker build -t sam-hf .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo:/models/sam:ro" sam-hf
#
# The model is read from $SAM_HF_MODEL: a directory written by save_pretrained (mount it, read-only is enough) or a
# Hub id, downloaded to $HF_HOME on first start. Limits are flags of `sam-hf serve`; append them to the command,
# e.g. `docker run ... sam-hf sam-hf serve --host 0.0.0.0 --max-prompts 64`.
FROM python:3.11-slim

# The torch and torchvision versions the project is tested with; wheels come from PyTorch's CPU-only index, which
# is a fraction of the size of the default CUDA build.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/sam_hf
COPY pyproject.toml README.md ./
COPY sam_hf ./sam_hf
# The project itself, from this directory: its dependency bounds live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[serve]" \
    && groupadd --gid 10001 sam \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sam
# Numeric, so that runtimes checking for a non-root user (e.g. Kubernetes runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /home/sam

ENV SAM_HF_MODEL=/models/sam \
    HF_HOME=/home/sam/.cache/huggingface \
    OMP_NUM_THREADS=2

EXPOSE 8000

# Healthy once the model is loaded and /health answers 200 ({"ready": true}); a large model needs the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

CMD ["sam-hf", "serve", "--host", "0.0.0.0", "--port", "8000"]
