#!/usr/bin/env bash
# Builds tokenhub's container image from the repository's Dockerfile, as it
# is, with buildah, on a machine that reaches no container registry (this
# one, and the tests' CI):
#
#   scripts/build-image.sh [image name]     (default localhost/tokenhub:<version>)
#
# The Dockerfile's one base image, rust:<RUST_VERSION>-<DEBIAN_RELEASE>, is
# made here once, from Debian's packages (mmdebstrap) and this machine's own
# Rust toolchain of that version, and kept in the local image store under
# that name; the build runs with --pull=never, so it uses it. Its crates are
# fetched by cargo inside the build, with this machine's CA bundle
# ($SSL_CERT_FILE) mounted where Debian keeps it. buildah keeps the build's
# cache mounts (crates, compiled dependencies) between builds, so a second
# build of the same sources takes seconds.
#
# Where Docker reaches Docker Hub, `docker build -t tokenhub:<version> .`
# builds the same image from the official rust image (docs/kubernetes.md).
#
# Installs buildah, podman, mmdebstrap and runc from Debian's packages when
# they are missing. Prints the image's name on the last line of stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in buildah podman mmdebstrap runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  echo "installing Debian packages: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends buildah podman mmdebstrap runc uidmap >/dev/null
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
image=${1:-localhost/tokenhub:$version}
arg() { sed -n "s/^ARG $1=//p" Dockerfile; }
rust_version=$(arg RUST_VERSION)
release=$(arg DEBIAN_RELEASE)
base="localhost/rust:${rust_version}-${release}"

# This machine's toolchain must be the version the Dockerfile names: the
# base image is named for it.
rustc_path=$(rustup which rustc 2>/dev/null || command -v rustc)
toolchain=$(cd "$(dirname "$rustc_path")/.." && pwd -P)
have=$("$toolchain/bin/rustc" --version | awk '{print $2}')
case "$have" in
  "$rust_version" | "$rust_version".*) ;;
  *) echo "the Dockerfile builds with Rust $rust_version; this machine's rustc is $have" >&2; exit 1 ;;
esac

if ! podman image exists "$base" || [ "$(podman image inspect --format '{{ index .Labels "rustc" }}' "$base")" != "$have" ]; then
  echo "making $base from Debian $release and Rust $have (once per machine)" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # As the official rust image has it: the toolchain under /usr/local,
  # cargo's home /usr/local/cargo (the Dockerfile's cache mount), a C
  # compiler for crates that build C (SQLite), CA certificates. Without
  # rustup: cargo and rustc are the toolchain's own binaries.
  mmdebstrap --quiet --variant=minbase --include=ca-certificates,gcc,libc6-dev \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="mkdir -p \"\$1/usr/local/rust\" \"\$1/usr/local/cargo/bin\"" \
    --customize-hook="cp -a '$toolchain/bin' '$toolchain/lib' '$toolchain/libexec' \"\$1/usr/local/rust/\"" \
    --customize-hook="for b in cargo rustc rustdoc; do ln -s ../../rust/bin/\$b \"\$1/usr/local/cargo/bin/\$b\"; done" \
    "$release" "$work/rootfs.tar"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change "LABEL rustc=$have" \
    "$work/rootfs.tar" "$base" >/dev/null
fi

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit-modified"; fi
cert=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
echo "building $image (tokenhub $version, commit $commit)" >&2
buildah bud --quiet --pull=never --isolation chroot --layers \
  -v "$cert:/etc/ssl/certs/ca-certificates.crt:ro" \
  --build-arg "COMMIT=$commit" \
  --annotation "org.opencontainers.image.version=$version" \
  --annotation "org.opencontainers.image.revision=$commit" \
  -t "$image" . >&2
echo "$image"
