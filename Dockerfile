# The worker image: `search` on the CUDA build of the torch version the tests ran (CI checks
# that TORCH_VERSION here equals the tested torch: tests/test_dockerfile.py), on the tested
# Python. The CUDA wheels bring their own CUDA and cuDNN libraries; the host needs only the
# NVIDIA driver and container toolkit. One container per GPU (docker-compose.yml).
#   docker build -t ko-retrieval-search .
#   docker run --gpus '"device=0"' -e SEARCH_STORAGE_FILE=/run/secrets/search_storage ... \
#     ko-retrieval-search worker --study ko-retrieval --gpu 0
# The same image serves the dashboard (`search dashboard`, the `dashboard` extra), publishes
# the report plots (`plots`) and logs trials to W&B (`wandb`).
FROM python:3.11-slim-bookworm

# torch's version is the tested one; TORCH_CUDA picks the wheel index (cu126, cu128, ...) that
# matches the hosts' drivers.
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/search/.cache/huggingface \
    SEARCH_CACHE=/home/search/.cache/search

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"
COPY pyproject.toml README.md ./
COPY search ./search
COPY storage ./storage
# The constraint keeps the CUDA torch above: pip must not swap it for another version.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch.txt \
    && pip install -c /tmp/torch.txt . \
    && python -c "import torch, search, storage, optuna_dashboard; v = torch.__version__.split('+')[0]; assert v == '${TORCH_VERSION}', v; print('torch', torch.__version__)"

RUN useradd --create-home --uid 1000 search && mkdir -p /home/search/.cache \
    && chown -R search:search /home/search
USER search
WORKDIR /home/search

# SIGTERM (docker stop) makes a worker hand its running trial back before it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["search"]
CMD ["--help"]
