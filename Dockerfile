# One image for every role: the command picks it (banter producer | worker | flower).
# GPU images: build with --build-arg ORT=onnxruntime-gpu on a CUDA base image.
FROM python:3.11-slim
ARG ORT=onnxruntime
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY banter banter
COPY producer producer
COPY workers workers
COPY registry registry
RUN pip install --no-cache-dir . \
 && if [ "$ORT" != "onnxruntime" ]; then pip uninstall -y onnxruntime && pip install --no-cache-dir "$ORT"; fi
ENV BANTER_HOME=/data BANTER_MODEL_ROOT=/data/models BANTER_REGISTRY_PATH=/data/registry/history.jsonl
VOLUME /data
CMD ["banter", "producer", "--host", "0.0.0.0", "--port", "8000"]
