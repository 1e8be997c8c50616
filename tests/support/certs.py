"""Test certificate authorities and certificates, written as PEM files.

`TestPKI` owns two CAs: the trusted one, whose PEM file tests load as their only
trust anchor, and a second one that no test trusts. Every certificate comes with
its chain (leaf, then the issuing CA) in one file and its private key in another,
which is the layout Dovecot's `ssl_cert`/`ssl_key` and Python's
`SSLContext.load_cert_chain` expect.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_IDENTITIES = ("localhost", "127.0.0.1", "::1")
WRONG_HOST_IDENTITY = "wrong.invalid"
SERVER_CERT_KINDS = ("valid", "wrong_host", "expired", "untrusted")


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one certificate: chain (leaf first) and private key."""

    cert_file: Path
    key_file: Path


class TestPKI:
    """Two test CAs and the certificates they issue, stored under one folder."""

    __test__ = False  # a class named Test* is not a pytest test class

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ca = trustme.CA(organization_name="Appliance test CA")
        self._untrusted_ca = trustme.CA(organization_name="Appliance untrusted CA")
        self.ca_file = self._write_ca(self._ca, "ca.pem")
        self.untrusted_ca_file = self._write_ca(self._untrusted_ca, "untrusted-ca.pem")
        self._server_certs: dict[str, CertFiles] = {}

    def server_cert(self, kind: str) -> CertFiles:
        """Return the server certificate of `kind`, issuing it on first use.

        Kinds: `valid` (names localhost, 127.0.0.1 and ::1), `wrong_host` (only
        wrong.invalid), `expired` (valid names, not_after in the past) and
        `untrusted` (valid names, issued by the CA that tests do not trust).
        """
        if kind not in SERVER_CERT_KINDS:
            raise ValueError(
                f"invalid server certificate kind {kind!r}: "
                f"expected one of {', '.join(SERVER_CERT_KINDS)}"
            )
        if kind not in self._server_certs:
            self._server_certs[kind] = self._issue_server_kind(kind)
        return self._server_certs[kind]

    def issue_server_cert(
        self, name: str, identities: tuple[str, ...] = SERVER_IDENTITIES
    ) -> CertFiles:
        """Issue a trusted server certificate, for example for a proxy listener.

        `name` becomes the file name stem, so use a fresh one for each certificate.
        """
        leaf = self._ca.issue_cert(*identities, common_name=identities[0])
        return self._write_leaf(leaf, f"server-{name}")

    def issue_client_cert(self, name: str, identity: str | None = None) -> CertFiles:
        """Issue a trusted client certificate whose subject CN is `name`.

        `identity` (default `name@example.invalid`) goes into the SAN as an
        e-mail address, or as a DNS name when it contains no `@`.
        """
        identity = identity or f"{name}@example.invalid"
        leaf = self._ca.issue_cert(identity, common_name=name)
        return self._write_leaf(leaf, f"client-{name}")

    def _issue_server_kind(self, kind: str) -> CertFiles:
        if kind == "valid":
            leaf = self._ca.issue_cert(*SERVER_IDENTITIES, common_name="localhost")
        elif kind == "wrong_host":
            leaf = self._ca.issue_cert(
                WRONG_HOST_IDENTITY, common_name=WRONG_HOST_IDENTITY
            )
        elif kind == "expired":
            now = datetime.datetime.now(datetime.UTC)
            leaf = self._ca.issue_cert(
                *SERVER_IDENTITIES,
                common_name="localhost",
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        else:
            leaf = self._untrusted_ca.issue_cert(
                *SERVER_IDENTITIES, common_name="localhost"
            )
        return self._write_leaf(leaf, f"server-{kind}")

    def _write_ca(self, ca: trustme.CA, file_name: str) -> Path:
        path = self.directory / file_name
        ca.cert_pem.write_to_path(path)
        return path

    def _write_leaf(self, leaf: trustme.LeafCert, stem: str) -> CertFiles:
        cert_file = self.directory / f"{stem}.pem"
        key_file = self.directory / f"{stem}.key"
        if cert_file.exists():
            raise FileExistsError(f"certificate file already exists: {cert_file}")
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(cert_file, append=True)
        leaf.private_key_pem.write_to_path(key_file)
        key_file.chmod(0o600)
        return CertFiles(cert_file=cert_file, key_file=key_file)
