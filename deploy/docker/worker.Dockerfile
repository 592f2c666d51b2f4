# syntax=docker/dockerfile:1
#
# The worker daemon, binary `sweep-worker`, linked against the libtorch of PyTorch 2.11
# (CUDA 13.0) through an rpath to `<site-packages>/torch/lib`.
#
# Build with the repository root as the context (BuildKit reads worker.Dockerfile.dockerignore
# from next to this file, so target/ and .venv/ stay out of the context):
#
#   docker build -f deploy/docker/worker.Dockerfile \
#       -t ghcr.io/sweep-project/sweep-worker:0.1.0 .
#
# BASE may be any image whose `python3` has torch==2.11.0 for CUDA 13.0 installed (the pip
# wheel layout: torch/lib next to nvidia/*/lib, which holds the CUDA runtime, cuDNN and NCCL).
# The builder and the runtime stage MUST use the same BASE: the binary's rpath is the absolute
# path of torch/lib in the builder, and it only resolves if the runtime has torch at the same
# path. The CUDA driver (libcuda.so.1) comes from the node, injected by the NVIDIA container
# toolkit; it is not in the image.
ARG BASE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime
ARG RUST_IMAGE=rust:1.95-bookworm

# The Rust toolchain is copied from the official image (the rustup toolchains are built for an
# old glibc baseline, so they run on the Ubuntu-based BASE). Where registry images cannot be
# pulled but static.rust-lang.org can be reached, install it in the builder instead:
#   curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95
# (and where neither is reachable, mirror one of them; rustup honours RUSTUP_DIST_SERVER).
FROM ${RUST_IMAGE} AS rust

FROM ${BASE} AS builder
# A C/C++ compiler for torch-sys (its C++ wrapper around libtorch, against the headers the
# torch wheel ships) and for aws-lc-sys (the TLS backend).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    LIBTORCH_USE_PYTORCH=1
# torch-sys asks `python3` (the first on PATH) where torch is; fail early if it is not 2.11.
RUN python3 -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "at", torch.__file__); sys.exit(0 if torch.__version__.startswith("2.11.") else 1)' \
 && cargo --version && cc --version | head -n1
WORKDIR /src
# Cargo loads every workspace member's manifest even when it builds one package.
COPY Cargo.toml Cargo.lock ./
COPY core core
COPY proto proto
COPY session session
COPY artifacts artifacts
COPY coordinator coordinator
COPY cli cli
COPY sweep sweep
COPY worker worker
COPY tests tests
COPY sweeps sweeps
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sweep-worker \
 && install -D -m 0755 target/release/sweep-worker /out/sweep-worker \
 && readelf -d /out/sweep-worker | grep -E 'R(UN)?PATH'

FROM ${BASE}
# CA roots for https object stores (S3) and for the coordinator when no --ca-cert is given.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sweep \
 && useradd --uid 10001 --gid 10001 --home-dir /home/sweep --create-home --shell /usr/sbin/nologin sweep \
 && install -d -o 10001 -g 10001 /var/cache/sweep
COPY --from=builder /out/sweep-worker /usr/local/bin/sweep-worker
# Every library must resolve through the rpath (same BASE as the builder), without
# LD_LIBRARY_PATH; libcuda.so.1 is the one exception (it comes from the node at run time).
RUN missing=$(ldd /usr/local/bin/sweep-worker | grep 'not found' | grep -v 'libcuda\.so' || true); \
    if [ -n "$missing" ]; then echo "unresolved libraries:"; echo "$missing"; exit 1; fi
USER 10001:10001
WORKDIR /home/sweep
# 9091: Prometheus /metrics and /healthz.
EXPOSE 9091
ENTRYPOINT ["sweep-worker"]
