#!/bin/sh
# Create the demo TLS files on first start, then run Dovecot in the foreground.
#
# The demo CA's certificate goes to $DEMO_CA_DIR, a volume that the appliance mounts and
# names in its upstream's ca_file. A recreated container makes a new CA and replaces the
# file there; the appliance's hot reload picks it up.
set -eu

TLS_DIR=${DEMO_TLS_DIR:-/etc/dovecot/tls}
CA_DIR=${DEMO_CA_DIR:-/run/demo-ca}
SERVER_NAME=${DEMO_SERVER_NAME:-dovecot}

create_tls_files() {
    mkdir -p "$TLS_DIR" "$CA_DIR"
    cd "$TLS_DIR"
    openssl req -x509 -new -nodes -newkey rsa:2048 -days 825 -sha256 \
        -subj "/CN=Appliance demo CA" -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -new -nodes -newkey rsa:2048 -subj "/CN=$SERVER_NAME" \
        -keyout server.key -out server.csr 2>/dev/null
    cat > server.ext <<EXTENSIONS
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$SERVER_NAME
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXTENSIONS
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days 825 -sha256 -extfile server.ext -out server.pem 2>/dev/null
    rm -f server.csr server.ext ca.srl
    chmod 0600 ca.key server.key
    # Replaced in one rename, so a reader never sees half a file.
    cp ca.pem "$CA_DIR/.ca.pem.tmp"
    chmod 0644 "$CA_DIR/.ca.pem.tmp"
    mv "$CA_DIR/.ca.pem.tmp" "$CA_DIR/ca.pem"
    echo "demo-dovecot: created a demo CA and a certificate for $SERVER_NAME"
}

if [ ! -s "$TLS_DIR/server.pem" ] || [ ! -s "$CA_DIR/ca.pem" ]; then
    create_tls_files
fi

if [ "$#" -gt 0 ]; then
    exec "$@"
fi
exec dovecot -F
