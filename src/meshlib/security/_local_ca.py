"""The local certificate authority: the embedded default when there is no Consul.

``meshlib ca init`` creates a root (EC P-256) in ``MESH_TLS_DIR``; every process with access
to that directory issues itself a short-lived leaf for its own SPIFFE ID and renews it in
process. Layout of the directory::

    roots.pem      every root still trusted, newest first (the trust bundle)
    root.pem       the root that signs new leaves
    root-key.pem   its private key (mode 0600)
    trust-domain   the trust domain, one line

Whoever can write the directory can swap the roots, and whoever can read a key can sign
any identity: a directory that anyone but its owner (or root) can write, or a key file
anyone else can read or write, is refused (``UnsafeCADirectory``, one line) by ``init``,
at start and at every renewal. ``init`` never adopts a loose directory that already exists.

``meshlib ca rotate`` makes a new signing root and keeps the old one in ``roots.pem``
(overlap), so leaves of either root are accepted while processes pick up the new root;
``meshlib ca rotate --drop-old`` later removes the retired roots from the bundle.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._spiffe import SpiffeId

__all__ = ["CaInfo", "LocalCA", "UnsafeCADirectory", "issue_leaf", "sign_leaf"]

ROOT_TTL = dt.timedelta(days=3650)
_SKEW = dt.timedelta(minutes=1)
_UTC = dt.UTC


_KEYS = ("root-key.pem", "previous-root-key.pem")


class UnsafeCADirectory(ValueError):
    """Others than the CA's owner can write its directory, or read or write a key."""


@dataclass(frozen=True)
class CaInfo:
    """What ``meshlib ca show`` prints about the CA."""

    directory: Path
    trust_domain: str
    roots: tuple[x509.Certificate, ...]
    #: the root that signs new leaves now
    signer: x509.Certificate
    #: the most recent root (signs from ``signing_after`` on)
    newest: x509.Certificate
    signing_after: float


class LocalCA:
    """A CA kept as files in one directory."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()

    @property
    def exists(self) -> bool:
        """Whether ``init`` has run here."""
        return (self.directory / "root-key.pem").exists()

    def init(self, trust_domain: str) -> None:
        """Create the CA; refuses to overwrite an existing one."""
        if self.exists:
            raise FileExistsError(f"a CA already exists in {self.directory}")
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.check_private()  # a directory that existed keeps its mode: never adopt a loose one
        _write(self.directory / "trust-domain", trust_domain.encode() + b"\n", 0o644)
        cert, key = _new_root(trust_domain)
        self._install(cert, key, keep=())

    def rotate(
        self, *, drop_old: bool = False, grace: float = 10.0, leaf_ttl: float = 8 * 3600.0
    ) -> None:
        """Add a new root, signing after ``grace`` seconds; or ``drop_old`` retired roots.

        ``grace`` must exceed every process's check interval (1 s), so all trust the new
        root before any leaf from it exists. ``drop_old`` raises ``RuntimeError`` until leaves
        of the old roots (lifetime ``leaf_ttl``) can no longer be valid.
        """
        info = self.load_info()
        if drop_old:
            retire_at = self._signing_after() + leaf_ttl
            if time.time() < retire_at:
                raise RuntimeError(
                    "leaves of the old root may be valid until "
                    f"{dt.datetime.fromtimestamp(retire_at, _UTC):%Y-%m-%d %H:%M:%S} UTC; "
                    "drop it after that"
                )
            _write(self.directory / "roots.pem", _pem(info.newest), 0o644)
            for name in ("previous-root.pem", "previous-root-key.pem", "signing-after"):
                (self.directory / name).unlink(missing_ok=True)
            return
        old_cert, old_key = self._newest()
        cert, key = _new_root(info.trust_domain)
        # Order matters for readers in other processes (each file is replaced atomically):
        # the old signer is kept and the switch time set before the new root appears.
        _write(self.directory / "previous-root-key.pem", _key_pem(old_key), 0o600)
        _write(self.directory / "previous-root.pem", _pem(old_cert), 0o644)
        _write(self.directory / "signing-after", f"{time.time() + grace:.3f}\n".encode(), 0o644)
        self._install(cert, key, keep=info.roots)

    def _install(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        keep: tuple[x509.Certificate, ...],
    ) -> None:
        _write(self.directory / "root-key.pem", _key_pem(key), 0o600)
        _write(self.directory / "root.pem", _pem(cert), 0o644)
        bundle = b"".join(_pem(c) for c in (cert, *keep))
        _write(self.directory / "roots.pem", bundle, 0o644)

    def check_private(self) -> None:
        """Raise ``UnsafeCADirectory`` unless only the owner can change the CA or read keys.

        The directory and key files must belong to this user or root; the directory must
        not be writable by group or others, and a key file must have no group or other bits.
        """
        allowed_owners = {os.getuid(), 0}
        info = self.directory.stat()
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid not in allowed_owners:
            raise UnsafeCADirectory(
                f"the CA directory {self.directory} belongs to uid {info.st_uid}: expected "
                "this user or root"
            )
        if mode & 0o022:
            raise UnsafeCADirectory(
                f"the CA directory {self.directory} is writable by others (mode {mode:04o}): "
                "expected no group or other write permission (chmod go-w)"
            )
        for name in _KEYS:
            try:
                key = (self.directory / name).stat()
            except FileNotFoundError:
                continue
            key_mode = stat.S_IMODE(key.st_mode)
            if key.st_uid not in allowed_owners or key_mode & 0o077:
                raise UnsafeCADirectory(
                    f"the CA key {self.directory / name} can be read or written by others "
                    f"(mode {key_mode:04o}, uid {key.st_uid}): expected mode 0600 and this "
                    "user as its owner"
                )

    def load_info(self) -> CaInfo:
        """Read the CA's public parts."""
        if not self.exists:
            raise FileNotFoundError(
                f"no CA in {self.directory}: run `meshlib ca init` (or set MESH_TLS_DIR)"
            )
        trust_domain = (self.directory / "trust-domain").read_text().strip()
        roots = tuple(x509.load_pem_x509_certificates((self.directory / "roots.pem").read_bytes()))
        newest = x509.load_pem_x509_certificate((self.directory / "root.pem").read_bytes())
        signer, _, _ = self.signer()
        return CaInfo(self.directory, trust_domain, roots, signer, newest, self._signing_after())

    def signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
        """The root that signs now, its key, and the trust bundle (PEM).

        Raises ``ValueError`` when the files read are not consistent with each other (a
        rotation is being written right now): the caller keeps what it has and reads again,
        and ``UnsafeCADirectory`` when others can change the CA or read its keys.
        """
        self.check_private()
        bundle = (self.directory / "roots.pem").read_bytes()
        previous = self.directory / "previous-root.pem"
        if time.time() < self._signing_after() and previous.exists():
            cert, key = _pair(previous, self.directory / "previous-root-key.pem")
        else:
            cert, key = self._newest()
        if _pem(cert) not in bundle:
            raise ValueError("the signing root is not in roots.pem (yet)")
        return cert, key, bundle

    def fingerprint(self) -> tuple[int, ...]:
        """Changes whenever the CA's files change (cheap: modification times)."""
        names = ("roots.pem", "root.pem", "root-key.pem", "signing-after")
        return tuple(_mtime(self.directory / n) for n in names)

    def signing_switch(self) -> float:
        """UNIX time from which the newest root signs (0 when no rotation is pending)."""
        return self._signing_after()

    def _signing_after(self) -> float:
        try:
            return float((self.directory / "signing-after").read_text())
        except (FileNotFoundError, ValueError):
            return 0.0

    def _newest(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return _pair(self.directory / "root.pem", self.directory / "root-key.pem")


def issue_leaf(
    signer: x509.Certificate,
    signer_key: ec.EllipticCurvePrivateKey,
    identity: SpiffeId,
    ttl: dt.timedelta,
    *,
    not_before: dt.datetime | None = None,
) -> tuple[bytes, bytes, dt.datetime]:
    """A leaf for ``identity`` and a new key: (certificate PEM, key PEM, expiry)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem, end = sign_leaf(
        signer, signer_key, identity, key.public_key(), ttl, not_before=not_before
    )
    return cert_pem, _key_pem(key), end


def sign_leaf(
    signer: x509.Certificate,
    signer_key: ec.EllipticCurvePrivateKey,
    identity: SpiffeId,
    public_key: ec.EllipticCurvePublicKey,
    ttl: dt.timedelta,
    *,
    not_before: dt.datetime | None = None,
) -> tuple[bytes, dt.datetime]:
    """A leaf for ``identity`` certifying ``public_key``: (certificate PEM, expiry)."""
    if not_before is None:
        now = dt.datetime.now(_UTC)
        start, end = now - _SKEW, now + ttl  # valid a little early, for clock skew
    else:
        start, end = not_before, not_before + ttl
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service)]))
        .issuer_name(signer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(signer_key, hashes.SHA256())
    )
    return _pem(cert), end


def _new_root(trust_domain: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(_UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshlib root {now:%Y%m%d%H%M%S%f}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + ROOT_TTL)
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
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    public = cert.public_key()
    if not (
        isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(public, ec.EllipticCurvePublicKey)
        and key.public_key().public_numbers() == public.public_numbers()
    ):
        raise ValueError(f"{key_path.name} does not belong to {cert_path.name} (mid-rotation?)")
    return cert, key


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically, created with ``mode`` from the start (no window)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)
