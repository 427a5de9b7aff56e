"""TLS for the SMTP listeners: the configured pair, or a dev self-signed one.

Only in dev mode may the relay invent a certificate: it is generated once
under ``var_dir/tls`` (key readable by the owner only) and reused, so a mail
client that was told to trust it keeps working across restarts.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl
from pathlib import Path

from shared.config import Settings, SettingsError

log = logging.getLogger(__name__)


def certificate_paths(settings: Settings) -> tuple[Path, Path]:
    """The (cert, key) to use, generating the dev pair when needed."""
    if settings.tls_cert is not None and settings.tls_key is not None:
        return settings.tls_cert, settings.tls_key
    if not settings.dev_mode:
        raise SettingsError(
            "TRACKRELAY_TLS_CERT and TRACKRELAY_TLS_KEY are required with a real upstream"
        )
    directory = settings.var_dir / "tls"
    cert, key = directory / "relay-cert.pem", directory / "relay-key.pem"
    if not (cert.exists() and key.exists()):
        write_self_signed(cert, key, settings.smtp_hostname)
        log.info("generated a self-signed certificate: %s", cert)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"TRACKRELAY_TLS_CERT / TRACKRELAY_TLS_KEY: {exc}") from None
    return context


def write_self_signed(cert_path: Path, key_path: Path, hostname: str = "localhost") -> None:
    """A 2048-bit RSA self-signed certificate (what every mail client accepts)."""
    # Imported here: a relay given its certificate never needs cryptography (~10 MB RSS).
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname or "localhost")])
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in {hostname, "127.0.0.1", "::1"} - {"", "localhost"}:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
