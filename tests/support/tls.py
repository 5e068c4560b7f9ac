"""Certificates and signing keys for tests: a private CA, a server and a client certificate
signed by it, and a JWKS with the key that signs test JWTs. EC P-256 throughout: quick to make
and to verify."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("asynccas test CA", ca_key, None, ca_key, ca=True)
    pki = Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for subject, usage, cert_path, key_path in (
        ("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, pki.server_cert, pki.server_key),
        ("test client", ExtendedKeyUsageOID.CLIENT_AUTH, pki.client_cert, pki.client_key),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(subject, key, ca.subject, ca_key, usage=usage)
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
    return pki


class JwtIssuer:
    """Signs test JWTs (ES256) with a key whose public half is in ``jwks``."""

    def __init__(self, jwks: Path, *, issuer: str = "https://issuer.test", kid: str = "k1") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.issuer = issuer
        self.kid = kid
        self.jwks = jwks
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        jwks.write_text(json.dumps({"keys": [{**public, "kid": kid, "alg": "ES256"}]}))

    def token(
        self,
        subject: str,
        *,
        read: list[str] | None = None,
        write: list[str] | None = None,
        audience: str = "asynccas",
        lifetime: float = 600.0,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "sub": subject,
            "iss": self.issuer,
            "aud": audience,
            "iat": now,
            "exp": now + int(lifetime),
            "asynccas": {"read": read or [], "write": write or []},
            **claims,
        }
        return jwt.encode(payload, self._key, algorithm="ES256", headers={"kid": self.kid})
