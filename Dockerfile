# tollgate: multi-stage build, small non-root runtime image.
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 -p 9901:9901 tollgate        # the built-in deploy/docker/proxy.toml
#   docker run --rm -p 8080:8080 -v "$PWD/my.toml:/etc/tollgate/proxy.toml:ro" tollgate
# A mounted config must listen on 0.0.0.0 (the shipped ./proxy.toml listens on 127.0.0.1).
# deploy/compose/compose.yaml runs two replicas sharing one Redis.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY lua lua
RUN cargo build --release --locked --bin tollgate \
 && strip target/release/tollgate

FROM debian:bookworm-slim
# The system roots that https:// upstreams are verified against when they name no tls.ca.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollgate \
 && mkdir -p /etc/tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY deploy/docker/proxy.toml /etc/tollgate/proxy.toml
USER 10001
WORKDIR /etc/tollgate
EXPOSE 8080 9901
# Needs [server] admin in the mounted config (the shipped one has it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/tollgate", "healthcheck", "--config", "/etc/tollgate/proxy.toml"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["run", "--config", "/etc/tollgate/proxy.toml"]
