#!/usr/bin/env bash
# Shared set-up for scripts/simulate.sh and scripts/test.sh: Debian packages, a virtualenv
# in .venv, and the project installed into it (editable). Idempotent: a second run only
# checks. Works as root or through sudo on Debian 12 / Ubuntu 24.04 (and Raspberry Pi OS).
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-run}"   # run | test
apt_run=(python3 python3-venv python3-dev build-essential pkg-config)
apt_test=(mosquitto mosquitto-clients swtpm swtpm-tools libtss2-dev tpm2-tools systemd
          debootstrap tmux dpkg-dev fakeroot postgresql strace)
pkgs=("${apt_run[@]}")
[ "$profile" = test ] && pkgs+=("${apt_test[@]}")

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup: edgerund needs Python >= 3.11; $("$PY" --version 2>&1) found (set PYTHON=...)" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
extras="speed"
[ "$profile" = test ] && extras="speed,tpm,test"
stamp=".venv/.edgerund-installed-$profile-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
fi
