"""The uplink's TLS files (edgerund/tlsfiles.py): check-config names the file that does not
load (missing, not a CA bundle, an encrypted key), and an encrypted key never stops the
process at OpenSSL's passphrase prompt, even with a terminal attached (a technician
running `edgerund run` in a shell): paho's `tls_set`, which the uplink used before, asks
for the passphrase there and waits."""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from benchmarks.peers.mosquitto import TlsFiles, make_test_pki
from edgerund.config.loader import parse_config
from edgerund.errors import ConfigError

CFG = "/etc/edgerund/edgerund.yaml"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[TlsFiles, Path]:
    d = tmp_path_factory.mktemp("pki")
    files = make_test_pki(d)
    key = serialization.load_pem_private_key(Path(files.client_key).read_bytes(), None)
    enc = d / "client-encrypted.key"
    enc.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
    )
    return files, enc


def _uplink(ca: str, cert: str, key: str, enabled: bool = True) -> str:
    return (
        "gateway:\n  id: gw1\nuplink:\n"
        f"  enabled: {'true' if enabled else 'false'}\n  host: 127.0.0.1\n"
        f"  tls:\n    ca_file: {ca}\n    cert_file: {cert}\n    key_file: {key}\n"
    )


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, CFG)
    return str(ei.value)


def test_check_config_names_the_tls_file_that_does_not_load(
    pki: tuple[TlsFiles, Path], tmp_path: Path
) -> None:
    f, encrypted = pki
    ok = parse_config(_uplink(f.ca_file, f.client_cert, f.client_key), CFG)
    assert ok.uplink.tls is not None and ok.uplink.tls.key_file == f.client_key

    msg = _error(_uplink(f.ca_file, f.client_cert, str(encrypted)))
    assert f"{CFG}:9: uplink.tls.key_file: expected a PEM certificate in" in msg
    assert "its unencrypted private key" in msg

    msg = _error(_uplink(str(tmp_path / "nope.pem"), f.client_cert, f.client_key))
    assert f"{CFG}:7: uplink.tls.ca_file: expected a PEM file" in msg and "no such file" in msg

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    msg = _error(_uplink(str(junk), f.client_cert, f.client_key))
    assert "uplink.tls.ca_file: expected PEM CA certificates in" in msg

    # a disabled uplink's files are not read
    parse_config(_uplink(str(tmp_path / "nope.pem"), "x", "y", enabled=False), CFG)


def test_an_encrypted_key_never_waits_at_the_passphrase_prompt(
    pki: tuple[TlsFiles, Path],
) -> None:
    f, encrypted = pki
    code = (
        "import sys\n"
        "from edgerund.tlsfiles import TlsFileError, client_context\n"
        "try:\n"
        "    client_context(*sys.argv[1:4])\n"
        "except TlsFileError as exc:\n"
        "    print('refused:', exc.role)\n"
        "    sys.exit(3)\n"
    )
    # the child's controlling terminal is a pseudo-terminal nobody types into
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv(
            sys.executable, [sys.executable, "-c", code, f.ca_file, f.client_cert, str(encrypted)]
        )
    out = b""
    deadline = time.monotonic() + 30
    status = None
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    out += os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    pass
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert b"pass phrase" not in out.lower(), out
        else:
            raise AssertionError(f"still waiting after 30 s: {out!r}")
    finally:
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 3, out
    assert b"refused: cert" in out
