# syntax=docker/dockerfile:1
# tokenhub's container image, the one helm/tokenhub runs by default:
#
#   docker build -t tokenhub:0.1.0 .
#
# (the tag is Cargo.toml's version, the chart's appVersion; push it to your
# registry and set image.repository). Two stages: a Rust toolchain builds the
# release binary, and a small Debian runtime with CA certificates runs it as
# an unprivileged user. The build needs Cargo.lock (`--locked`: the image
# gets the dependency versions the tests ran with).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between
# builds; the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tokenhub \
    && install -D -m 0755 target/release/tokenhub /out/tokenhub

FROM debian:${DEBIAN_RELEASE}-slim
# CA certificates for the IdP and the database over TLS. Not pinned: the
# version is whatever Debian's security updates hold for this release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o 65532 -g 65532 -m 0750 /data
COPY --from=builder /out/tokenhub /usr/local/bin/tokenhub
# No account needed: the numeric uid lets Kubernetes check runAsNonRoot.
USER 65532:65532
# Run without the chart, the default SQLite file lands in /data (mount a
# volume there); the chart mounts its PersistentVolumeClaim at the same place.
WORKDIR /data
# Listen on every address of the container (tokenhub's default is loopback).
# "TOKEN" in the name is not a secret: it is an address.
# hadolint ignore=DL3064
ENV TOKENHUB_BIND=0.0.0.0:8000
EXPOSE 8000
ENTRYPOINT ["tokenhub"]
CMD ["serve"]
