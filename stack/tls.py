"""Mutual TLS for SeaweedFS' gRPC ports in the process stack.

``weed server`` listens for gRPC on port + 10000 of its master, volume, filer and S3 servers.
Without TLS any local user can use those APIs (``weed filer.copy`` writes into a bucket, ``weed
shell`` deletes one) and bypass the S3 keys; in compose they are bound to the container's own
loopback, here to the host's. So the stack makes a CA and one certificate signed by it (SeaweedFS
does not check host names) in ``HOME/s3/tls`` (mode 700, the key 600), and every gRPC server and
client of ``weed`` requires it (``[grpc]`` of security.toml, given as ``WEED_GRPC_*`` variables).
The CA's key is not kept: nothing else can be signed; delete the folder to make a new pair.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from pathlib import Path

from stack.settings import write_private

log = logging.getLogger("stack")
#: security.toml sections (``grpc.<role>``) that get the certificate: servers, and ``client`` for dialing.
ROLES = ("master", "volume", "filer", "s3", "client")
DAYS = 3650


def files(folder: Path) -> dict[str, Path]:
    return {"ca": folder / "ca.crt", "cert": folder / "weed.crt", "key": folder / "weed.key"}


def ensure(folder: Path) -> dict[str, Path]:
    """The CA, certificate and key in ``folder``, made (mode 600 key) unless all three exist."""
    paths = files(folder)
    if all(p.exists() for p in paths.values()):
        return paths
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=DAYS)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("covid-stack seaweedfs CA")
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)
    ca = (builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (builder(name("covid-stack seaweedfs"), ca_name, key.public_key())
            .add_extension(x509.SubjectAlternativeName(loopback), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(paths["key"], pem.decode())
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    log.info("SeaweedFS gRPC: CA and certificate written to %s (valid %d days)", folder, DAYS)
    return paths


def weed_env(folder: Path) -> dict[str, str]:
    """``WEED_GRPC_*`` variables: every gRPC server and client of ``weed`` requires the certificate."""
    paths = files(folder)
    env = {"WEED_GRPC_CA": str(paths["ca"])}
    for role in ROLES:
        env[f"WEED_GRPC_{role.upper()}_CERT"] = str(paths["cert"])
        env[f"WEED_GRPC_{role.upper()}_KEY"] = str(paths["key"])
    return env
