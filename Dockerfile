# The provider's image, for those who build with an engine (`docker build -t capl .`).
#
# The tests build the same image without one (tests/support/image.rs, `tests/testbed image`):
# the release binary on Debian bookworm with libvirt's client library, the CA certificates and
# the ssh client (for qemu+ssh:// hosts), running as 65532:65532. tests/oci_image.rs checks that
# this file names the same user, entrypoint, runtime packages and labels as that builder.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin manager \
 && install -m 0755 target/release/manager /manager

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libvirt0 openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home \
      --shell /usr/sbin/nologin nonroot
COPY --from=builder /manager /manager
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.title="cluster-api-provider-libvirt" \
      org.opencontainers.image.description="Cluster API infrastructure provider for libvirt/KVM hosts" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm"
EXPOSE 9443/tcp 8080/tcp 9440/tcp
USER 65532:65532
ENTRYPOINT ["/manager"]
