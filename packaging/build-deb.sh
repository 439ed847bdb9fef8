#!/usr/bin/env bash
# Build edgerund_VERSION_ARCH.deb: a self-contained virtualenv under /opt/edgerund built
# with the *system* Python (the one the package depends on), so nothing is pip-installed
# on the gateway. Run on the target distribution and architecture (a Pi / Jetson, or an
# arm64 chroot/container of Raspberry Pi OS bookworm or Ubuntu 24.04 for arm64 builds).
#
#   packaging/build-deb.sh [--version V] [--out DIR]
#
# Needs: dpkg-dev, python3-venv, python3-dev, build-essential, pkg-config, libtss2-dev
# (tpm2-pytss builds against it), and network access to PyPI for the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VERSION=""
OUT="$REPO/packaging/out"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) VERSION="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done

die() { echo "build-deb: $*" >&2; exit 2; }

ARCH="$(dpkg --print-architecture)"
case "$ARCH" in
    amd64|arm64) ;;
    *) die "unsupported architecture '$ARCH': edgerund is packaged for amd64 and arm64 (onnxruntime publishes no wheels for others, e.g. armhf on 32-bit Raspberry Pi OS)" ;;
esac

PY=/usr/bin/python3
[ -x "$PY" ] || die "no $PY: install python3 (the package depends on the distribution's Python)"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "unsupported Python $PYVER at $PY: edgerund needs >= 3.11 (Debian 12 bookworm, Raspberry Pi OS bookworm, Ubuntu 24.04)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "python3-venv is missing: apt-get install python3-venv"
PYNEXT="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')"

[ -n "$VERSION" ] || VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
[ -f models/reference/manifest.json ] || die "models/reference/manifest.json is missing: run python models/build.py"

STAGE="$OUT/stage-$ARCH"
VENV_FINAL=/opt/edgerund
VENV="$STAGE$VENV_FINAL"
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$OUT"

echo "build-deb: virtualenv with $PY ($PYVER) for $ARCH" >&2
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
"$VENV/bin/python" -m pip install -q "$REPO[speed,tpm]"
# Relocate: scripts were written with the staging path in their shebangs.
grep -rlI --null "$STAGE" "$VENV/bin" | xargs -0 -r sed -i "s#$STAGE##g"
sed -i "s#$STAGE##g" "$VENV/pyvenv.cfg"
# Byte code is compiled on the gateway by postinst (paths and Python must match there).
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$VENV/lib/python$PYVER/site-packages/pip" "$VENV/lib/python$PYVER/site-packages/pip-"*

install -d "$STAGE/usr/bin"
ln -s "$VENV_FINAL/bin/edgerund" "$STAGE/usr/bin/edgerund"
ln -s "$VENV_FINAL/bin/edgerunctl" "$STAGE/usr/bin/edgerunctl"
install -D -m 0644 systemd/edgerund.service "$STAGE/lib/systemd/system/edgerund.service"
install -D -m 0644 systemd/edgerund.sysusers "$STAGE/usr/lib/sysusers.d/edgerund.conf"
install -D -m 0644 systemd/edgerund.tmpfiles "$STAGE/usr/lib/tmpfiles.d/edgerund.conf"
install -D -m 0640 packaging/edgerund.yaml "$STAGE/etc/edgerund/edgerund.yaml"
install -d "$STAGE/usr/share/edgerund/models/reference"
cp -a models/reference/. "$STAGE/usr/share/edgerund/models/reference/"
install -D -m 0644 README.md "$STAGE/usr/share/doc/edgerund/README.md"
for d in docs/*.md; do install -D -m 0644 "$d" "$STAGE/usr/share/doc/edgerund/$d"; done
install -D -m 0644 packaging/debian/copyright "$STAGE/usr/share/doc/edgerund/copyright"
install -d "$STAGE/usr/share/man/man8" "$STAGE/usr/share/man/man1"
"$VENV/bin/python" packaging/manpage.py edgerund 8 | gzip -9n > "$STAGE/usr/share/man/man8/edgerund.8.gz"
"$VENV/bin/python" packaging/manpage.py edgerunctl 1 | gzip -9n > "$STAGE/usr/share/man/man1/edgerunctl.1.gz"
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +

# Runtime libraries of compiled extensions (libtss2 for tpm2-pytss), as Debian packages.
shlib_deps="$(find "$VENV" -name '*.so*' -type f -print0 | xargs -0 -r ldd 2>/dev/null \
    | awk '/=> \// {print $3}' | sort -u | grep -E 'libtss2' \
    | xargs -r dpkg -S 2>/dev/null | cut -d: -f1 | sort -u | paste -sd, - | sed 's/,/, /g')"
depends="python3 (>= $PYVER), python3 (<< $PYNEXT), libc6"
[ -n "$shlib_deps" ] && depends="$depends, $shlib_deps"

installed_kb="$(du -sk "$STAGE" --exclude=DEBIAN | cut -f1)"
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@DEPENDS@/$depends/" \
    -e "s/@SIZE@/$installed_kb/" packaging/debian/control.in > "$STAGE/DEBIAN/control"
echo /etc/edgerund/edgerund.yaml > "$STAGE/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$STAGE/DEBIAN/$s"
done

DEB="$OUT/edgerund_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
rm -rf "$STAGE"
echo "$DEB"
