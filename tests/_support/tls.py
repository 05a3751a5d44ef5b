"""
A throw-away TLS identity for the HTTPS tests: a self-signed certificate
for C{127.0.0.1} and C{localhost}, made locally (no network, no CA), and
the C{ssl:} strports description that serves with it.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import quoteStringArgument


@attrs.frozen
class Identity:
    """
    A certificate and its private key, as PEM files.

    @ivar certificate: the self-signed certificate (also the trust anchor
        a verifying client loads).
    @ivar key: its unencrypted private key.
    """

    certificate: Path
    key: Path

    def listen(self, interface: str = "127.0.0.1", port: int = 0) -> str:
        """
        The strports description of a TLS listener with this identity.
        With h2 and priority installed, Twisted offers C{h2} by ALPN on it
        with no further configuration. Paths are quoted: C{:}, C{=} and
        C{\\} would otherwise end or split the argument.
        """
        return (
            f"ssl:{port}:interface={interface}"
            f":privateKey={quoteStringArgument(str(self.key))}"
            f":certKey={quoteStringArgument(str(self.certificate))}"
        )


def selfSigned(directory: Path, days: int = 2) -> Identity:
    """
    Write a self-signed certificate for C{127.0.0.1}/C{localhost} (subject
    alternative names C{IP:127.0.0.1} and C{DNS:localhost}; browsers read
    only those, never the common name) and its P-256 key into
    C{directory}, which must exist. The paths returned are absolute: the
    server process runs in another working directory.
    """
    directory = directory.absolute()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    # Backdated an hour, so a clock a little behind still accepts it.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certificatePath = directory / "cert.pem"
    keyPath = directory / "key.pem"
    certificatePath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyPath.chmod(0o600)
    return Identity(certificate=certificatePath, key=keyPath)
