# syntax=docker/dockerfile:1.7
# NVIDIA Triton with the fieldlens Python backend: the model.py shims of the repository
# import fieldlens.backends.triton_python_model, which runs TorchScript under torch.
#
# Triton 24.10 (server 2.51) is the release bundled in nvidia-pytriton 0.7.0, which the
# local cluster and the tests run. Its image is Ubuntu 22.04 with Python 3.10, while
# fieldlens needs 3.11: the image gets Python 3.11 (deadsnakes) and the Python-backend stub
# built for 3.11 of the same Triton release, which the nvidia-pytriton wheel ships.
#
# Build from the repository root:
#   CPU nodes: docker build -f docker/triton.Dockerfile -t fieldlens-triton:0.1.0-cpu .
#   GPU nodes: docker build -f docker/triton.Dockerfile -t fieldlens-triton:0.1.0-cuda \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#   (choose the CUDA variant of torch that the GPU nodes' driver supports)
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

FROM ${TRITON_IMAGE} AS python311
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11 \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

FROM python311 AS build
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/fieldlens/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends patchelf \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/fieldlens
WORKDIR /src
COPY pyproject.toml README.md ./
RUN torch_pin="$(sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)" \
    && test -n "$torch_pin" \
    && pip install "$torch_pin" --index-url "$TORCH_INDEX_URL"
COPY protos/ protos/
COPY scripts/gen_protos.py scripts/
COPY services/ services/
RUN tools_pin="$(sed -n 's/.*"\(grpcio-tools==[^"]*\)".*/\1/p' pyproject.toml)" \
    && pip install "$tools_pin" \
    && python scripts/gen_protos.py \
    && pip install .
# The 3.11 stub finds its bundled CUDA runtime through an $ORIGIN-relative rpath; give it
# the absolute one, since it moves into Triton's backend directory.
RUN site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && cp "$site/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
       /opt/fieldlens/triton_python_backend_stub \
    && patchelf --set-rpath "$site/nvidia_pytriton.libs" /opt/fieldlens/triton_python_backend_stub

FROM python311
# The stub embeds the system libpython3.11, which does not read the venv's configuration.
ENV PYTHONPATH=/opt/fieldlens/lib/python3.11/site-packages \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/fieldlens /opt/fieldlens
RUN install -m 0755 /opt/fieldlens/triton_python_backend_stub \
       /opt/tritonserver/backends/python/triton_python_backend_stub
# triton-server, the unprivileged user NVIDIA's image defines.
USER 1000:1000
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models/triton"]
