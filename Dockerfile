# The nas image: workers (python -m nas.search) and the dashboard run from it.
# CPU torch by default; for NVIDIA GPUs build FROM a CUDA runtime image (e.g.
# pytorch/pytorch:2.x-cuda12.x-cudnn9-runtime) and drop the --index-url line below.
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    NAS_DATA_DIR=/data

# A C compiler: CPU workers build nas/cpu/batchnorm.c for their CPU on first use, where asked
# (--batchnorm native; nas/cpu/native.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch<=2.14.1" "torchvision<=0.29.1"
COPY pyproject.toml README.md ./
COPY nas ./nas
COPY studies/*.toml ./studies/
COPY studies/designs ./studies/designs
RUN pip install ".[postgres]"

# MNIST lives on a volume shared by all workers; the first one to start prepares it.
VOLUME /data
CMD ["python", "-m", "nas.search", "--help"]
