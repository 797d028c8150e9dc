"""A throwaway PKI for tests: a CA, a server certificate for 127.0.0.1 and a client certificate, as files.

The certificates are what real PKIs issue (key identifiers, key usage, a subject or a
critical subject alternative name), so they pass the strict verification Python 3.13
applies by default as well as etcd's and gRPC's.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otel_cancel.testing import EtcdTls


def _pem(path: Path, item: x509.Certificate | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(item, x509.Certificate):
        data = item.public_bytes(serialization.Encoding.PEM)
    else:
        data = item.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    path.write_bytes(data)
    return str(path)


def make_pki(directory: Path, *, server_may_be_client: bool = False, key_identifiers: bool = True) -> EtcdTls:
    """Mutual TLS for an etcd on 127.0.0.1, written under ``directory``.

    Args:
        directory: where the PEM files go.
        server_may_be_client: the server certificate also allows client use (etcd's
            gateway reaches etcd with it).
        key_identifiers: ``False`` leaves out the key identifiers, as some home-made PKIs
            do: gRPC and etcd accept such certificates, Python 3.13's strict default does not.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otel-cancel test CA")])
    ca_key_id = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_builder = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    )
    if key_identifiers:
        ca_builder = ca_builder.add_extension(ca_key_id, critical=False)
    ca = ca_builder.sign(ca_key, hashes.SHA256())

    def leaf(
        name: str, usages: list[x509.ObjectIdentifier], san: list[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if name else []))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if key_identifiers:
            authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id)
            builder = builder.add_extension(authority, critical=False)
        if san:
            # Critical when the subject is empty (RFC 5280).
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=not name)
        return builder.sign(ca_key, hashes.SHA256()), key

    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if server_may_be_client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    server, server_key = leaf("etcd", usages, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    # No common name: with etcd auth on, a client certificate's CN logs in as that user,
    # so etcd grpc-proxy refuses to present a certificate that has one.
    client, client_key = leaf("", [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    return EtcdTls(
        ca_cert=_pem(directory / "ca.pem", ca),
        cert=_pem(directory / "server.pem", server),
        key=_pem(directory / "server-key.pem", server_key),
        client_cert_auth=True,
        client_cert=_pem(directory / "client.pem", client),
        client_key=_pem(directory / "client-key.pem", client_key),
    )
