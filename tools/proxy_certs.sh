#!/bin/sh
# Make the files `search proxy` needs for TLS and its token (git-ignored under secrets/):
#   tools/proxy_certs.sh DIR NAME...    NAME: the proxy's host names and IPs, as clients write
#                                       them in grpc://NAME:13000 (compose: proxy; k8s: search-proxy)
# In DIR (existing files are kept, never overwritten):
#   proxy_ca.pem                   the CA; clients verify the proxy with it ($SEARCH_PROXY_TLS_CA),
#                                  and the proxy checks client certificates with it (--tls-client-ca)
#   proxy_ca.key                   the CA's key: keep it off the servers
#   proxy_cert.pem, proxy_key.pem  the proxy's certificate and key (--tls-cert, --tls-key)
#   proxy_client_cert.pem, proxy_client_key.pem
#                                  a client certificate for the workers (mutual TLS, optional)
#   proxy_token                    the shared token (--token-file / $SEARCH_PROXY_TOKEN_FILE)
set -eu
if [ $# -lt 2 ]; then
  echo "usage: $0 DIR NAME..." >&2
  exit 2
fi
dir=$1
shift
umask 077
mkdir -p "$dir"
cd "$dir"
san=""
for name in "$@"; do
  case $name in
    *[!0-9.:]*) san="$san,DNS:$name" ;;
    *) san="$san,IP:$name" ;;
  esac
done
quiet() { "$@" >/dev/null 2>&1 || { echo "$0: failed: $*" >&2; exit 1; }; }
if [ ! -e proxy_ca.pem ]; then
  quiet openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=search proxy CA" \
    -keyout proxy_ca.key -out proxy_ca.pem
fi
sign() {  # sign NAME CN [EXTFILE]: NAME_cert.pem and NAME_key.pem, signed by the CA
  if [ ! -e "$1_cert.pem" ]; then
    quiet openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1_key.pem" -out "$1.csr"
    quiet openssl x509 -req -in "$1.csr" -CA proxy_ca.pem -CAkey proxy_ca.key -CAcreateserial \
      -days 825 -out "$1_cert.pem" ${3:+-extfile "$3"}
    rm -f "$1.csr"
  fi
}
printf 'subjectAltName=%s\n' "${san#,}" > proxy_san.ext
sign proxy "$1" proxy_san.ext
sign proxy_client search-worker
rm -f proxy_san.ext proxy_ca.srl
[ -e proxy_token ] || openssl rand -hex 24 > proxy_token
echo "$dir: proxy_ca.pem proxy_cert.pem proxy_key.pem proxy_client_cert.pem proxy_client_key.pem proxy_token (for ${san#,})"
