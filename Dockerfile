# syntax=docker/dockerfile:1
#
# The sigrouter image: built with the `dist` Cargo profile (stripped, LTO) on the official Rust
# image, run on distroless/cc (glibc, CA certificates for rediss://, no shell, no package
# manager) as the unprivileged user 65532.
#
#   docker build --build-arg SIGROUTER_COMMIT="$(git rev-parse --short=12 HEAD)" \
#     -t registry.example.com/sigrouter:0.1.0 .
#
# The commit goes into `sigrouter_build_info` and the startup log line (.git is not sent to the
# build: see .dockerignore). docs/OPERATIONS.md walks from here to a running fleet.

# The toolchain the repository is tested with; Debian 12 in both stages, so the binary and the
# runtime share one glibc.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
ARG SIGROUTER_COMMIT=unknown
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds (BuildKit); the binary
# is copied out of the cached target directory before the mount goes away.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    SIGROUTER_COMMIT="${SIGROUTER_COMMIT}" \
    cargo build --locked --profile dist -p sigrouter --bin sigrouter \
    && install -D -m 0755 target/dist/sigrouter /out/sigrouter

FROM gcr.io/distroless/cc-debian12:nonroot
ARG SIGROUTER_COMMIT=unknown
LABEL org.opencontainers.image.title="sigrouter" \
      org.opencontainers.image.description="UDP signaling router for peer-to-peer client fleets" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${SIGROUTER_COMMIT}"
COPY --from=builder /out/sigrouter /usr/local/bin/sigrouter
USER 65532:65532
# 7400/udp clients (protocol and STUN), 7401/udp node-to-node, 9400/tcp metrics and probes.
EXPOSE 7400/udp 7401/udp 9400/tcp
ENTRYPOINT ["/usr/local/bin/sigrouter"]
CMD ["serve"]
