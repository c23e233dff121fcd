# The Hivewire volunteer client (`hivewire`), with CPU PyTorch by default. Build from the repository root:
#   docker build -f docker/volunteer.Dockerfile -t hivewire-volunteer .
#   docker run --rm -it -v hivewire-volunteer:/home/volunteer hivewire-volunteer login https://hive.example.org
#   docker run --rm -it -v hivewire-volunteer:/home/volunteer hivewire-volunteer join https://hive.example.org/runs/RUN
# The volume keeps the login token and the peer key between runs.
#
# CUDA variant: choose the PyTorch wheel index that matches your driver and run with `--gpus all` (needs the
# NVIDIA container toolkit on the host; the CUDA wheels bring their own CUDA runtime):
#   docker build -f docker/volunteer.Dockerfile \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t hivewire-volunteer:cuda .

FROM python:3.11-slim AS build
# Keep TORCH_VERSION equal to the pin in constraints.txt, which development and CI test against.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, in its own layer: it is by far the largest download and changes less often than the client.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY volunteer_client/ /src/volunteer_client/
RUN /opt/venv/bin/pip install --no-cache-dir /src/volunteer_client

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 volunteer \
    && useradd --system --uid 10001 --gid volunteer --create-home --home-dir /home/volunteer volunteer
COPY --from=build /opt/venv /opt/venv
WORKDIR /home/volunteer
USER 10001:10001
ENTRYPOINT ["hivewire"]
CMD ["--help"]
