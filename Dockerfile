# The worker image: `search` on a CUDA build of torch. One container per GPU (docker-compose.yml).
#   docker build -t ko-retrieval-search .
#   docker run --gpus '"device=0"' -e SEARCH_STORAGE=postgresql+psycopg2://... \
#     ko-retrieval-search worker --study ko-retrieval --gpu 0
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/search/.cache/huggingface \
    SEARCH_CACHE=/home/search/.cache/search

WORKDIR /app
# The base image's CUDA torch already satisfies the project's torch range, so pip keeps it.
COPY pyproject.toml README.md ./
COPY search ./search
COPY storage ./storage
RUN pip install . && python -c "import torch, search, storage; print(torch.__version__)"

RUN useradd --create-home --uid 1000 search && mkdir -p /home/search/.cache \
    && chown -R search:search /home/search
USER search
WORKDIR /home/search

# SIGTERM (docker stop) makes a worker hand its running trial back before it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["search"]
CMD ["--help"]
