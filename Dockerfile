# One image for every role: the command picks it (banter producer | worker | flower).
# GPU images: build with --build-arg ORT='onnxruntime-gpu[cuda,cudnn]' (docker-compose.yml does):
# the extras install CUDA and cuDNN from pip, and their library directories are registered with
# the dynamic loader here, so the CUDA execution provider finds them.
FROM python:3.11-slim
ARG ORT=onnxruntime
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY banter banter
COPY producer producer
COPY workers workers
COPY registry registry
RUN pip install --no-cache-dir . \
 && if [ "$ORT" != "onnxruntime" ]; then pip uninstall -y onnxruntime && pip install --no-cache-dir "$ORT"; fi \
 && site="$(python -c 'import site; print(site.getsitepackages()[0])')" \
 && if ls -d "$site"/nvidia/*/lib >/dev/null 2>&1; then \
      ls -d "$site"/nvidia/*/lib > /etc/ld.so.conf.d/nvidia-pip.conf && ldconfig; fi
ENV BANTER_HOME=/data BANTER_MODEL_ROOT=/data/models BANTER_REGISTRY_PATH=/data/registry/history.jsonl
VOLUME /data
CMD ["banter", "producer", "--host", "0.0.0.0", "--port", "8000"]
