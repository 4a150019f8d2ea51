# syntax=docker/dockerfile:1
# tokenhub's container image, the one helm/tokenhub runs by default:
#
#   docker build -t tokenhub:0.1.0 --build-arg COMMIT=$(git rev-parse --short=12 HEAD) .
#
# (the tag is Cargo.toml's version, the chart's appVersion; push it to your
# registry and set image.repository). Without a registry:
# scripts/build-image.sh (buildah; docs/kubernetes.md). Two stages: a Rust
# toolchain builds the release binary and gathers the runtime's files; the
# image itself starts from nothing and holds only the binary, the shared
# libraries it links, Debian's CA certificates and an empty /data, run as an
# unprivileged user. The build needs Cargo.lock (`--locked`: the image gets
# the dependency versions the tests ran with).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# What `tokenhub --version` and the image's labels name (.git is not in
# the build context).
ARG COMMIT=unknown
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between
# builds; the binary is copied out of the cached target directory. That
# directory outlives the sources, and cargo judges them by modification
# time: touched, they are newer than any build it holds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    find build.rs src templates migrations -exec touch {} + \
    && TOKENHUB_COMMIT="${COMMIT}" cargo build --release --locked --bin tokenhub \
    && install -D -m 0755 target/release/tokenhub /rootfs/usr/local/bin/tokenhub
# The runtime's files: each library the loader resolves for the binary, at
# the path it resolves it to; the CA bundle from Debian's certificates (not
# /etc/ssl/certs, which a builder may have replaced with its own); /tmp; an
# empty directory for /data (given to the unprivileged user when copied).
RUN ldd /rootfs/usr/local/bin/tokenhub > /tmp/ldd \
    && grep -o '/[^ ]*' /tmp/ldd > /tmp/libs \
    && while read -r lib; do install -D -m 0755 "$lib" "/rootfs$lib"; done < /tmp/libs \
    && install -d -m 0755 /rootfs/etc/ssl/certs \
    && cat /usr/share/ca-certificates/mozilla/*.crt > /rootfs/etc/ssl/certs/ca-certificates.crt \
    && install -d -m 1777 /rootfs/tmp \
    && install -d -m 0750 /data

FROM scratch
ARG COMMIT=unknown
COPY --from=builder /rootfs/ /
COPY --from=builder --chown=65532:65532 /data /data
LABEL org.opencontainers.image.title="tokenhub" \
      org.opencontainers.image.description="OpenID Connect tokens for JupyterHub users, kept fresh" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.licenses="BSD-3-Clause"
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
ENTRYPOINT ["/usr/local/bin/tokenhub"]
CMD ["serve"]
