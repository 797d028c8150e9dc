"""Read and check the TLS files of the etcd connection, at configuration time.

gRPC accepts any bytes as a CA bundle or certificate and fails only when it
connects, with a vague "unavailable" and lines of its own C-core output. Each
file is checked here instead, so a wrong one is a configuration error naming its
variable. The same files give the gRPC store its channel credentials
(:func:`read_credentials`) and the CLI's gateway client its SSL context
(:func:`ssl_context`); checking them (:func:`read_tls_files`) imports neither
gRPC nor, without TLS, ``ssl``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .. import environment_variables as env
from ..exceptions import ConfigurationError

if TYPE_CHECKING:
    import ssl

    import grpc


def _read(path: str, variable: str) -> bytes:
    try:
        with open(path, "rb") as file:  # not pathlib: its import costs every CLI command start-up time
            return file.read()
    except OSError as error:
        raise ConfigurationError(f"{variable}: cannot read {path!r}: {error.strerror}") from None
    except ValueError:  # a path no file system can hold (a NUL byte, a lone surrogate)
        raise ConfigurationError(f"{variable}: cannot read {path!r}: not a valid path") from None


def _pem_text(pem: bytes) -> str:
    """A PEM file as ``ssl`` takes it: its blocks are ASCII, and bytes outside them (a bundle's
    comments in UTF-8) are left out, as gRPC's and etcd's PEM readers skip them."""
    return pem.decode("ascii", "ignore")


def _check_ca(pem: bytes, path: str) -> None:
    import ssl  # only where TLS is configured: ssl costs every CLI command start-up time

    try:
        ssl.create_default_context(cadata=_pem_text(pem))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise ConfigurationError(f"{env.OTEL_CANCEL_ETCD_CA_CERT}: {path!r} holds no PEM CA certificate") from None


def _check_pair(cert: bytes, key: bytes, cert_path: str, key_path: str) -> None:
    import ssl
    import tempfile

    # ssl loads a certificate chain only from files: hand it copies (the key's copy is
    # private to this user and removed at once).
    with tempfile.TemporaryDirectory(prefix="otel-cancel-tls-") as directory:
        cert_copy = os.path.join(directory, "cert.pem")
        key_copy = os.path.join(directory, "key.pem")
        for copy, data in ((cert_copy, cert), (key_copy, key)):
            with open(copy, "wb") as file:
                file.write(data)
        if b"ENCRYPTED" in key:  # PKCS#8's "BEGIN ENCRYPTED PRIVATE KEY", or the older "Proc-Type: 4,ENCRYPTED"
            raise ConfigurationError(
                f"{env.OTEL_CANCEL_ETCD_KEY}: {key_path!r} is encrypted (a pass phrase protects it); "
                "give the key unencrypted, as gRPC needs it"
            )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            # A password, even empty, keeps OpenSSL from prompting on the terminal for one.
            context.load_cert_chain(cert_copy, key_copy, password=b"")
        except ssl.SSLError as error:
            if "PEM" in str(error) or "NO_START_LINE" in str(error):
                try:
                    context.load_verify_locations(cadata=_pem_text(cert))
                except (ssl.SSLError, UnicodeDecodeError, ValueError):
                    raise ConfigurationError(
                        f"{env.OTEL_CANCEL_ETCD_CERT}: {cert_path!r} holds no PEM certificate"
                    ) from None
                raise ConfigurationError(f"{env.OTEL_CANCEL_ETCD_KEY}: {key_path!r} holds no PEM private key") from None
            raise ConfigurationError(
                f"{env.OTEL_CANCEL_ETCD_KEY}: {key_path!r} is not the key of the certificate in "
                f"{env.OTEL_CANCEL_ETCD_CERT} ({cert_path!r})"
            ) from None


class TlsFiles:
    """The checked contents (PEM) of the TLS files, and where the client pair lives."""

    # A plain class: a dataclass costs every CLI command about a millisecond to define.
    __slots__ = ("ca_pem", "cert_path", "cert_pem", "key_path", "key_pem")

    def __init__(
        self,
        ca_pem: bytes | None,
        cert_pem: bytes | None,
        key_pem: bytes | None,
        cert_path: str | None,
        key_path: str | None,
    ) -> None:
        self.ca_pem = ca_pem
        self.cert_pem = cert_pem
        self.key_pem = key_pem
        self.cert_path = cert_path
        self.key_path = key_path


def read_tls_files(ca_cert: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
    """Read and check the TLS files, or ``None`` when TLS is off (no CA bundle, no client certificate).

    Raises:
        ConfigurationError: a file cannot be read or does not hold what its variable
            says; the message names the variable.
    """
    if (cert is None) != (key is None):
        raise ConfigurationError(f"set both {env.OTEL_CANCEL_ETCD_CERT} and {env.OTEL_CANCEL_ETCD_KEY}, or neither")
    if not (ca_cert or cert):
        return None
    ca_pem = _read(ca_cert, env.OTEL_CANCEL_ETCD_CA_CERT) if ca_cert else None
    if ca_pem is not None and ca_cert is not None:
        _check_ca(ca_pem, ca_cert)
    cert_pem = key_pem = None
    if cert and key:
        cert_pem = _read(cert, env.OTEL_CANCEL_ETCD_CERT)
        key_pem = _read(key, env.OTEL_CANCEL_ETCD_KEY)
        _check_pair(cert_pem, key_pem, cert, key)
    return TlsFiles(ca_pem, cert_pem, key_pem, cert if cert_pem else None, key if key_pem else None)


def read_credentials(ca_cert: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials | None:
    """The gRPC channel credentials the TLS settings describe, or ``None`` for a plain channel.

    Raises:
        ConfigurationError: as :func:`read_tls_files`.
    """
    files = read_tls_files(ca_cert, cert, key)
    if files is None:
        return None
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=files.ca_pem, private_key=files.key_pem, certificate_chain=files.cert_pem
    )


def ssl_context(ca_cert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The client SSL context the TLS settings describe (for HTTPS to etcd), or ``None`` for plain HTTP.

    Verifies etcd's certificate against the CA bundle (the system's without one)
    and its name, as gRPC does, and presents the client certificate when one is set.

    Raises:
        ConfigurationError: as :func:`read_tls_files`.
    """
    files = read_tls_files(ca_cert, cert, key)
    if files is None:
        return None
    import ssl

    try:
        context = ssl.create_default_context(cadata=_pem_text(files.ca_pem) if files.ca_pem else None)
        # The certificates gRPC accepts (the chain and the name, verified the same): Python 3.13
        # also demands RFC 5280's form by default (key identifiers...), which gRPC does not, and
        # the same TLS settings must serve both paths to etcd.
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
        if files.cert_path and files.key_path:
            # Checked above (read_tls_files); loaded from the files as ssl requires.
            context.load_cert_chain(files.cert_path, files.key_path, password=b"")
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError: a file changed since it was checked
        raise ConfigurationError(f"cannot use the etcd TLS files: {error}") from None
    return context
