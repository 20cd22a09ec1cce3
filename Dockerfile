# syntax=docker/dockerfile:1
# One image, two binaries in /usr/local/bin:
# - `sluice`, the engine: the default entrypoint, `sluice run
#   /etc/sluice/query.yaml --http-port 9464`, which is what the engine pods
#   the operator creates run (their StatefulSet passes the same arguments);
# - `sluice-operator`, the controller: the chart's Deployment runs it with
#   `command: [/usr/local/bin/sluice-operator]` and `args: [run, ...]`.
# Build: docker build -t sluice:dev .

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev pkg-config \
      libcurl4-openssl-dev libssl-dev libsasl2-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice --bin sluice-operator \
 && cp target/release/sluice target/release/sluice-operator /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 libcurl4 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice-operator /usr/local/bin/
# Non-root (the distroless "nonroot" uid); neither binary writes outside
# mounted volumes and /tmp, so both run on a read-only root filesystem.
USER 65532:65532
# 9464: the engine's /progress, /metrics, /healthz, /readyz. The operator's
# port is its --http-port (8080 in the chart).
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "/etc/sluice/query.yaml", "--http-port", "9464"]
