# One image with every Barnacle binary and the node tools. Build from the repository root:
#   docker build -t barnacle .
# Nothing is fetched at run time.

FROM rust:1.89-bookworm AS build
# RocksDB is linked dynamically against Debian's build (docs/replica.md); libclang for bindgen.
# DL3008 (pin apt versions) is ignored: the Debian suite pins them, and exact pins break at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends librocksdb-dev libclang-dev clang pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu ROCKSDB_INCLUDE_DIR=/usr/include
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/barnacle target/release/barnacle-controller target/release/barnacle-node \
       target/release/barnacle-nbd-fuse target/release/barnacle-engine target/release/barnacle-replica /out/

FROM debian:bookworm-slim
# The runtime RocksDB library, and what the node plugin runs: mkfs/resize (e2fsprogs,
# xfsprogs), blkid/losetup/mount (util-linux, mount), and FUSE's device (fuse3 for /dev/fuse
# permissions on hosts without it).
# DL3008 is ignored as above: the bookworm suite pins the versions.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends librocksdb7.8 e2fsprogs xfsprogs util-linux mount fuse3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The controller needs no root; the node plugin and the engine and replica pods run with the
# privileges their pod specs grant (mounts, loop devices, nbd).
ENTRYPOINT ["/usr/local/bin/barnacle"]
CMD ["--help"]
