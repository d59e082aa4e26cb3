# syntax=docker/dockerfile:1.7
# The fieldlens services: router, specialist and tiny (`python -m fieldlens.<service>`).
# Build from the repository root:
#   docker build -f docker/fieldlens.Dockerfile -t fieldlens:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/fieldlens/bin:$PATH
RUN python -m venv /opt/fieldlens
WORKDIR /src
COPY pyproject.toml README.md ./
# torch first, from the CPU-only index, at the version pyproject.toml pins: the services
# never touch a GPU, and the +cpu build satisfies the pin so pip skips the CUDA wheels.
RUN torch_pin="$(sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)" \
    && test -n "$torch_pin" \
    && pip install "$torch_pin" --index-url "$TORCH_INDEX_URL"
COPY protos/ protos/
COPY scripts/gen_protos.py scripts/
COPY services/ services/
# The generated fieldlens.v1 package is not committed: generate it, then install.
RUN tools_pin="$(sed -n 's/.*"\(grpcio-tools==[^"]*\)".*/\1/p' pyproject.toml)" \
    && pip install "$tools_pin" \
    && python scripts/gen_protos.py \
    && pip install .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/fieldlens/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 fieldlens \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin fieldlens
COPY --from=build /opt/fieldlens /opt/fieldlens
USER 10001:10001
EXPOSE 50051 50052 50053 9101 9102 9103
ENTRYPOINT ["python", "-m"]
CMD ["fieldlens.router"]
