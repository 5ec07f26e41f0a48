#!/usr/bin/env bash
# Makes everything a secured local run needs, into one folder (default
# ./dev-certs): a local CA, TLS certificates for the gRPC listener, an mTLS
# client, RabbitMQ and PostgreSQL, two bearer tokens and the access file that
# grants them (holding only their SHA-256 hashes). For development and tests:
# the CA key sits next to the certificates it signed. See docs/SECURITY.md.
#
#   scripts/dev-certs.sh [--force] [DIR]
#
# Files already in DIR are never overwritten without --force. Keys (PKCS#8,
# EC P-256), tokens and the access file are made readable by their owner only
# (0600); certificates are 0644, the folder 0755 so that the services in
# docker-compose.tls.yml can reach the certificates. Certificates are valid for
# DEV_CERTS_DAYS days (default 365), the CA for ten times as long.
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

force=false
dir=""
for arg in "$@"; do
    case "$arg" in
        --force) force=true ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "dev-certs.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
        *)
            if [[ -n "$dir" ]]; then
                echo "dev-certs.sh: one folder only (got $dir and $arg)" >&2
                exit 2
            fi
            dir="$arg"
            ;;
    esac
done
dir="${dir:-./dev-certs}"
days="${DEV_CERTS_DAYS:-365}"
if ! [[ "$days" =~ ^[1-9][0-9]*$ ]]; then
    echo "dev-certs.sh: DEV_CERTS_DAYS must be a positive number of days (got $days)" >&2
    exit 2
fi

command -v openssl >/dev/null || { echo "dev-certs.sh: openssl is needed (apt-get install openssl)" >&2; exit 1; }
if command -v sha256sum >/dev/null; then
    sha256() { sha256sum | cut -d' ' -f1; }
elif command -v shasum >/dev/null; then
    sha256() { shasum -a 256 | cut -d' ' -f1; }
else
    echo "dev-certs.sh: sha256sum (coreutils) or shasum is needed" >&2
    exit 1
fi

# name:mode of every file made here.
files=(
    ca.pem:644 ca.key:600
    server.pem:644 server.key:600
    client.pem:644 client.key:600
    rabbitmq.pem:644 rabbitmq.key:600
    postgres.pem:644 postgres.key:600
    access.toml:600 admin.token:600 reader.token:600
)

mkdir -p "$dir"
existing=()
for entry in "${files[@]}"; do
    name="${entry%%:*}"
    if [[ -e "$dir/$name" ]]; then existing+=("$name"); fi
done
if ((${#existing[@]} > 0)) && ! $force; then
    echo "dev-certs.sh: $dir already holds ${existing[*]}; nothing was changed." >&2
    echo "Pass --force to replace them (the old CA, tokens and keys stop working)." >&2
    exit 1
fi

umask 077
# Everything is made in a private folder beside the result and moved into
# place at the end: a failure leaves the folder as it was.
work="$(mktemp -d "$dir/.dev-certs.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cat >"$work/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no

[dn]

[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:orchestrator

[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:ops-console.local

[rabbitmq_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:rabbitmq

[postgres_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:postgres
EOF

new_key() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/$1.key" 2>/dev/null
}

serial() {
    echo "0x$(openssl rand -hex 16)"
}

# The CA.
new_key ca
openssl req -new -x509 -config "$work/openssl.cnf" -extensions ca_ext \
    -key "$work/ca.key" -subj "/CN=saga-orchestrator dev CA $(date +%Y-%m-%d)" \
    -sha256 -days "$((days * 10))" -set_serial "$(serial)" -out "$work/ca.pem"

# issue NAME COMMON_NAME: NAME.key and NAME.pem, signed by the CA, with the
# extensions of section NAME_ext.
issue() {
    local name="$1" cn="$2"
    new_key "$name"
    openssl req -new -config "$work/openssl.cnf" -key "$work/$name.key" \
        -subj "/CN=$cn" -out "$work/$name.csr"
    openssl x509 -req -in "$work/$name.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
        -set_serial "$(serial)" -sha256 -days "$days" \
        -extfile "$work/openssl.cnf" -extensions "${name}_ext" \
        -out "$work/$name.pem" 2>/dev/null
    rm -f "$work/$name.csr"
}

issue server orchestrator
issue client ops-console.local
issue rabbitmq rabbitmq
issue postgres postgres

openssl verify -CAfile "$work/ca.pem" \
    "$work/server.pem" "$work/client.pem" "$work/rabbitmq.pem" "$work/postgres.pem" >/dev/null

# Tokens: 32 random bytes, hex, with a prefix that secret scanners can
# recognise. The access file holds only their hashes.
admin_token="sgt_$(openssl rand -hex 32)"
reader_token="sgt_$(openssl rand -hex 32)"
printf '%s\n' "$admin_token" >"$work/admin.token"
printf '%s\n' "$reader_token" >"$work/reader.token"
admin_sha256="$(printf %s "$admin_token" | sha256)"
reader_sha256="$(printf %s "$reader_token" | sha256)"
unset admin_token reader_token

cat >"$work/access.toml" <<EOF
# Access file of saga-orchestrator (--auth-tokens / AUTH_TOKENS_FILE), made by
# scripts/dev-certs.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ). It holds only SHA-256
# hashes: the tokens themselves are in admin.token and reader.token. Edit it,
# then send SIGHUP to the orchestrator (docs/SECURITY.md). New entries:
#   sagactl token --principal NAME --role ROLE [--saga-type TYPE]

[[token]]
principal = "dev-admin"
sha256 = "$admin_sha256"
roles = ["admin"]

[[token]]
principal = "dev-reader"
sha256 = "$reader_sha256"
roles = ["reader"]

# mTLS (--tls-client-ca ca.pem): client.pem's first DNS name.
[[certificate]]
subject = "ops-console.local"
roles = ["operator"]
EOF

for entry in "${files[@]}"; do
    name="${entry%%:*}"
    chmod "${entry##*:}" "$work/$name"
    mv -f "$work/$name" "$dir/$name"
done
chmod 755 "$dir"

abs="$(cd "$dir" && pwd)"
cat <<EOF
Made in $abs:
  ca.pem, ca.key               the local CA (keep ca.key private; trust ca.pem)
  server.pem, server.key       gRPC listener: localhost, 127.0.0.1, orchestrator
  client.pem, client.key       mTLS client, subject ops-console.local (role operator)
  rabbitmq.pem, rabbitmq.key   RabbitMQ TLS listener: localhost, 127.0.0.1, rabbitmq
  postgres.pem, postgres.key   PostgreSQL: localhost, 127.0.0.1, postgres
  access.toml                  access file: token hashes and the certificate entry
  admin.token, reader.token    bearer tokens of dev-admin (admin) and dev-reader (reader)
Keys, tokens and access.toml are readable by you only (0600); valid for $days days.

Serve the API with TLS and tokens:
  cargo run --release --bin orchestrator -- serve --grpc-addr 0.0.0.0:50051 \\
    --tls-cert $dir/server.pem --tls-key $dir/server.key --auth-tokens $dir/access.toml
  (add --tls-client-ca $dir/ca.pem to require client certificates)

Call it:
  cargo run --release --bin sagactl -- --addr https://localhost:50051 \\
    --ca-cert $dir/ca.pem --token-file $dir/admin.token types
  with the client certificate instead of a token (needs --tls-client-ca):
  cargo run --release --bin sagactl -- --addr https://localhost:50051 \\
    --ca-cert $dir/ca.pem --cert $dir/client.pem --key $dir/client.key list

The whole system with TLS everywhere (certificates expected in ./dev-certs):
  docker compose -f docker-compose.yml -f docker-compose.tls.yml up --build

See docs/SECURITY.md for every setting.
EOF
