# One image with every Barnacle binary and the node tools. Build from the repository root:
#   docker build -t barnacle .
# Nothing is fetched at run time.

FROM rust:1.89-bookworm AS build
# The packages come from deploy/packages.sh, the one list ./barnacle, ./test.sh, .ci/run and
# deploy/image.sh use too: here the build's (RocksDB linked dynamically against Debian's build,
# docs/replica.md; libclang for bindgen).
# DL3008 (pin apt versions) is ignored: the Debian suite pins them, and exact pins break at every point release.
COPY deploy/packages.sh /tmp/packages.sh
# hadolint ignore=DL3008,SC1091,SC2086
RUN . /tmp/packages.sh \
 && apt-get update \
 && apt-get install -y --no-install-recommends $packages_build \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu ROCKSDB_INCLUDE_DIR=/usr/include
# Debug info is split off: the image's binaries are stripped (deploy/image.sh does the same).
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && for b in barnacle barnacle-controller barnacle-node barnacle-nbd-fuse barnacle-engine barnacle-replica; do \
      strip --strip-debug -o "/out/$b" "target/release/$b"; \
    done

FROM debian:bookworm-slim
# The runtime packages ($packages_image in deploy/packages.sh): the RocksDB library, TLS roots,
# and what the node plugin runs (mkfs/resize, blkid/losetup/mount, FUSE).
# DL3008 is ignored as above: the bookworm suite pins the versions.
COPY deploy/packages.sh /tmp/packages.sh
# hadolint ignore=DL3008,SC1091,SC2086
RUN . /tmp/packages.sh \
 && apt-get update \
 && apt-get install -y --no-install-recommends $packages_image \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.sh
COPY --from=build /out/ /usr/local/bin/
# The controller needs no root; the node plugin and the engine and replica pods run with the
# privileges their pod specs grant (mounts, loop devices, nbd).
ENTRYPOINT ["/usr/local/bin/barnacle"]
CMD ["--help"]
