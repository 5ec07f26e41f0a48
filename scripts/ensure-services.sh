#!/usr/bin/env bash
# Makes sure what saga-orchestrator needs locally is installed and running:
# PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and RabbitMQ on
# 127.0.0.1:5672 (guest/guest), and that promtool (which checks and tests
# the alert rules in deploy/prometheus) is at hand. Idempotent: does nothing
# when both answer and promtool is there. Headless Chromium and
# chromedriver (the console's browser tests) are installed when missing.
# protoc is not needed: the build vendors it (protoc-bin-vendored).
set -euo pipefail

log() { echo "[ensure-services] $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # wait_for NAME SECONDS CMD...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq 1 "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "$name did not come up within ${seconds}s"; return 1
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432; }

if ! command -v pg_isready >/dev/null 2>&1 || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  log "installing PostgreSQL"
  apt_install postgresql postgresql-client
fi
if ! postgres_up; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$version/main
  # Trust auth on loopback, as the tests and the demo expect.
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$conf/pg_hba.conf"
  fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_for PostgreSQL 60 postgres_up
fi

rabbit_up() { timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' ; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  log "installing RabbitMQ"
  apt_install rabbitmq-server
fi
if ! rabbit_up; then
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  wait_for RabbitMQ 120 rabbit_up
  # The port opens before the broker accepts logins; wait for the app.
  wait_for "RabbitMQ app" 120 as_root rabbitmqctl await_startup
fi
log "PostgreSQL and RabbitMQ are up"

# Where ensure_promtool keeps promtool when it is not on PATH; the alert
# tests (tests/tests/suite/deploy.rs, fn promtool) look in the same place.
promtool_cache=${XDG_CACHE_HOME:-$HOME/.cache}/saga-orchestrator/promtool

# promtool, from Debian's `prometheus` package. Only the binary is taken
# out of the package (apt-get download + dpkg-deb -x): installing it would
# enable and start a Prometheus server, which nothing here wants.
ensure_promtool() {
  local found
  if found=$(command -v promtool); then
    log "promtool: $found"; return 0
  fi
  if [ -x "$promtool_cache/promtool" ]; then
    log "promtool: $promtool_cache/promtool"; return 0
  fi
  log "fetching promtool (Debian package prometheus, binary only)"
  local work; work=$(mktemp -d)
  # apt-get download needs the package lists; a fresh machine may have none.
  if ! (cd "$work" && apt-get download -qq prometheus >"$work/apt.log" 2>&1); then
    as_root apt-get update -qq
    apt_updated=1
    if ! (cd "$work" && apt-get download -qq prometheus >"$work/apt.log" 2>&1); then
      cat "$work/apt.log" >&2; rm -rf "$work"
      log "cannot download the prometheus package"; return 1
    fi
  fi
  dpkg-deb -x "$work"/prometheus_*.deb "$work/pkg"
  mkdir -p "$promtool_cache"
  install -m 755 "$work/pkg/usr/bin/promtool" "$promtool_cache/promtool"
  rm -rf "$work"
  log "promtool: $promtool_cache/promtool ($("$promtool_cache/promtool" --version 2>&1 | head -n 1))"
}
ensure_promtool

# Headless Chromium and its WebDriver for the console's browser tests
# (tests/tests/suite/console.rs finds them on PATH).
ensure_browser() {
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    log "browser: $(command -v chromium), $(command -v chromedriver)"; return 0
  fi
  log "installing chromium and chromium-driver"
  apt_install chromium chromium-driver
}
ensure_browser
