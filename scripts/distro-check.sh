#!/usr/bin/env bash
# Slow packaging check for another distribution or architecture (not part of CI's run):
# build the .deb inside a debootstrapped root of SUITE/ARCH, then run the installation
# test (tests/packaging/test_deb.py: install, check-config, the simulated daemon with
# `edgerunctl status` and `check`, the default config as the service user, upgrades,
# remove, purge; and the package weight) in a second, clean root of the same kind.
#
#   scripts/distro-check.sh SUITE [ARCH]
#   make arm64-check     # = scripts/distro-check.sh bookworm arm64 (Raspberry Pi OS base)
#   make trixie-check    # = scripts/distro-check.sh trixie         (Debian 13, Python 3.13)
#
# A foreign ARCH runs through qemu-user-static registered in binfmt_misc with the F
# (fix-binary) flag, so the emulator is opened once on the host and works inside the
# chroot without being copied there. Needs root, debootstrap, qemu-user-static (foreign
# ARCH only), the Debian archive and PyPI. Roots are cached in ~/.cache/edgerund
# (SUITE[-ARCH]-minbase.tar, the one the test uses, and SUITE-ARCH-build-*.tar with the
# build dependencies); EDGERUND_FRESH_ROOT=1 makes them again. The result, with the date,
# goes to packaging/out/SUITE-ARCH/check.log; copy it into README's table.
# (All in one function, parsed whole before it runs: editing the file during a long run
# cannot change what the running script does.)
main() {
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

die() { echo "distro-check: $*" >&2; exit 2; }
say() { echo "distro-check: $(date -u +%H:%M:%S) $*" >&2; }

SUITE="${1:-}"
[ -n "$SUITE" ] || die "usage: scripts/distro-check.sh SUITE [ARCH]"
HOST_ARCH="$(dpkg --print-architecture)"
ARCH="${2:-$HOST_ARCH}"
MIRROR="${EDGERUND_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/edgerund"
PY="${PYTHON:-$REPO/.venv/bin/python}"
OUT="$REPO/packaging/out/$SUITE-$ARCH"
# uuid-dev: trixie's tss2-fapi.pc requires uuid.pc, which its libtss2-dev does not pull in.
BUILD_DEPS="python3 python3-venv python3-dev build-essential pkg-config libtss2-dev uuid-dev dpkg-dev binutils ca-certificates"

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
[ -x "$PY" ] || die "no Python with pytest at $PY (scripts/test.sh sets up .venv; or set PYTHON=)"

# --- emulation ----------------------------------------------------------------------------
if [ "$ARCH" != "$HOST_ARCH" ]; then
    case "$ARCH" in
        arm64) QARCH=aarch64 ;;
        *) die "no emulator mapping for $ARCH (edgerund is packaged for amd64 and arm64)" ;;
    esac
    [ -x "/usr/bin/qemu-$QARCH-static" ] || die "qemu-$QARCH-static is missing: apt-get install qemu-user-static"
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
            || die "binfmt_misc is not mounted and cannot be (a container without it needs the host to register qemu-$QARCH, or proot -q qemu-$QARCH-static, which this script does not drive)"
    fi
    entry="/proc/sys/fs/binfmt_misc/qemu-$QARCH"
    if [ ! -e "$entry" ]; then
        conf="/usr/lib/binfmt.d/qemu-$QARCH.conf"
        [ -f "$conf" ] || die "$conf is missing (qemu-user-static)"
        cat "$conf" > /proc/sys/fs/binfmt_misc/register || die "cannot register qemu-$QARCH in binfmt_misc"
    fi
    grep -q '^flags:.*F' "$entry" || die "$entry is registered without the F flag: the emulator would not be found inside the chroot"
    grep -q '^enabled' "$entry" || die "$entry is disabled"
    say "emulating $ARCH with $(sed -n 's/^interpreter //p' "$entry") (binfmt_misc, flags $(sed -n 's/^flags: //p' "$entry"))"
fi

WORK="$(mktemp -d /var/tmp/edgerund-distro.XXXXXX)"
MOUNTED=()
cleanup() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" 2>/dev/null || true
    done
    MOUNTED=()
    # Never delete through a mount that is still there.
    if ! grep -q " $WORK" /proc/self/mountinfo; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

mount_root() {  # /proc, /sys (ro) and a private /dev, as the installation test does
    local r="$1"
    mount -t proc proc "$r/proc"; MOUNTED+=("$r/proc")
    # No /sys under emulation: onnxruntime's CPU probe (cpuinfo) reads the host's CPU
    # topology there and crashes qemu-aarch64 7.2 (SIGSEGV at `import onnxruntime`);
    # without /sys it logs a warning and runs with generic kernels.
    if [ "$ARCH" = "$HOST_ARCH" ]; then mount -t sysfs -o ro sysfs "$r/sys"; MOUNTED+=("$r/sys"); fi
    mount -t tmpfs -o mode=755,size=16m tmpfs "$r/dev"; MOUNTED+=("$r/dev")
    mknod -m 666 "$r/dev/null" c 1 3; mknod -m 666 "$r/dev/zero" c 1 5
    mknod -m 666 "$r/dev/random" c 1 8; mknod -m 666 "$r/dev/urandom" c 1 9
    mknod -m 666 "$r/dev/tty" c 5 0
    mkdir -p "$r/dev/pts" "$r/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$r/dev/pts"; MOUNTED+=("$r/dev/pts")
    ln -s pts/ptmx "$r/dev/ptmx"
    mount -t tmpfs -o mode=1777,size=256m tmpfs "$r/dev/shm"; MOUNTED+=("$r/dev/shm")
    ln -s /proc/self/fd "$r/dev/fd"
    cp /etc/resolv.conf "$r/etc/resolv.conf"
}
cleanup_mounts_only() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTED[$i]}" || umount -l "${MOUNTED[$i]}"
    done
    MOUNTED=()
}
# pip in the build root trusts what this host trusts (a TLS-inspecting proxy's CA, say):
# the host's CA bundle, or EDGERUND_BUILD_CA, is handed to it as PIP_CERT.
HOST_CA="${EDGERUND_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
in_root() {
    local r="$1"; shift
    local ca=()
    if [ -f "$r/etc/edgerund-build-ca.pem" ]; then ca=(PIP_CERT=/etc/edgerund-build-ca.pem); fi
    chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "${ca[@]}" "$@"
}

# --- the clean root (shared with the test: same file name and mark) -----------------------
mkdir -p "$CACHE" "$OUT"
if [ "$ARCH" = "$HOST_ARCH" ]; then
    BASE_TAR="$CACHE/$SUITE-minbase.tar"
    ROOT_ID="debootstrap --variant=minbase --include=systemd $SUITE"
    ARCH_OPT=()
else
    BASE_TAR="$CACHE/$SUITE-$ARCH-minbase.tar"
    ROOT_ID="debootstrap --arch=$ARCH --variant=minbase --include=systemd $SUITE"
    ARCH_OPT=("--arch=$ARCH")
fi
if [ ! -f "$BASE_TAR" ] || [ "${EDGERUND_FRESH_ROOT:-}" = 1 ]; then
    say "debootstrap ${ARCH_OPT[*]} --variant=minbase --include=systemd $SUITE (minutes; more under emulation)"
    mkdir "$WORK/base"
    debootstrap "${ARCH_OPT[@]}" --variant=minbase --include=systemd "$SUITE" "$WORK/base" "$MIRROR" \
        > "$OUT/debootstrap.log" 2>&1 || { tail -n 20 "$OUT/debootstrap.log" >&2; die "debootstrap failed"; }
    echo "$ROOT_ID" > "$WORK/base/etc/edgerund-test-root"
    tar --numeric-owner -cpf "$BASE_TAR.tmp" -C "$WORK/base" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$WORK/base"
fi

# --- the build root: the clean root plus the build dependencies ----------------------------
BUILD_TAR="$CACHE/$SUITE-$ARCH-build-$(echo "$BUILD_DEPS" | sha256sum | cut -c1-8).tar"
B="$WORK/build"
mkdir "$B"
if [ ! -f "$BUILD_TAR" ] || [ "${EDGERUND_FRESH_ROOT:-}" = 1 ]; then
    say "build root: apt-get install $BUILD_DEPS"
    tar --numeric-owner -xpf "$BASE_TAR" -C "$B"
    mount_root "$B"
    in_root "$B" apt-get -o Acquire::Retries=3 update -q >/dev/null
    in_root "$B" apt-get -o Acquire::Retries=3 install -y -q --no-install-recommends $BUILD_DEPS \
        > "$OUT/build-deps.log" 2>&1 || { tail -n 20 "$OUT/build-deps.log" >&2; die "build dependencies"; }
    in_root "$B" apt-get clean
    cleanup_mounts_only
    tar --numeric-owner -cpf "$BUILD_TAR.tmp" -C "$B" . && mv "$BUILD_TAR.tmp" "$BUILD_TAR"
else
    tar --numeric-owner -xpf "$BUILD_TAR" -C "$B"
fi

# --- build the .deb in it ----------------------------------------------------------------
say "building the .deb in the $SUITE/$ARCH root ($(in_root "$B" python3 --version 2>&1))"
mkdir -p "$B/src" "$B/out"
if [ -f "$HOST_CA" ]; then cp "$HOST_CA" "$B/etc/edgerund-build-ca.pem"; fi
git ls-files -co --exclude-standard -z | grep -zv '^packaging/out/' \
    | tar --null -T - -cf - | tar -C "$B/src" -xf -
mount_root "$B"
t0=$(date +%s)
in_root "$B" /src/packaging/build-deb.sh --out /out --compress gzip:1 > "$OUT/build.log" 2>&1 \
    || { tail -n 30 "$OUT/build.log" >&2; die "the build failed in the $SUITE/$ARCH root (log: $OUT/build.log)"; }
cleanup_mounts_only
build_s=$(( $(date +%s) - t0 ))
DEB="$(ls "$B"/out/edgerund_*_"$ARCH".deb)"
cp "$DEB" "$OUT/"
DEB="$OUT/$(basename "$DEB")"
rm -rf "$B"
say "built $(basename "$DEB") in ${build_s} s"

# --- the installation test in a clean root of the same kind ---------------------------------
say "installation test (tests/packaging/test_deb.py) in a clean $SUITE/$ARCH root"
t0=$(date +%s)
set +e
EDGERUND_SUITE="$SUITE" EDGERUND_ARCH="$ARCH" EDGERUND_DEB="$DEB" PYTHONPATH="$REPO" \
    "$PY" -m pytest -p no:cacheprovider -q -rA -o addopts="" \
    tests/packaging/test_deb.py -k "install_upgrade_remove_purge or package_weight" \
    > "$OUT/test.log" 2>&1
rc=$?
set -e
test_s=$(( $(date +%s) - t0 ))
weight="$(grep -o 'package weight.*' "$OUT/test.log" | head -n1 || true)"
result="$(tail -n 1 "$OUT/test.log")"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "suite/arch: $SUITE $ARCH (host $HOST_ARCH)"
    echo "python: $(dpkg-deb -f "$DEB" Depends | grep -o 'python3 (>= [0-9.]*)')"
    echo "build: ${build_s} s; test: ${test_s} s"
    echo "$weight"
    echo "result: $result (exit $rc)"
} | tee "$OUT/check.log"
exit "$rc"
}
main "$@"
