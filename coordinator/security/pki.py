"""A small PKI for one fleet, with `cryptography`: a CA, the broker's server certificate, client certificates.

Every key is ECDSA P-256, every signature ECDSA-SHA256, everything PEM:

* the CA (self-signed, ``CA:TRUE, pathlen:0``, keyCertSign + cRLSign);
* the broker's server certificate: serverAuth, its SANs the host names and IP
  addresses clients connect to (by default 127.0.0.1, localhost and this
  machine's host name); clients verify it against the CA and the host name;
* client certificates (clientAuth) whose CN is the MQTT username the broker
  takes from it (``use_identity_as_username``): the coordinator's name, or a
  device id;
* a certificate revocation list (CRL) of revoked client serials, which
  Mosquitto's ``crlfile`` checks at every handshake.

Certificates start one hour in the past, for clocks slightly behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from msfusion.errors import ConfigError

CA_DAYS = 3650
LEAF_DAYS = 825
CRL_DAYS = 3650  # a CRL past its nextUpdate fails every handshake: keep it long, it is rewritten on each revoke
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """PKCS#8, unencrypted (the file holding it is 0600)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def create_ca(common_name: str = "msfusion fleet CA", *, days: int = CA_DAYS) -> Identity:
    """A self-signed CA allowed to sign leaf certificates and CRLs only (pathlen 0)."""
    key = new_key()
    name = _name(common_name, "msfusion")
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Identity(cert, key)


def default_hosts() -> list[str]:
    """127.0.0.1, localhost and this machine's host name (and its FQDN when different)."""
    hosts = ["127.0.0.1", "localhost"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in hosts:
            hosts.append(name)
    return hosts


def subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SAN entries for host names and IP addresses (an IP is an IPAddress entry, not a DNSName).

    Raises:
        ConfigError: no hosts, or an entry that is neither an IP address nor a host name.
    """
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        host = host.strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        valid = all(
            0 < len(label) <= 63 and label.isascii() and all(c.isalnum() or c == "-" for c in label.lstrip("*"))
            for label in labels
        )
        if not valid:
            raise ConfigError(f"{host!r} is neither an IP address nor a host name")
        names.append(x509.DNSName(host.rstrip(".").lower()))
    if not names:
        raise ConfigError("the broker certificate needs at least one host name or IP address")
    return names


def _leaf(
    ca: Identity,
    common_name: str,
    usage: x509.ObjectIdentifier,
    *,
    days: int,
    sans: Sequence[x509.GeneralName] = (),
) -> Identity:
    key = new_key()
    now = _now()
    public = key.public_key()
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, "msfusion"))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return Identity(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server_cert(
    ca: Identity, hosts: Iterable[str] | None = None, *, common_name: str = "msfusion broker", days: int = LEAF_DAYS
) -> Identity:
    """The broker's certificate: serverAuth, SANs `hosts` (default: `default_hosts()`).

    Raises:
        ConfigError: a host that is neither an IP address nor a host name.
    """
    sans = subject_alt_names(default_hosts() if hosts is None else hosts)
    return _leaf(ca, common_name, ExtendedKeyUsageOID.SERVER_AUTH, days=days, sans=sans)


def issue_client_cert(ca: Identity, common_name: str, *, days: int = LEAF_DAYS) -> Identity:
    """A client certificate (clientAuth) with CN `common_name`: the MQTT username it logs in as."""
    if not common_name or "\0" in common_name:
        raise ConfigError(f"a client certificate needs a common name, got {common_name!r}")
    return _leaf(ca, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, days=days)


def create_crl(ca: Identity, revoked: Iterable[int] = (), *, number: int = 1, days: int = CRL_DAYS) -> bytes:
    """A CRL (PEM) signed by `ca` listing the `revoked` serials; `number` is its CRL number (increase it)."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    for serial in sorted(set(revoked)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - _BACKDATE).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def load_identity(cert_path: Path, key_path: Path) -> Identity:
    """Read a certificate and its ECDSA key (PEM).

    Raises:
        ConfigError: unreadable, malformed, not an EC key, or the key does not match the certificate.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read {cert_path} / {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} is not the EC key of {cert_path}")
    return Identity(cert, key)


def load_cert(path: Path) -> x509.Certificate:
    """Read a PEM certificate.

    Raises:
        ConfigError: unreadable or malformed.
    """
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc}") from exc


def cert_hosts(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """A certificate's SANs: (DNS names, IP addresses as text)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return sans.get_values_for_type(x509.DNSName), [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN ("" if none)."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""
