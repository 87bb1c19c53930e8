# One runtime image with the shardkv binaries.
#   docker build -t shardkv .
#   docker run --rm shardkv local --host 0.0.0.0
# The operator runs from the same image: `shardkv-operator run`.
#
# Without a registry (as on the test machine): build the binaries on the host, then package
# them on a local Debian base (BASE, e.g. one made by debootstrap and `docker import`):
#   cargo build --release -p shardkv --bins -p shardkv-operator
#   docker build --target host --build-arg BASE=shardkv-base:bookworm -t shardkv:dev .
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS host
COPY target/release/shardkv-node target/release/shardkvctl target/release/shardkv-operator \
     /usr/local/bin/
USER 65532:65532
VOLUME /data
ENV SHARDKV_DATA_DIR=/data
ENTRYPOINT ["/usr/local/bin/shardkv-node"]

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p shardkv --bins -p shardkv-operator

FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/shardkv-node /src/target/release/shardkvctl \
     /src/target/release/shardkv-operator /usr/local/bin/
# Not root; data lives in a volume the orchestrator mounts.
USER 65532:65532
VOLUME /data
ENV SHARDKV_DATA_DIR=/data
ENTRYPOINT ["/usr/local/bin/shardkv-node"]
