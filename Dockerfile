# One runtime image with the shardkv binaries.
#   docker build -t shardkv .
#   docker run --rm shardkv local --host 0.0.0.0
# The operator runs from the same image: `shardkv-operator run`.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p shardkv --bins -p shardkv-operator

FROM debian:bookworm-slim
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
