"""TLS of a model target's `url` download (twin/fetch.py, `twin.fetch` in twin/config.py)
against a real local HTTPS server (stdlib http.server + ssl) with a CA, server and client
certificates made here: the right CA is trusted, a wrong one is refused with an error that
says so, a server that requires a client certificate is satisfied only by the configured
one; check-config names the file and key of a bad `twin.fetch` entry; a url that keeps
failing hands over to the broker when the bundle is published there, resuming the same
partial file; through ModelTargets and the update pipeline, the TLS error is the target's
reported message until the right CA is installed, then the bundle is committed."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgerund.config.loader import parse_config
from edgerund.errors import ConfigError
from edgerund.twin.bundlewire import BundleMeta, chunk_topic, meta_topic
from edgerund.twin.config import TwinFetchConfig
from edgerund.twin.desired import Desired
from edgerund.twin.fetch import BundleFetcher
from edgerund.twin.modeltargets import ModelTargets
from edgerund.twin.targets import Target
from tests.twin.fetchers import make_fetcher
from tests.twin.rangeserver import RangeServer
from tests.updates import models as M
from tests.updates.support import Publisher, make_config, running, seed_dir, wait_for

C = 4096


@dataclass
class Pki:
    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(d: Path, cn: str) -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    pem = d / f"{cn}.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(d, key, cert, pem)


def issue(ca: Pki, cn: str, *, server: bool) -> tuple[Path, Path]:
    """(certificate PEM, key PEM) signed by `ca`: a server certificate for 127.0.0.1, or a
    client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
    )  # fmt: skip
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = b.sign(ca.key, hashes.SHA256())
    cp, kp = ca.dir / f"{cn}.crt", ca.dir / f"{cn}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    kp.chmod(0o600)
    return cp, kp


@dataclass
class World:
    ca: Pki  # signs the server's certificate
    other: Pki  # a CA the server does not use
    client_ca: Pki  # signs the gateway's client certificate
    server: tuple[Path, Path]
    client: tuple[Path, Path]
    stranger: tuple[Path, Path]  # a client certificate by a CA the server does not trust


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    d = tmp_path_factory.mktemp("pki")
    ca, other, client_ca = make_ca(d, "srv-ca"), make_ca(d, "other-ca"), make_ca(d, "cli-ca")
    return World(
        ca,
        other,
        client_ca,
        server=issue(ca, "server", server=True),
        client=issue(client_ca, "gw-17", server=False),
        stranger=issue(other, "intruder", server=False),
    )


def https_server(data: bytes, w: World, *, client_ca: Path | None = None) -> RangeServer:
    """One file over HTTPS; `client_ca`: a client certificate by that CA is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*w.server)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=client_ca)
    return RangeServer(data, ctx)


def _target(url: str, n: int = 5 * C + 11) -> tuple[bytes, Target]:
    blob = os.urandom(n)
    return blob, Target("m", "1.0.0", hashlib.sha256(blob).hexdigest(), n, url)


def _fetcher(root: Path, tls: TwinFetchConfig, broker: Any = None) -> BundleFetcher:
    return make_fetcher(root, broker, C, backoff_initial_s=0.05, backoff_max_s=0.2, tls=tls)


async def _errors_until(f: BundleFetcher, t: Target, n: int = 2) -> list[str]:
    """Run the (retrying) fetch until it has failed `n` times; returns the errors."""
    errors: list[str] = []
    task = asyncio.create_task(f.fetch_url(t, progress=lambda _: None, failed=errors.append))
    try:
        await wait_for(lambda: len(errors) >= n or task.done(), 20)
        assert not task.done(), "the fetch should keep retrying, not end"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    return errors


def _no_broker(**kw: Any) -> TwinFetchConfig:
    return TwinFetchConfig(url_failures_before_broker=0, **kw)


async def test_right_ca_fetches_wrong_ca_refused_with_reason(tmp_path: Path, world: World) -> None:
    srv = https_server(b"", world)
    try:
        blob, t = _target(srv.url)
        srv.data = blob
        srv.cut = 2 * C + 3  # and resumes over TLS with Range
        f = _fetcher(tmp_path / "ok", _no_broker(ca_file=str(world.ca.pem)))
        path = await asyncio.wait_for(f.fetch_url(t, progress=lambda _: None), 30)
        assert path.read_bytes() == blob
        assert srv.requests == [None, f"bytes={2 * C + 3}-"]

        # the server's certificate is not by the configured CA: never trusted
        srv.requests.clear()
        f = _fetcher(tmp_path / "bad", _no_broker(ca_file=str(world.other.pem)))
        errors = await _errors_until(f, t)
        assert srv.requests == []  # no request ever went out
        assert "the server's certificate is not trusted" in errors[0], errors
        assert f"twin.fetch.ca_file {world.other.pem}" in errors[0]
        assert "unable to get local issuer certificate" in errors[0]
        assert not (tmp_path / "bad" / f"{t.sha256}.bundle").exists()

        # nor by the system store (no ca_file): a private CA needs ca_file
        errors = await _errors_until(_fetcher(tmp_path / "sys", _no_broker()), t)
        assert "not trusted by the system CA store" in errors[0], errors
    finally:
        srv.close()


async def test_mutual_tls_only_with_the_configured_client_cert(
    tmp_path: Path, world: World
) -> None:
    srv = https_server(b"", world, client_ca=world.client_ca.pem)
    try:
        blob, t = _target(srv.url)
        srv.data = blob
        ca = str(world.ca.pem)

        # no client certificate: the server refuses the handshake
        errors = await _errors_until(_fetcher(tmp_path / "none", _no_broker(ca_file=ca)), t)
        assert srv.requests == []
        assert "TLS" in errors[0] and "no client certificate is configured" in errors[0], errors

        # a certificate by a CA the server does not trust: refused as well
        cert, key = world.stranger
        f = _fetcher(
            tmp_path / "stranger",
            _no_broker(ca_file=ca, client_cert=str(cert), client_key=str(key)),
        )
        errors = await _errors_until(f, t)
        assert srv.requests == []
        assert "TLS" in errors[0] and str(cert) in errors[0], errors

        # the configured one: served
        cert, key = world.client
        f = _fetcher(
            tmp_path / "ok", _no_broker(ca_file=ca, client_cert=str(cert), client_key=str(key))
        )
        path = await asyncio.wait_for(f.fetch_url(t, progress=lambda _: None), 30)
        assert path.read_bytes() == blob
        assert srv.requests == [None]
    finally:
        srv.close()


async def test_url_failing_falls_back_to_the_broker_and_resumes(
    tmp_path: Path, world: World, mosquitto: Any
) -> None:
    srv = https_server(b"", world)
    blob, t = _target(srv.url, 6 * C + 5)
    srv.data = blob
    srv.cut = 2 * C + 100  # the url delivers part of the file, then goes away for good
    meta = BundleMeta.plan(len(blob), t.sha256, C)
    async with aiomqtt.Client(
        mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as c:
        for i in range(meta.chunks):
            await c.publish(chunk_topic(t.sha256, i), blob[i * C : (i + 1) * C], qos=1, retain=True)
        await c.publish(meta_topic(t.sha256), meta.to_json(), qos=1, retain=True)

    seen: list[int] = []
    errors: list[str] = []
    f = _fetcher(
        tmp_path,
        TwinFetchConfig(ca_file=str(world.ca.pem), url_failures_before_broker=2),
        mosquitto,
    )

    def progress(n: int) -> None:
        seen.append(n)
        if n >= 2 * C + 100 and srv.thread.is_alive():
            threading.Thread(target=srv.close).start()  # gone after the cut

    path = await asyncio.wait_for(f.fetch_url(t, progress=progress, failed=errors.append), 60)
    assert path.read_bytes() == blob
    assert len(errors) >= 2  # the url failed (connection refused) before the hand-over
    after_cut = seen[seen.index(2 * C + 100) :]
    assert min(after_cut) == 2 * C + 100  # resumed from the url's bytes, never restarted


async def test_not_on_broker_keeps_trying_the_url(
    tmp_path: Path, world: World, mosquitto: Any
) -> None:
    """The fallback only when the broker has the bundle: otherwise the url stays."""
    _, t = _target("https://127.0.0.1:9/b.bundle")  # nothing listens on the discard port
    f = _fetcher(tmp_path, TwinFetchConfig(url_failures_before_broker=1), mosquitto)
    f.probe_s = 1.0
    probes: list[bool] = []
    real = f.published

    async def published(t: Target) -> bool:  # the real probe, counted
        probes.append(await real(t))
        return probes[-1]

    f.published = published  # type: ignore[method-assign]
    errors = await _errors_until(f, t, n=3)
    assert len(errors) >= 3 and probes and not any(probes)


async def test_model_target_reports_the_tls_error_then_installs(
    tmp_path: Path, world: World
) -> None:
    """Through ModelTargets and the real update pipeline: while the configured CA does not
    trust the server, the target stays `fetching` with the TLS error as its reported
    message; once the right CA is installed at the same path (the context is rebuilt, no
    restart) the bundle is fetched, verified and committed."""
    pub = Publisher()
    seed_dir(tmp_path / "shipped", M.affine())
    pub.write_keyring(tmp_path / "keyring.json")
    ca = tmp_path / "bundles-ca.pem"
    ca.write_bytes(world.other.pem.read_bytes())
    cfg = make_config(tmp_path)
    fetch = TwinFetchConfig(ca_file=str(ca), url_failures_before_broker=0)
    cfg = msgspec.structs.replace(cfg, twin=msgspec.structs.replace(cfg.twin, fetch=fetch))
    bundle = pub.bundle(tmp_path / "b.bundle", version="2.0.0", counter=1)
    data = bundle.read_bytes()
    srv = https_server(data, world)
    target = {
        "version": "2.0.0",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "url": srv.url,
    }

    async def no_broker() -> aiomqtt.Client:
        raise AssertionError("the url source only")

    try:
        async with running(cfg) as r:
            scope = r.supervisor.scope("twin")
            async with scope:
                t = ModelTargets(
                    cfg, installer=r.updates, managed=lambda: r.updates.records,
                    scope=scope, notify=lambda: None, client=no_broker,
                )  # fmt: skip
                t.fetcher.backoff_initial_s = t.fetcher.backoff_max_s = 0.2
                await t.load()
                t.offer(Desired(1, {}, {"m1": target}, 2**62, "test", b""))
                await wait_for(lambda: "not trusted" in (t.report()["m1"]["message"] or ""), 30)
                e = t.report()["m1"]
                assert e["state"] == "fetching", e
                assert e["message"].startswith("url: TLS: the server's certificate is not trusted")
                assert f"twin.fetch.ca_file {ca}" in e["message"]
                assert srv.requests == []

                ca.write_bytes(world.ca.pem.read_bytes())  # the right CA, in place
                await wait_for(lambda: t.report()["m1"]["state"] == "committed", 60)
                assert r.updates.slot_info("m1")["version"] == "2.0.0"
                assert t.report()["m1"]["message"] is None
                assert srv.requests == [None]
    finally:
        srv.close()


# -- check-config ---------------------------------------------------------------------------


def _cfg(fetch: str) -> str:
    return "gateway:\n  id: gw1\ntwin:\n  fetch:\n" + fetch


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "/etc/edgerund/edgerund.yaml")
    return str(ei.value)


def test_check_config_twin_fetch(tmp_path: Path, world: World) -> None:
    cert, key = world.client
    ok = parse_config(
        _cfg(f"    ca_file: {world.ca.pem}\n    client_cert: {cert}\n    client_key: {key}\n")
    )
    assert ok.twin.fetch.client_key == str(key)

    msg = _error(_cfg(f"    ca_file: {tmp_path}/nope.pem\n"))
    assert msg.startswith("/etc/edgerund/edgerund.yaml:5: twin.fetch.ca_file: expected a PEM file")
    assert "no such file" in msg

    msg = _error(_cfg("    ca_file: ca.pem\n"))
    assert "twin.fetch.ca_file: expected an absolute path, got 'ca.pem'" in msg

    msg = _error(_cfg(f"    client_cert: {cert}\n"))
    assert ":4: twin.fetch.client_key: expected with client_cert (mutual TLS needs both)" in msg

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    msg = _error(_cfg(f"    ca_file: {junk}\n"))
    assert ":5: twin.fetch.ca_file: expected PEM CA certificates in" in msg

    _, other_key = world.stranger  # a key that is not the certificate's
    msg = _error(_cfg(f"    client_cert: {cert}\n    client_key: {other_key}\n"))
    assert "twin.fetch.client_key: expected a PEM certificate in" in msg
    assert "its unencrypted private key" in msg

    msg = _error(_cfg("    url_failures_before_broker: -1\n"))
    assert "twin.fetch.url_failures_before_broker: expected >= 0" in msg
