#!/usr/bin/env bash
# Installs what the benchmarks need and is missing: wrk, nginx, Apache httpd with
# mod_auth_openidc, redis-server (Debian packages, as root) and the test OpenID Provider's
# node_modules. Nothing is started or enabled: bench/run.py runs its own instances.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing=()
have wrk || missing+=(wrk)
have nginx || missing+=(nginx-light)
have apache2 || missing+=(apache2)
[ -e /usr/lib/apache2/modules/mod_auth_openidc.so ] || missing+=(libapache2-mod-auth-openidc)
have redis-server || missing+=(redis-server)
if ! have node || ! have npm; then missing+=(nodejs npm); fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ] || ! have apt-get; then
        echo "missing: ${missing[*]} -- install them (e.g. sudo apt-get install -y ${missing[*]})" >&2
        exit 1
    fi
    echo "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # policy-rc.d 101: the packages must not start the system nginx/apache2/redis services;
    # the benchmark runs its own on free loopback ports.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
    fi
    trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

op=tests/peers/op
if [ ! -d "$op/node_modules/oidc-provider" ]; then
    (cd "$op" && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "bench setup: ok"
