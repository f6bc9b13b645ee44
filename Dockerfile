# CPU image: p3bkit with ONNX Runtime and OpenVINO; runs `p3bkit --help` and the tests.
#   docker build -t p3bkit . && docker run --rm p3bkit p3bkit doctor
# GPU / TensorRT variant: start from an NVIDIA TensorRT image (nvcr.io/nvidia/tensorrt:<tag>-py3,
# which ships CUDA + the `tensorrt` Python package), then `pip install -e '.[dev]'` as below and
# run `bash benchmarks/gpu_check.sh` inside it with --gpus all.
FROM python:3.11-slim
WORKDIR /opt/p3bkit
COPY pyproject.toml README.md ./
COPY p3bkit ./p3bkit
COPY tests ./tests
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir -e '.[dev]'
RUN p3bkit --help
CMD ["python", "-m", "pytest"]
