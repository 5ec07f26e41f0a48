# One image for every service: orchestrator, sagactl and participant.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin orchestrator --bin sagactl --bin participant \
 && mkdir -p /out \
 && cp target/release/orchestrator target/release/sagactl target/release/participant /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 saga
COPY --from=build /out/ /usr/local/bin/
USER saga
ENV LOG_FORMAT=json RUST_LOG=info
EXPOSE 50051
CMD ["orchestrator", "serve"]
