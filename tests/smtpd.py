"""A real SMTP server on loopback for the mail notifications' tests: aiosmtpd with STARTTLS
(a throwaway self-signed certificate made here) and AUTH LOGIN/PLAIN, required both.

``MailServer(directory, port)`` can be started, stopped and started again on its port (a mail
server that is down, then back). Under ``CI=true`` a missing aiosmtpd or cryptography fails the
test that needs it, never skips it.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from tests.harness import DEFAULT_BOUND, wait_for
from tests.loopback import free_port

if TYPE_CHECKING:
    import ssl

USER = "spoold-mailer"
PASSWORD = "mail-pass-for-tests"


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SMTP server for the notification tests: {reason}")
    pytest.skip(f"no SMTP server: {reason}")


#: What the certificate may do: sign (TLS) and be its own CA.
KEY_USAGE = dict.fromkeys(
    ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
     "encipher_only", "decipher_only"), False,
) | dict.fromkeys(("digital_signature", "key_cert_sign", "crl_sign"), True)  # fmt: skip


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (its own CA): (cert, key) PEMs."""
    try:
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.x509.oid import NameOID  # noqa: PLC0415
    except ImportError as exc:
        _unavailable(f"cryptography is not installed: {exc}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spoold test smtpd")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtpd-cert.pem", directory / "smtpd-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass(frozen=True)
class Mail:
    """One message as the server took it, and how it came."""

    sender: str
    recipients: list[str]
    content: bytes
    tls: bool
    login: str | None

    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def text(self) -> str:
        """The body's text part."""
        body = self.message().get_body(("plain",))
        assert body is not None
        return str(body.get_content())

    def attachments(self) -> dict[str, str]:
        return {
            str(part.get_filename()): str(part.get_content())
            for part in self.message().iter_attachments()
        }


class MailServer:
    """aiosmtpd on 127.0.0.1:``port``, STARTTLS and a login required; keeps every message.
    ``plain``: neither required, and a login taken in clear (what a client must never send)."""

    def __init__(self, directory: Path, port: int | None = None, *, plain: bool = False) -> None:
        try:
            import aiosmtpd  # noqa: F401, PLC0415
        except ImportError as exc:
            _unavailable(f"aiosmtpd is not installed (pip install aiosmtpd): {exc}")
        self.port = port or free_port()
        self.cert, self.key = make_certificate(directory)
        self.received: list[Mail] = []
        self.logins: list[tuple[str, str]] = []  # (mechanism, user) of each login that passed
        self._lock = threading.Lock()
        self._controller: Any = None
        self._plain = plain

    def _tls(self) -> ssl.SSLContext:
        import ssl  # noqa: PLC0415

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def start(self) -> MailServer:
        from aiosmtpd.controller import Controller  # noqa: PLC0415
        from aiosmtpd.smtp import AuthResult, LoginPassword  # noqa: PLC0415

        server = self

        class Handler:
            async def handle_DATA(self, smtp: Any, session: Any, envelope: Any) -> str:
                auth = session.auth_data if session.authenticated else None
                login = auth.login.decode() if isinstance(auth, LoginPassword) else None
                mail = Mail(str(envelope.mail_from), list(envelope.rcpt_tos),
                            bytes(envelope.original_content or envelope.content),
                            session.ssl is not None, login)  # fmt: skip
                with server._lock:
                    server.received.append(mail)
                return "250 OK"

        def authenticator(smtp: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = (
                isinstance(data, LoginPassword)
                and data.login.decode() == USER
                and data.password.decode() == PASSWORD
            )
            if ok:
                with self._lock:
                    self.logins.append((mechanism, USER))
            return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

        required = not self._plain
        self._controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port,
            tls_context=None if self._plain else self._tls(), require_starttls=required,
            auth_required=required, auth_require_tls=required, authenticator=authenticator,
            server_hostname="127.0.0.1", ready_timeout=30.0,
        )  # fmt: skip
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def ca_file(self) -> Path:
        """What a client trusts to verify this server (the certificate is its own CA)."""
        return self.cert

    def mails(self) -> list[Mail]:
        with self._lock:
            return list(self.received)

    def wait_count(self, count: int, bound: float = DEFAULT_BOUND) -> list[Mail]:
        def enough() -> list[Mail] | None:
            found = self.mails()
            return found if len(found) >= count else None

        return wait_for(enough, bound=bound, what=f"{count} mail(s) at 127.0.0.1:{self.port}")

    def mail_config(self, secret_name: str = "smtp-password") -> dict[str, Any]:
        """The config's ``mail:`` for this server."""
        return {
            "host": "127.0.0.1", "port": self.port, "security": "starttls", "user": USER,
            "password_secret": secret_name, "from": "spoold@example.net",
            "ca_file": str(self.ca_file),
        }  # fmt: skip


def write_password(secrets_dir: Path, name: str = "smtp-password") -> Path:
    """The SMTP password as a secret file (mode 0600, in a 0700 directory)."""
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    path = secrets_dir / name
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def mail_server(tmp_path: Path) -> Iterator[MailServer]:
    """A started MailServer; stopped after."""
    directory = tmp_path / "smtpd"
    directory.mkdir()
    server = MailServer(directory).start()
    yield server
    server.stop()
