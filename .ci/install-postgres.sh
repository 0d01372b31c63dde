#!/usr/bin/env bash
# .ci/install-postgres.sh
# Installs Debian's PostgreSQL server when missing, for the test that shares one Optuna study
# between two sweep workers through PostgreSQL (tests/test_sweep.py). Idempotent: returns at once
# when initdb is already there. Where it cannot install (no apt-get, no root, no network) it says
# so and exits 0: that test is then skipped with the reason.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 \
    || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
skip() { echo "install-postgres: $1; the PostgreSQL sweep test will be skipped" >&2; exit 0; }
command -v apt-get >/dev/null 2>&1 || skip "no apt-get (not Debian/Ubuntu)"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo -n true 2>/dev/null || skip "not root and no password-less sudo"
    sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq || skip "apt-get update failed"
"${sudo[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
    || skip "apt-get install postgresql failed"
echo "install-postgres: installed $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
