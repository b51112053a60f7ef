#!/bin/sh
# Makes what the nodes share, in ./secrets (docs/deploy.md):
#   ca.pem            the cluster's own CA (signs node certificates, nothing else)
#   node.pem node.key a node certificate every node shows on its links
#   cluster.key       the HMAC key that signs handoffs (cluster.key_file)
# Needs openssl. Keep ca.key offline; it is not needed by the nodes.
set -eu
out=${1:-secrets}
mkdir -p "$out"
cd "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
    -subj "/CN=tether cluster CA" -keyout ca.key -out ca.pem
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=tether-node" -keyout node.key -out node.csr
printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:tether-node\n' > node.ext
openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
    -extfile node.ext -out node.pem
rm -f node.csr node.ext ca.srl
openssl rand -base64 32 > cluster.key
chmod 600 node.key cluster.key ca.key
echo "made $(pwd): ca.pem node.pem node.key cluster.key (and ca.key: keep it offline)"
