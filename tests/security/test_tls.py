"""TLS on the TCP listener: mutual TLS takes only clients whose certificate the configured CA signed, a bad
certificate or key stops the daemon at start with a clear error, and a handshake that never finishes is dropped
after tcp.tls_handshake_timeout_s while other clients are served."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from kvrack.clients import Client
from kvrack.clients.remote import client_tls_context
from tests.test_remote import TOKEN_A, make_cert, start_daemon

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for certificates")
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def client_cert(tmp_path, name: str, ca: tuple[str, str] | None) -> tuple[str, str]:
    """A client certificate signed by ``ca`` (certificate, key), or self-signed without one."""
    cert, key = str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")
    if ca is None:
        openssl("req", "-x509", *EC, "-subj", f"/CN={name}", "-keyout", key, "-out", cert)
        return cert, key
    csr = str(tmp_path / f"{name}.csr")
    openssl("req", *EC, "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "2", "-out", cert)
    return cert, key


def test_mutual_tls_takes_only_clients_whose_certificate_the_ca_signed(tmp_path):
    server_cert, server_key = make_cert(tmp_path)
    ca = client_cert(tmp_path, "clients-ca", None)
    good = client_cert(tmp_path, "engine", ca)
    stranger = client_cert(tmp_path, "stranger", None)
    d, address = start_daemon(tmp_path, **{"tcp.tls_cert": server_cert, "tcp.tls_key": server_key,
                                            "tcp.tls_client_ca": ca[0], "tcp.nixl": "off"})
    try:
        tls_address = address.replace("tcp://", "tls://")

        def context(cert: tuple[str, str] | None):
            ctx = client_tls_context(server_cert)
            if cert is not None:
                ctx.load_cert_chain(*cert)
            return ctx

        with Client.connect(tls_address, namespace="a", token=TOKEN_A, tls=context(good), timeout=10) as c:
            assert c.put([b"m" * 32], [b"x" * 1000]).stored == 1
        for who in (None, stranger):  # no certificate, or one the CA did not sign: no session at all
            with pytest.raises((ConnectionError, OSError)):
                with Client.connect(tls_address, namespace="a", token=TOKEN_A, tls=context(who), timeout=10) as c:
                    c.lookup([b"m" * 32])
    finally:
        d.stop()


@pytest.mark.parametrize("broken", ["certificate", "key", "client CA"])
def test_a_bad_certificate_or_key_stops_the_daemon_at_start_with_a_clear_error(tmp_path, broken):
    cert, key = make_cert(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    settings = {"tcp.tls_cert": cert, "tcp.tls_key": key}
    settings[{"certificate": "tcp.tls_cert", "key": "tcp.tls_key", "client CA": "tcp.tls_client_ca"}[broken]] = \
        str(garbage)
    with pytest.raises(RuntimeError, match="kvrackd exited") as failed:
        d, _address = start_daemon(tmp_path, **settings)
        d.stop()
    assert "TLS" in str(failed.value) and "Traceback" not in str(failed.value)


def test_a_handshake_that_never_finishes_is_dropped_and_others_are_served(tmp_path):
    cert, key = make_cert(tmp_path)
    d, address = start_daemon(tmp_path, **{"tcp.tls_cert": cert, "tcp.tls_key": key,
                                           "tcp.tls_handshake_timeout_s": "1", "tcp.nixl": "off"})
    try:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        silent = socket.create_connection((host, int(port)), timeout=30)  # connects, never sends a ClientHello
        try:
            tls_address = address.replace("tcp://", "tls://")
            with Client.connect(tls_address, namespace="a", token=TOKEN_A, tls=client_tls_context(cert)) as c:
                assert c.lookup([b"\x01" * 32]).prefix == 0
            assert silent.recv(1) == b"", "dropped after tcp.tls_handshake_timeout_s"
        finally:
            silent.close()
    finally:
        d.stop()
