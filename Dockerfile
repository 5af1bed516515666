# The sand pipeline with CPU wheels; the default command serves the Prefect deployments.
#   docker build -t sand .
#   docker run -e PREFECT_API_URL=http://<prefect-server>:4200/api -v /shared/sand-data:/data sand
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    SAND_DATA_ROOT=/data

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY flows ./flows
COPY models ./models
COPY sand ./sand
RUN pip install .

VOLUME /data
CMD ["sand", "serve", "--data-root", "/data"]
