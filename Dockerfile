# A first image for the worker and the frontends (the deployment issue splits it: a CUDA worker image
# and a slim bot image without torch). Build: docker build -t shallow .
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends redis-tools && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY shared shared
COPY worker worker
COPY bots bots
COPY training training
# gpu: unsloth and bitsandbytes for the 4-bit CUDA worker; build with --build-arg EXTRAS=dev for a CPU-only image
ARG EXTRAS=gpu
RUN pip install --no-cache-dir ".[${EXTRAS}]"
ENV SHALLOW_HOME=/data
VOLUME /data
ENTRYPOINT ["shallow"]
CMD ["worker"]
