"""A real mosquitto on a free loopback port (the test fixtures wrap it: tests/fixtures).

`mosquitto` yields a `Broker` (host, port, `stop()`, `start()` on the same port, `kill()`)
whose persistence lives in a tmp dir, so a restart keeps sessions and queued messages,
which is what outage tests need. `mosquitto_tls` adds a TLS listener that requires a
client certificate, with a throw-away CA made with `cryptography` (`.tls_port`,
`.ca_file`, `.client_cert`, `.client_key`). The broker is stopped by PID (SIGTERM, then
SIGKILL), never by name. In CI a missing mosquitto fails the test.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers.binaries import free_port


@dataclass
class TlsFiles:
    ca_file: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_test_pki(d: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k: ec.EllipticCurvePrivateKey, p: Path) -> None:
        p.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("edgerund test CA"))
        .issuer_name(name("edgerund test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            import ipaddress

            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(ca_key, hashes.SHA256()), k

    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    srv, srv_key = leaf("localhost", True)
    cli, cli_key = leaf("edgerund-test-client", False)
    (d / "server.pem").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    write_key(srv_key, d / "server.key")
    (d / "client.pem").write_bytes(cli.public_bytes(serialization.Encoding.PEM))
    write_key(cli_key, d / "client.key")
    return TlsFiles(
        str(d / "ca.pem"),
        str(d / "server.pem"),
        str(d / "server.key"),
        str(d / "client.pem"),
        str(d / "client.key"),
    )


@dataclass
class Broker:
    binary: str
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    tls_port: int | None = None
    # a mosquitto_passwd file: clients must log in (no anonymous access)
    password_file: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ca_file(self) -> str | None:
        return self.tls.ca_file if self.tls else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        persist = self.workdir / "persist"
        persist.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {self.host}",
            # Started as root, mosquitto would drop to user `mosquitto`, which cannot
            # write the persistence file in the test's tmp dir: stay who we are.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            *(
                ["allow_anonymous true"]
                if self.password_file is None
                else ["allow_anonymous false", f"password_file {self.password_file}"]
            ),
            "persistence true",
            f"persistence_location {persist}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if self.tls is not None and self.tls_port is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
            ]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        conf = self._write_config()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise RuntimeError(
                    f"mosquitto exited with {self.proc.returncode}: {err}\n{log[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(
            f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s} s"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM by PID (mosquitto saves its persistence file), SIGKILL if it hangs."""
        p = self.proc
        if p is None or p.poll() is not None:
            self.proc = None
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
        if p.stderr:
            p.stderr.close()
        self.proc = None

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
        if p is not None and p.stderr:
            p.stderr.close()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
