#!/usr/bin/env bash
# Build edgerund_VERSION_ARCH.deb: a self-contained virtualenv under /opt/edgerund built
# with the *system* Python (the one the package depends on), so nothing is pip-installed
# on the gateway. Run on the target distribution and architecture (a Pi / Jetson, or an
# arm64 chroot/container of Raspberry Pi OS bookworm or Ubuntu 24.04 for arm64 builds):
# the venv's compiled extensions are built for, and linked against, that system.
#
#   packaging/build-deb.sh [--version V] [--out DIR] [--compress TYPE:LEVEL]
#
# --compress defaults to xz:9 (the smallest .deb: 1.4% under xz:6, which matters against
# the 25 MB budget; xz needs ~700 MB of memory at this level); the installation test
# uses gzip:1, which builds in a tenth of the time, and repacks to measure.
#
# Needs: dpkg-dev, python3-venv, python3-dev, build-essential, pkg-config, libtss2-dev
# (tpm2-pytss is compiled from source against it; on trixie also uuid-dev, which its
# tss2-fapi.pc requires), binutils (strip), and network access to PyPI.
#
# Steps: check the build host -> copy the sources -> venv with /usr/bin/python3 -> pip
# install edgerund[speed,tpm] (tpm2-pytss from source) -> remove pip/setuptools/wheel ->
# relocate the staging path out of scripts -> files of the package -> Depends from the
# ELF dependencies of every shared object (dpkg-shlibdeps), cross-checked with ldd for
# libtss2 -> dpkg-deb.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VERSION=""
OUT="$REPO/packaging/out"
COMPRESS="xz:9"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) VERSION="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --compress) COMPRESS="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done

die() { echo "build-deb: $*" >&2; exit 2; }
say() { echo "build-deb: $*" >&2; }
case "$COMPRESS" in
    xz:[0-9]|gzip:[0-9]|none:0) ;;
    *) die "--compress expects xz:LEVEL, gzip:LEVEL or none:0, got '$COMPRESS'" ;;
esac

# --- the build host --------------------------------------------------------------------
command -v dpkg >/dev/null || die "not a Debian-based system (no dpkg): build on the target distribution"
ARCH="$(dpkg --print-architecture)"
case "$ARCH" in
    amd64|arm64) ;;
    *) die "unsupported architecture '$ARCH': edgerund is packaged for amd64 and arm64 (onnxruntime publishes no wheels for others, e.g. armhf on 32-bit Raspberry Pi OS)" ;;
esac

PY=/usr/bin/python3
[ -x "$PY" ] || die "no $PY: install python3 (the package depends on the distribution's Python)"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
    || die "$PY does not run"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "unsupported Python $PYVER at $PY: edgerund needs >= 3.11 (Debian 12 bookworm, Raspberry Pi OS bookworm, Ubuntu 24.04)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "python3-venv is missing: apt-get install python3-venv"
PYNEXT="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')"
for tool in dpkg-deb dpkg-shlibdeps; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install dpkg-dev"
done
command -v pkg-config >/dev/null || die "pkg-config is missing: apt-get install pkg-config"
pkg-config --print-errors --exists tss2-esys tss2-fapi tss2-rc tss2-mu tss2-tctildr \
    || die "the TSS2 development files are missing or incomplete (tpm2-pytss is compiled against them): apt-get install libtss2-dev uuid-dev"
[ -e "/usr/include/python$PYVER/Python.h" ] || die "Python.h is missing for $PYVER: apt-get install python3-dev"

[ -n "$VERSION" ] || VERSION="$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
[ -f models/reference/manifest.json ] || die "models/reference/manifest.json is missing: run python models/build.py"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAGE="$OUT/stage-$ARCH"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/edgerund-deb.XXXXXX")"
trap 'rm -rf "$WORK" "$STAGE"' EXIT
VENV_FINAL=/opt/edgerund
VENV="$STAGE$VENV_FINAL"
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN"

# --- the virtualenv --------------------------------------------------------------------
# Build from a clean copy of the sources: an in-tree build would leave build/ in the
# checkout, and setuptools' stale build/lib could ship modules deleted since.
mkdir -p "$WORK/src"
tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml README.md edgerund drivers \
    models/reference/manifest.json models/reference/model.onnx models/reference/golden.npz \
    models/dev-keys/keyring.dev.json | tar -C "$WORK/src" -xf -

say "virtualenv with $PY ($PYVER) for $ARCH"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# tpm2-pytss from source, so it links the distribution's libtss2 (which the package
# then depends on) rather than anything a binary wheel might carry.
"$VENV/bin/python" -m pip install -q --no-binary tpm2-pytss "$WORK/src[speed,tpm]"
"$VENV/bin/python" -m pip freeze --all --exclude-editable > "$WORK/python-packages.txt"
"$VENV/bin/python" -c 'import tpm2_pytss, onnxruntime, uvloop, gpiod, edgerund, drivers' \
    || die "the virtualenv does not import its own packages"
# The wheel's copy of the reference model and dev keyring (for pip installs): the
# package ships them once, in /usr/share/edgerund, where share_dir() then finds them.
rm -rf "$VENV/share/edgerund"
# No pip on the gateway: nothing is ever installed there.
"$VENV/bin/python" -m pip uninstall -q -y pip setuptools wheel
rm -f "$VENV"/bin/pip* "$VENV"/bin/wheel "$VENV"/bin/Activate.ps1

# --- weight: what the gateway never runs --------------------------------------------
# Gateways update over cellular links and run from SD cards (issue #17: 48 MB .deb and
# 211 MB installed before this step). Pruned, each because nothing the daemon imports
# reaches it:
#  - test suites, C/Cython sources and headers, static archives, type stubs of compiled
#    parts: build- and test-time only;
#  - numpy's f2py and distutils (Fortran bindings generator, build tooling);
#  - zstandard's CFFI backend (the C backend is the default and the one imported);
#  - onnxruntime's libonnxruntime.so (the C API for other programs: the Python module
#    links the runtime statically), and its transformers / quantization / tools /
#    datasets / backend packages (model-building tools, which import onnx and protobuf);
#  - protobuf (and its upb extension), which only those onnxruntime tools import;
#  - numpy's lazily imported polynomial and testing packages and random's Cython
#    examples (nothing in the daemon uses them);
#    (numpy.ma stays: np.unique, which np.percentile uses, calls it);
#  - pygments and markdown-it, which rich needs only for syntax highlighting, Markdown
#    and its pretty tracebacks: structlog then prints plain tracebacks on a terminal
#    (under systemd the log is JSON lines anyway); rich's tables and live view stay.
# Then every shared object is stripped of debug symbols (--strip-unneeded, what dh_strip
# does for Debian's own packages). The smoke test after this proves the rest imports
# and runs.
SP="$(echo "$VENV"/lib/python3*/site-packages)"
[ -d "$SP" ] || die "no site-packages in the venv"
find "$SP" -depth -type d \( -name tests -o -name testing_data \) -path '*/numpy/*' -exec rm -rf {} +
find "$SP" -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.c' \
    -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' -o -name '*.a' \) -delete
rm -rf "$SP"/numpy/f2py "$SP"/numpy/distutils "$SP"/numpy/_core/include "$SP"/numpy/_core/lib \
    "$SP"/numpy/_pyinstaller "$SP"/numpy/typing/tests
# numpy's test-only extension modules (nothing outside numpy's tests imports them) and
# type stubs anywhere (never imported).
rm -f "$SP"/numpy/_core/_simd.*.so "$SP"/numpy/_core/_multiarray_tests.*.so \
    "$SP"/numpy/_core/_umath_tests.*.so "$SP"/numpy/_core/_rational_tests.*.so \
    "$SP"/numpy/_core/_struct_ufunc_tests.*.so "$SP"/numpy/_core/_operand_flag_tests.*.so \
    "$SP"/numpy/conftest.py
find "$SP" -type f -name '*.pyi' -delete
rm -f "$SP"/zstandard/_cffi.*.so "$SP"/zstandard/backend_cffi.py
# PyYAML's libyaml binding: the config loader uses the pure-Python SafeLoader (it needs
# the node tree's line numbers), and yaml/__init__ imports the binding only if present.
rm -f "$SP"/yaml/_yaml.*.so "$SP"/_yaml/*.so
rm -f "$SP"/onnxruntime/capi/libonnxruntime.so*
rm -rf "$SP"/onnxruntime/transformers "$SP"/onnxruntime/quantization "$SP"/onnxruntime/tools \
    "$SP"/onnxruntime/datasets "$SP"/onnxruntime/backend
rm -rf "$SP"/google "$SP"/protobuf-*.dist-info
# Install-time dependencies nothing imports at run time: flatbuffers and packaging (for
# onnxruntime's removed tools), and cffi's Python side with pycparser (they parse C
# declarations; the compiled tpm2-pytss and cryptography bindings load _cffi_backend,
# which stays).
rm -rf "$SP"/flatbuffers "$SP"/flatbuffers-*.dist-info "$SP"/packaging "$SP"/packaging-*.dist-info \
    "$SP"/pycparser "$SP"/pycparser-*.dist-info "$SP"/cffi "$SP"/cffi-*.dist-info
rm -rf "$SP"/numpy/polynomial "$SP"/numpy/testing "$SP"/numpy/random/_examples
rm -rf "$SP"/pygments "$SP"/pygments-*.dist-info "$SP"/markdown_it "$SP"/markdown_it_py-*.dist-info \
    "$SP"/mdurl "$SP"/mdurl-*.dist-info "$SP"/bin/pygmentize "$VENV"/bin/pygmentize "$VENV"/bin/markdown-it
command -v strip >/dev/null || die "strip is missing: apt-get install binutils"
# Only objects that still carry a symbol table, and never the libraries auditwheel
# vendored into *.libs/ (already stripped, and rewritten by patchelf: binutils' strip
# breaks their segment layout - "ELF load command address/offset not page-aligned").
while IFS= read -r -d '' so; do
    case "$so" in */*.libs/*) continue ;; esac
    if readelf -S -W "$so" 2>/dev/null | grep -q ' \.symtab '; then
        strip --strip-unneeded "$so"
    fi
done < <(find "$VENV" -type f -name '*.so*' -print0)
# Smoke test of the pruned tree: every daemon module imports, a session runs the
# reference model, the zstandard and crypto backends work.
"$VENV/bin/python" -B - "$REPO/models/reference" <<'PY' || die "the pruned virtualenv does not work"
import importlib, pkgutil, sys
import edgerund, drivers
for pkg in (edgerund, drivers):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.endswith(".__main__"):  # (that one runs the CLI)
            importlib.import_module(m.name)
import numpy as np, zstandard, uvloop, tpm2_pytss, gpiod
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgerund.inference.runner import ModelRunner
assert zstandard.decompress(zstandard.compress(b"x" * 1000)) == b"x" * 1000
Ed25519PrivateKey.generate().sign(b"m")
assert bytes(tpm2_pytss.TPM2B_DIGEST(b"abc")) == b"abc"  # the cffi binding at work
r = ModelRunner.load(sys.argv[1], warmup_runs=2)
import io, structlog
from rich.console import Console
from rich.table import Table
Console(file=io.StringIO()).print(Table("a", "b"))
try:
    1 / 0
except ZeroDivisionError:
    out = structlog.dev.ConsoleRenderer(colors=False)(None, "error", {"event": "x", "exc_info": sys.exc_info()})
    assert "ZeroDivisionError" in out, out
print("smoke:", r, np.__version__, file=sys.stderr)
PY
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +

# Relocate: scripts and pyvenv.cfg were written with the staging path.
grep -rlI --null "$STAGE" "$VENV/bin" | xargs -0 -r sed -i "s#$STAGE##g"
sed -i "s#$STAGE##g" "$VENV/pyvenv.cfg"
left="$(grep -rlI "$STAGE" "$VENV" || true)"
[ -z "$left" ] || die "the staging path is still written in: $left"
head -n1 "$VENV/bin/edgerund" | grep -q "^#!$VENV_FINAL/bin/python" \
    || die "unexpected shebang in bin/edgerund: $(head -n1 "$VENV/bin/edgerund")"
# Byte code is compiled on the gateway by postinst (and removed by prerm), so dpkg's
# file list stays the source files.
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +

# --- the files of the package ----------------------------------------------------------
install -d "$STAGE/usr/bin"
ln -s "$VENV_FINAL/bin/edgerund" "$STAGE/usr/bin/edgerund"
ln -s "$VENV_FINAL/bin/edgerunctl" "$STAGE/usr/bin/edgerunctl"
install -D -m 0644 systemd/edgerund.service "$STAGE/lib/systemd/system/edgerund.service"
install -D -m 0644 systemd/edgerund.sysusers "$STAGE/usr/lib/sysusers.d/edgerund.conf"
install -D -m 0644 systemd/edgerund.tmpfiles "$STAGE/usr/lib/tmpfiles.d/edgerund.conf"
install -D -m 0640 packaging/edgerund.yaml "$STAGE/etc/edgerund/edgerund.yaml"
# The reference model, without its fp32 twin (a benchmark's baseline; the manifest names
# it as optional, and the daemon runs the int8 model).
install -d "$STAGE/usr/share/edgerund/models/reference"
for f in manifest.json model.onnx golden.npz; do
    install -m 0644 "models/reference/$f" "$STAGE/usr/share/edgerund/models/reference/$f"
done
# The simulator's DEVELOPMENT keyring (public keys only; the private key is never packaged).
# Only the shipped simulated config refers to it; production keyrings live in /etc/edgerund.
install -D -m 0644 models/dev-keys/keyring.dev.json \
    "$STAGE/usr/share/edgerund/models/dev-keys/keyring.dev.json"
install -D -m 0644 README.md "$STAGE/usr/share/doc/edgerund/README.md"
for d in docs/*.md; do
    [ -e "$d" ] && install -D -m 0644 "$d" "$STAGE/usr/share/doc/edgerund/$d"
done
install -D -m 0644 packaging/debian/copyright "$STAGE/usr/share/doc/edgerund/copyright"
# The real-time scheduling drop-in, an example: not enabled by default (README).
install -D -m 0644 systemd/realtime.conf "$STAGE/usr/share/doc/edgerund/examples/realtime.conf"
install -m 0644 "$WORK/python-packages.txt" "$STAGE/usr/share/doc/edgerund/python-packages.txt"
install -d "$STAGE/usr/share/man/man8" "$STAGE/usr/share/man/man1"
"$VENV/bin/python" -B packaging/manpage.py edgerund 8 | gzip -9n > "$STAGE/usr/share/man/man8/edgerund.8.gz"
"$VENV/bin/python" -B packaging/manpage.py edgerunctl 1 | gzip -9n > "$STAGE/usr/share/man/man1/edgerunctl.1.gz"
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +
# The shipped config must be valid as shipped (against the models it names).
EDGERUND_SHARE="$STAGE/usr/share/edgerund" "$VENV/bin/python" -B -m edgerund.cli check-config \
    -c packaging/edgerund.yaml >&2 || die "packaging/edgerund.yaml is not valid"
find "$VENV" -name __pycache__ -type d -prune -exec rm -rf {} +

# --- Depends ---------------------------------------------------------------------------
# dpkg-shlibdeps maps every NEEDED library of every shared object to the package and
# minimum version that provides it (libc6, libstdc++6, the libtss2 libraries tpm2-pytss
# links, ...). Libraries the wheels carry themselves (numpy.libs, ...) are found through
# their RPATH and belong to no package: --ignore-missing-info. It wants a source tree.
mapfile -d '' sos < <(find "$VENV" -type f -name '*.so*' -print0)
mkdir -p "$WORK/shlibs/debian"
printf 'Source: edgerund\n\nPackage: edgerund\nArchitecture: any\n' > "$WORK/shlibs/debian/control"
shlibs="$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info "${sos[@]}" 2>"$WORK/shlibdeps.log" \
    | sed -n 's/^shlibs:Depends=//p')" || { cat "$WORK/shlibdeps.log" >&2; die "dpkg-shlibdeps failed"; }
[ -n "$shlibs" ] || { cat "$WORK/shlibdeps.log" >&2; die "dpkg-shlibdeps found no dependencies"; }
# Cross-check with ldd: every libtss2 library the TPM binding links directly (its
# NEEDED entries; the rest come in through those libraries' own packages) must resolve,
# and come from a package now in Depends. ldd may print /lib/... on merged-/usr
# systems, where dpkg knows /usr/lib/...
tss_so="$(find "$VENV" -path '*tpm2_pytss*' -name '*.so' -type f | head -n1)"
[ -n "$tss_so" ] || die "tpm2_pytss has no compiled extension in the venv"
if ldd "$tss_so" | grep -q 'not found'; then
    die "$tss_so has unresolved libraries: $(ldd "$tss_so" | grep 'not found' | tr -s ' \t\n' ' ')"
fi
needed="$(readelf -d "$tss_so" | sed -n 's/.*(NEEDED).*\[\(libtss2[^]]*\)\]/\1/p')"
[ -n "$needed" ] || die "$tss_so links no libtss2 library (was tpm2-pytss built against libtss2-dev?)"
tss_libs="$(for n in $needed; do ldd "$tss_so" | awk -v n="$n" '$1 == n {print $3}'; done)"
say "tpm2-pytss links: $(echo "$tss_libs" | tr "\n" " ")"
for lib in $tss_libs; do
    real="$(readlink -f "$lib")"
    pkg=""
    for cand in "$lib" "$real" "/usr${lib#/usr}" "/usr${real#/usr}"; do
        pkg="$(dpkg -S "$cand" 2>/dev/null | head -n1 | cut -d: -f1)" && [ -n "$pkg" ] && break
    done
    [ -n "$pkg" ] || die "no Debian package owns $lib (needed by tpm2-pytss)"
    case ", $shlibs" in
        *", $pkg "*|*", $pkg,"*|*", $pkg") ;;
        *) die "$pkg (provides $lib for tpm2-pytss) is missing from Depends: $shlibs" ;;
    esac
done
# /usr/bin/python3 of this minor version (the venv's interpreter); procps for /bin/kill
# in the unit's ExecReload=.
depends="python3 (>= $PYVER), python3 (<< $PYNEXT), procps, $shlibs"
say "Depends: $depends"

installed_kb="$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)"
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@DEPENDS@/$depends/" \
    -e "s/@SIZE@/$installed_kb/" packaging/debian/control.in > "$STAGE/DEBIAN/control"
echo /etc/edgerund/edgerund.yaml > "$STAGE/DEBIAN/conffiles"
for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$STAGE/DEBIAN/$s"
done

DEB="$OUT/edgerund_${VERSION}_${ARCH}.deb"
say "dpkg-deb $DEB (${installed_kb} KiB installed)"
dpkg-deb --root-owner-group -Z"${COMPRESS%%:*}" -z"${COMPRESS#*:}" --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
