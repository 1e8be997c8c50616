"""Unit tests of the SSLContexts built from listener and upstream config."""

from __future__ import annotations

import base64
import datetime
import os
import ssl
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from appliance.config import AppConfig, ListenerConfig, UpstreamConfig
from appliance.tls import contexts
from appliance.tls.contexts import (
    TlsContextError,
    build_all_contexts,
    client_context,
    server_context,
)
from tests.support.certs import CertFiles, TestPKI

# Upper bound on handshake rounds, so a stuck handshake fails instead of looping.
MAX_HANDSHAKE_ROUNDS = 10


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # AppConfig reads APPLIANCE_* variables, so the caller's shell must not leak in.
    for name in list(os.environ):
        if name.upper().startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    # Overrides the session PKI, so the certificate names here collide with no others.
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def listener_cert(pki: TestPKI) -> CertFiles:
    return pki.issue_server_cert("listener")


@pytest.fixture(scope="module")
def other_cert(pki: TestPKI) -> CertFiles:
    return pki.issue_server_cert("other")


def tls_listener(cert: CertFiles, **fields: object) -> ListenerConfig:
    values: dict[str, object] = {
        "protocol": "imap",
        "port": 1993,
        "tls": "implicit",
        "cert_file": cert.cert_file,
        "key_file": cert.key_file,
        "upstream": "mail",
    }
    values.update(fields)
    return ListenerConfig(**values)


def run_handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str = "localhost"
) -> str:
    """Run a TLS handshake over memory buffers and return the negotiated version."""
    client_incoming, client_outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_incoming, server_outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(
        client_incoming, client_outgoing, server_hostname=server_name
    )
    server_side = server.wrap_bio(server_incoming, server_outgoing, server_side=True)
    pending = [client_side, server_side]
    for _ in range(MAX_HANDSHAKE_ROUNDS):
        for side in list(pending):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            pending.remove(side)
        server_incoming.write(client_outgoing.read())
        client_incoming.write(server_outgoing.read())
        if not pending:
            return str(client_side.version())
    raise AssertionError(f"handshake unfinished after {MAX_HANDSHAKE_ROUNDS} rounds")


# Listener (server-side) contexts


def test_listener_context_serves_trusted_client(
    pki: TestPKI, listener_cert: CertFiles
) -> None:
    server = server_context(tls_listener(listener_cert), "listeners.imaps")
    client = client_context(
        UpstreamConfig(host="localhost", ca_file=pki.ca_file), "upstreams.mail"
    )

    version = run_handshake(server, client)

    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(
    ("min_version", "expected"),
    [("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)],
    ids=["1.2", "1.3"],
)
def test_listener_min_version_applied(
    min_version: str, expected: ssl.TLSVersion, listener_cert: CertFiles
) -> None:
    listener = tls_listener(listener_cert, min_version=min_version)

    context = server_context(listener, "listeners.imaps")

    assert context.minimum_version == expected


def test_listener_min_version_rejects_older_client(
    pki: TestPKI, listener_cert: CertFiles
) -> None:
    server = server_context(
        tls_listener(listener_cert, min_version="1.3"), "listeners.imaps"
    )
    client = client_context(
        UpstreamConfig(host="localhost", ca_file=pki.ca_file), "upstreams.mail"
    )
    client.maximum_version = ssl.TLSVersion.TLSv1_2

    with pytest.raises(ssl.SSLError) as caught:
        run_handshake(server, client)

    assert not isinstance(caught.value, ssl.SSLCertVerificationError)


def test_listener_context_disables_compression(listener_cert: CertFiles) -> None:
    context = server_context(tls_listener(listener_cert), "listeners.imaps")

    assert context.options & ssl.OP_NO_COMPRESSION


def test_mismatched_listener_key_names_field(
    listener_cert: CertFiles, other_cert: CertFiles
) -> None:
    listener = tls_listener(
        listener_cert,
        cert_file=listener_cert.cert_file,
        key_file=other_cert.key_file,
    )

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(
        f"listeners.imaps.cert_file: {str(listener_cert.cert_file)!r}"
    )
    assert f"the private key in key_file {str(other_cert.key_file)!r}" in message
    assert "does not belong to" in message
    assert "set key_file to the key that the certificate was issued for" in message
    assert "key values mismatch" not in message


def test_non_pem_cert_names_field(tmp_path: Path, listener_cert: CertFiles) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    listener = tls_listener(listener_cert, cert_file=garbage)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    assert str(caught.value).startswith("listeners.imaps.cert_file:")
    assert str(garbage) in str(caught.value)


def test_certificate_as_key_names_key_field(
    pki: TestPKI, listener_cert: CertFiles
) -> None:
    listener = tls_listener(listener_cert, key_file=pki.ca_file)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.key_file: {str(pki.ca_file)!r}")
    assert "contains no PEM private key but a certificate" in message
    assert "expected the unencrypted private key of cert_file" in message


def test_key_as_certificate_names_cert_field(listener_cert: CertFiles) -> None:
    listener = tls_listener(listener_cert, cert_file=listener_cert.key_file)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(
        f"listeners.imaps.cert_file: {str(listener_cert.key_file)!r}"
    )
    assert "contains no PEM certificate but a private key" in message


def test_encrypted_key_rejected_without_prompt(
    tmp_path: Path, listener_cert: CertFiles, capfd: pytest.CaptureFixture[str]
) -> None:
    key = serialization.load_pem_private_key(
        listener_cert.key_file.read_bytes(), password=None
    )
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        )
    )
    listener = tls_listener(listener_cert, key_file=encrypted)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    captured = capfd.readouterr()
    assert message.startswith(f"listeners.imaps.key_file: {str(encrypted)!r}")
    assert "contains an encrypted private key" in message
    assert "pass phrase" not in captured.err
    assert "pass phrase" not in captured.out


# Broken PEM files in every TLS file field

# Index of a line of base64 text in each test PEM file: line 3, after the BEGIN line.
BASE64_LINE_INDEX = 2
TLS_FILE_FIELDS = [
    "listeners.imaps.cert_file",
    "listeners.imaps.key_file",
    "upstreams.mail.ca_file",
    "upstreams.mail.client_cert_file",
    "upstreams.mail.client_key_file",
]


def load_with_file(field: str, path: Path, cert: CertFiles) -> None:
    """Build the context of `field`, set to `path`, with the files of `cert` elsewhere."""
    if field.startswith("listeners."):
        name = field.rsplit(".", 1)[1]
        server_context(tls_listener(cert, **{name: path}), "listeners.imaps")
        return
    files: dict[str, object] = {
        "client_cert_file": cert.cert_file,
        "client_key_file": cert.key_file,
    }
    files[field.rsplit(".", 1)[1]] = path
    client_context(UpstreamConfig(host="mail.example.org", **files), "upstreams.mail")


def truncate(pem_text: bytes) -> bytes:
    return pem_text.split(b"-----END")[0]


def corrupt_base64_character(pem_text: bytes) -> bytes:
    lines = pem_text.splitlines()
    lines[BASE64_LINE_INDEX] = b"!" + lines[BASE64_LINE_INDEX][1:]
    return b"\n".join(lines) + b"\n"


def cut_base64_line(pem_text: bytes) -> bytes:
    lines = pem_text.splitlines()
    lines[BASE64_LINE_INDEX] = lines[BASE64_LINE_INDEX][:-1]
    return b"\n".join(lines) + b"\n"


def corrupt_der(pem_text: bytes) -> bytes:
    first_block = pem_text.split(b"-----END")[0]
    label_line, *body = first_block.splitlines()
    der = base64.b64decode(b"".join(body))
    damaged = der[:8] + bytes(len(der) - 8)
    label = label_line.removeprefix(b"-----BEGIN ")
    return (
        label_line + b"\n" + base64.encodebytes(damaged) + b"-----END " + label + b"\n"
    )


def to_der(pem_text: bytes) -> bytes:
    if b"PRIVATE KEY" in pem_text.splitlines()[0]:
        key = serialization.load_pem_private_key(pem_text, password=None)
        return key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return x509.load_pem_x509_certificate(pem_text).public_bytes(
        serialization.Encoding.DER
    )


# Each damage as (function of the intact PEM text, phrases the problem must contain).
DAMAGES = {
    "empty": (lambda pem_text: b"", ["is empty; expected"]),
    "truncated": (
        truncate,
        ["is truncated: the ", "has no '-----END ", "copy the whole file"],
    ),
    "bad_character": (
        corrupt_base64_character,
        ["is corrupt: line 3, in the ", "not base64 text", "replace the file"],
    ),
    "cut_line": (cut_base64_line, ["is corrupt: the base64 text", "wrong length"]),
    "corrupt_der": (corrupt_der, ["is corrupt: the ", "does not decode as"]),
    "der": (to_der, ["in binary DER format, but PEM text is expected", "openssl "]),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("field", TLS_FILE_FIELDS)
def test_broken_pem_file_explained(
    field: str, damage: str, tmp_path: Path, pki: TestPKI, listener_cert: CertFiles
) -> None:
    make_broken, phrases = DAMAGES[damage]
    is_key = field.endswith("key_file")
    intact = listener_cert.key_file if is_key else listener_cert.cert_file
    broken = tmp_path / f"broken{intact.suffix}"
    broken.write_bytes(make_broken(intact.read_bytes()))

    with pytest.raises(TlsContextError) as caught:
        load_with_file(field, broken, listener_cert)

    message = str(caught.value)
    assert message.startswith(f"{field}: {str(broken)!r} "), message
    for phrase in phrases:
        assert phrase in message
    assert "PEM lib" not in message


def test_leaf_after_ca_certificate_named(
    tmp_path: Path, pki: TestPKI, listener_cert: CertFiles
) -> None:
    reversed_chain = tmp_path / "reversed.pem"
    reversed_chain.write_bytes(
        pki.ca_file.read_bytes() + listener_cert.cert_file.read_bytes()
    )
    listener = tls_listener(listener_cert, cert_file=reversed_chain)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.cert_file: {str(reversed_chain)!r}")
    assert "that certificate is number 2 of 2 in the file" in message
    assert "put the leaf certificate first" in message


def test_corrupt_second_certificate_named(
    tmp_path: Path, pki: TestPKI, listener_cert: CertFiles
) -> None:
    chain = tmp_path / "chain.pem"
    leaf = listener_cert.cert_file.read_bytes()
    chain.write_bytes(leaf + corrupt_base64_character(pki.ca_file.read_bytes()))
    second_begin = len(leaf.splitlines()) + 1

    with pytest.raises(TlsContextError) as caught:
        server_context(tls_listener(listener_cert, cert_file=chain), "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.cert_file: {str(chain)!r}")
    assert f"the certificate that begins on line {second_begin}" in message


def test_certificate_request_as_cert_named(
    tmp_path: Path, listener_cert: CertFiles
) -> None:
    key = serialization.load_pem_private_key(
        listener_cert.key_file.read_bytes(), password=None
    )
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
    )
    request_file = tmp_path / "request.pem"
    request_file.write_bytes(request.public_bytes(serialization.Encoding.PEM))

    with pytest.raises(TlsContextError) as caught:
        server_context(
            tls_listener(listener_cert, cert_file=request_file), "listeners.imaps"
        )

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.cert_file: {str(request_file)!r}")
    assert "contains no PEM certificate but a certificate request (CSR)" in message


@pytest.mark.parametrize("field", ["cert_file", "key_file"])
def test_file_removed_after_validation_named(
    field: str, tmp_path: Path, listener_cert: CertFiles
) -> None:
    # A reload validates the config before it loads the files, so a file can go between.
    copies = {}
    for name in ("cert_file", "key_file"):
        copies[name] = tmp_path / getattr(listener_cert, name).name
        copies[name].write_bytes(getattr(listener_cert, name).read_bytes())
    listener = tls_listener(listener_cert, **copies)
    copies[field].unlink()

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.{field}: {str(copies[field])!r}")
    assert "does not exist; check the path" in message


def test_small_certificate_key_explained(tmp_path: Path) -> None:
    # CPython 3.10 and newer set OpenSSL's security level 2 in every SSLContext, which
    # rejects RSA keys shorter than 2048 bits.
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    small = CertFiles(tmp_path / "small.pem", tmp_path / "small.key")
    small.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    small.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(TlsContextError) as caught:
        server_context(tls_listener(small), "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.cert_file: {str(small.cert_file)!r}")
    assert "whose key is too small for OpenSSL's security level" in message


def sm2_certificate(folder: Path) -> Path | None:
    """Write a self-signed SM2 certificate with the openssl command, or return None.

    The `cryptography` package cannot read SM2 keys, which is what the test needs.
    """
    key_file = folder / "sm2.key"
    cert_file = folder / "sm2.pem"
    commands = [
        ["openssl", "genpkey", "-algorithm", "SM2", "-out", str(key_file)],
        [
            "openssl",
            "req",
            "-x509",
            "-key",
            str(key_file),
            "-out",
            str(cert_file),
            "-subj",
            "/CN=localhost",
            "-sm3",
        ],
    ]
    for command in commands:
        try:
            result = subprocess.run(
                command, capture_output=True, timeout=30, check=False
            )
        except FileNotFoundError:
            return None
        if result.returncode != 0:
            return None
    return cert_file


def test_unsupported_key_type_no_traceback(
    tmp_path: Path, listener_cert: CertFiles
) -> None:
    cert_file = sm2_certificate(tmp_path)
    if cert_file is None:
        pytest.skip("this openssl command cannot create SM2 certificates")
    listener = tls_listener(
        listener_cert, cert_file=cert_file, key_file=listener_cert.key_file
    )

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(
        f"listeners.imaps.cert_file: certificate {str(cert_file)!r}"
    )
    assert "could not be loaded" in message


# Upstream (client-side) contexts


def test_upstream_verifies_by_default() -> None:
    context = client_context(UpstreamConfig(host="mail.example.org"), "upstreams.mail")

    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_upstream_verify_false_disables_checks() -> None:
    upstream = UpstreamConfig(host="mail.example.org", verify=False)

    context = client_context(upstream, "upstreams.mail")

    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False


def test_upstream_verify_false_accepts_untrusted(pki: TestPKI) -> None:
    untrusted = pki.server_cert("untrusted")
    server = server_context(tls_listener(untrusted), "listeners.imaps")
    client = client_context(
        UpstreamConfig(host="localhost", verify=False), "upstreams.mail"
    )

    assert run_handshake(server, client) in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("kind", ["untrusted", "wrong_host", "expired"])
def test_upstream_verify_rejects_bad_cert(pki: TestPKI, kind: str) -> None:
    server = server_context(tls_listener(pki.server_cert(kind)), "listeners.imaps")
    client = client_context(
        UpstreamConfig(host="localhost", ca_file=pki.ca_file), "upstreams.mail"
    )

    with pytest.raises(ssl.SSLCertVerificationError):
        run_handshake(server, client)


def test_upstream_ca_file_is_only_anchor(pki: TestPKI) -> None:
    upstream = UpstreamConfig(host="localhost", ca_file=pki.ca_file)

    context = client_context(upstream, "upstreams.mail")

    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("min_version", "expected"),
    [("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)],
    ids=["1.2", "1.3"],
)
def test_upstream_min_version_applied(
    min_version: str, expected: ssl.TLSVersion
) -> None:
    upstream = UpstreamConfig(host="mail.example.org", min_version=min_version)

    context = client_context(upstream, "upstreams.mail")

    assert context.minimum_version == expected


def test_upstream_min_version_rejects_older_server(
    pki: TestPKI, listener_cert: CertFiles
) -> None:
    server = server_context(tls_listener(listener_cert), "listeners.imaps")
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    client = client_context(
        UpstreamConfig(host="localhost", ca_file=pki.ca_file, min_version="1.3"),
        "upstreams.mail",
    )

    with pytest.raises(ssl.SSLError) as caught:
        run_handshake(server, client)

    assert not isinstance(caught.value, ssl.SSLCertVerificationError)


def test_non_pem_ca_file_names_field(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    upstream = UpstreamConfig(host="mail.example.org", ca_file=garbage)

    with pytest.raises(TlsContextError) as caught:
        client_context(upstream, "upstreams.mail")

    assert str(caught.value).startswith("upstreams.mail.ca_file:")
    assert str(garbage) in str(caught.value)


def test_private_key_as_ca_file_named(listener_cert: CertFiles) -> None:
    upstream = UpstreamConfig(host="mail.example.org", ca_file=listener_cert.key_file)

    with pytest.raises(TlsContextError) as caught:
        client_context(upstream, "upstreams.mail")

    message = str(caught.value)
    assert message.startswith(
        f"upstreams.mail.ca_file: {str(listener_cert.key_file)!r}"
    )
    assert "contains no PEM certificate but a private key" in message
    assert "expected one or more PEM CA certificates" in message


def test_client_cert_pair_loads(pki: TestPKI) -> None:
    client_cert = pki.issue_client_cert("proxy")
    upstream = UpstreamConfig(
        host="mail.example.org",
        client_cert_file=client_cert.cert_file,
        client_key_file=client_cert.key_file,
    )

    context = client_context(upstream, "upstreams.mail")

    assert context.verify_mode == ssl.CERT_REQUIRED


def test_mismatched_client_key_names_field(pki: TestPKI, other_cert: CertFiles) -> None:
    client_cert = pki.issue_client_cert("mismatch")
    upstream = UpstreamConfig(
        host="mail.example.org",
        client_cert_file=client_cert.cert_file,
        client_key_file=other_cert.key_file,
    )

    with pytest.raises(TlsContextError) as caught:
        client_context(upstream, "upstreams.mail")

    message = str(caught.value)
    assert message.startswith(
        f"upstreams.mail.client_cert_file: {str(client_cert.cert_file)!r}"
    )
    assert f"private key in client_key_file {str(other_cert.key_file)!r}" in message
    assert "set client_key_file to the key" in message


# Whole config


def test_build_all_contexts_covers_tls_only(
    pki: TestPKI, listener_cert: CertFiles
) -> None:
    config = AppConfig(
        listeners={
            "imaps": tls_listener(listener_cert).model_dump(),
            "imap": {"protocol": "imap", "port": 1143, "upstream": "mail"},
        },
        upstreams={
            "mail": {"host": "localhost", "ca_file": pki.ca_file},
            "backup": {"host": "backup.example.org", "verify": False},
        },
    )

    contexts = build_all_contexts(config)

    assert sorted(contexts.listeners) == ["imaps"]
    assert sorted(contexts.upstreams) == ["backup", "mail"]


def test_same_tls_settings_share_context(pki: TestPKI) -> None:
    config = AppConfig(
        upstreams={
            "one": {"host": "one.example.org", "ca_file": pki.ca_file},
            "two": {"host": "two.example.org", "port": 995, "ca_file": pki.ca_file},
            "own-ca": {"host": "one.example.org"},
            "no-verify": {"host": "one.example.org", "verify": False},
        },
    )

    upstreams = build_all_contexts(config).upstreams

    assert upstreams["one"] is upstreams["two"]
    assert upstreams["own-ca"] is not upstreams["one"]
    assert upstreams["no-verify"] is not upstreams["one"]
    assert upstreams["no-verify"].verify_mode == ssl.CERT_NONE


def test_context_key_covers_every_tls_field() -> None:
    base = UpstreamConfig(host="mail.example.org")
    changes = {
        "tls": "none",
        "verify": False,
        "ca_file": Path("/etc/ssl/other.pem"),
        "min_version": "1.3",
        "client_cert_file": Path("/etc/ssl/client.pem"),
        "client_key_file": Path("/etc/ssl/client.key"),
        "session_resumption": True,
    }
    for field_name, value in changes.items():
        changed = base.model_copy(update={field_name: value})
        assert contexts.client_context_key(changed) != contexts.client_context_key(
            base
        ), field_name


def test_build_all_contexts_names_failing_listener(
    listener_cert: CertFiles, other_cert: CertFiles
) -> None:
    listener = tls_listener(listener_cert, key_file=other_cert.key_file)
    config = AppConfig(
        listeners={"secure": listener.model_dump()},
        upstreams={"mail": {"host": "mail.example.org"}},
    )

    with pytest.raises(TlsContextError) as caught:
        build_all_contexts(config)

    assert str(caught.value).startswith("listeners.secure.cert_file:")


def test_build_all_contexts_lists_every_failure(
    pki: TestPKI, listener_cert: CertFiles
) -> None:
    # key_file names the CA certificate and ca_file a private key, as when an operator
    # swaps the two files.
    swapped_key = {"key_file": pki.ca_file}
    config = AppConfig(
        listeners={
            "imaps": tls_listener(listener_cert, **swapped_key).model_dump(),
            "pop3s": tls_listener(
                listener_cert, protocol="pop3", port=1995, **swapped_key
            ).model_dump(),
        },
        upstreams={"mail": {"host": "localhost", "ca_file": listener_cert.key_file}},
    )

    with pytest.raises(TlsContextError) as caught:
        build_all_contexts(config)

    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("listeners.imaps.")
    assert problems[1].startswith("listeners.pop3s.")
    assert problems[2].startswith("upstreams.mail.ca_file:")


def test_shared_failing_context_names_each_upstream(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    config = AppConfig(
        upstreams={
            "one": {"host": "one.example.org", "ca_file": garbage},
            "two": {"host": "two.example.org", "ca_file": garbage},
        },
    )

    with pytest.raises(TlsContextError) as caught:
        build_all_contexts(config)

    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("upstreams.one.ca_file:")
    assert problems[1].startswith("upstreams.two.ca_file:")


def fake_tls_object(server_name: str) -> SimpleNamespace:
    session = SimpleNamespace(has_ticket=True, id=b"id")
    return SimpleNamespace(server_hostname=server_name, session=session)


def test_sessions_kept_per_name_are_capped() -> None:
    context = contexts.UpstreamContext()
    for _ in range(contexts.SESSIONS_PER_SERVER_NAME + 5):
        context.remember_session(fake_tls_object("mail.example.org"))
    assert (
        context.session_count("mail.example.org") == contexts.SESSIONS_PER_SERVER_NAME
    )


def test_oldest_server_name_dropped_beyond_cap() -> None:
    context = contexts.UpstreamContext()
    for number in range(contexts.MAX_SERVER_NAMES + 1):
        context.remember_session(fake_tls_object(f"host{number}.example.org"))
    assert context.session_count("host0.example.org") == 0
    assert context.session_count("host1.example.org") == 1
    assert context.session_count(f"host{contexts.MAX_SERVER_NAMES}.example.org") == 1


def test_switched_off_context_keeps_nothing() -> None:
    context = contexts.UpstreamContext(resume_sessions=False)
    context.remember_session(fake_tls_object("mail.example.org"))
    assert context.session_count("mail.example.org") == 0


# Files that are no regular files, and hostile file contents

# Seconds a context build may take before the test counts it as blocked.
BLOCKED_AFTER = 10.0


def config_of_field(field: str, path: Path, cert: CertFiles) -> object:
    """Return the validated listener or upstream config with `field` set to `path`."""
    if field.startswith("listeners."):
        return tls_listener(cert, **{field.rsplit(".", 1)[1]: path})
    files: dict[str, object] = {
        "client_cert_file": cert.cert_file,
        "client_key_file": cert.key_file,
    }
    files[field.rsplit(".", 1)[1]] = path
    return UpstreamConfig(host="mail.example.org", **files)


def build_context_of(config: object) -> None:
    if isinstance(config, ListenerConfig):
        server_context(config, "listeners.imaps")
    else:
        client_context(config, "upstreams.mail")  # type: ignore[arg-type]


def release_fifo(fifo: Path) -> None:
    """End a blocked open() or read() of `fifo` by opening and closing its write end."""
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(descriptor)


@pytest.mark.parametrize("field", TLS_FILE_FIELDS)
def test_fifo_swapped_in_after_validation_rejected(
    field: str, tmp_path: Path, listener_cert: CertFiles
) -> None:
    # A reload validates the config before it loads the files, so a file can change
    # in between. OpenSSL's open() of a FIFO would wait for a writer forever.
    is_key = field.endswith("key_file")
    intact = listener_cert.key_file if is_key else listener_cert.cert_file
    swapped = tmp_path / intact.name
    swapped.write_bytes(intact.read_bytes())
    config = config_of_field(field, swapped, listener_cert)
    swapped.unlink()
    os.mkfifo(swapped)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            build_context_of(config)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            errors.append(exc)

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(BLOCKED_AFTER)
    blocked = worker.is_alive()
    if blocked:
        release_fifo(swapped)
        worker.join(BLOCKED_AFTER)

    assert not blocked, "the context build blocked on the FIFO"
    assert len(errors) == 1
    assert isinstance(errors[0], TlsContextError)
    message = str(errors[0])
    assert message.startswith(f"{field}: {str(swapped)!r} "), message
    assert "is not a regular file but a FIFO" in message


def test_unreadable_special_file_not_permission_problem() -> None:
    # Any process may open its own /proc/self/mem, but reading offset 0 fails with EIO.
    mem = Path("/proc/self/mem")
    if not mem.exists():
        pytest.skip("needs Linux /proc")
    upstream = UpstreamConfig(host="mail.example.org", ca_file=mem)

    with pytest.raises(TlsContextError) as caught:
        client_context(upstream, "upstreams.mail")

    message = str(caught.value)
    assert message.startswith("upstreams.mail.ca_file: '/proc/self/mem' cannot be read")
    assert "read access" not in message


def test_der_key_hint_keeps_certificate(tmp_path: Path, listener_cert: CertFiles) -> None:
    cert_file = tmp_path / "server.pem"
    cert_file.write_bytes(listener_cert.cert_file.read_bytes())
    key_file = tmp_path / "server.der"
    key_file.write_bytes(to_der(listener_cert.key_file.read_bytes()))
    listener = tls_listener(listener_cert, cert_file=cert_file, key_file=key_file)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.key_file: {str(key_file)!r}")
    command = message.split("'openssl ", 1)[1].split("'", 1)[0]
    output = Path(command.split(" -out ", 1)[1])
    assert output != cert_file
    assert not output.exists()


def test_der_certificate_hint_keeps_key(tmp_path: Path, listener_cert: CertFiles) -> None:
    cert_file = tmp_path / "server.der"
    cert_file.write_bytes(to_der(listener_cert.cert_file.read_bytes()))
    key_file = tmp_path / "server.pem"
    key_file.write_bytes(listener_cert.key_file.read_bytes())
    # Existing files are not overwritten either.
    (tmp_path / "server-2.pem").write_text("taken\n")
    listener = tls_listener(listener_cert, cert_file=cert_file, key_file=key_file)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.cert_file: {str(cert_file)!r}")
    command = message.split("'openssl ", 1)[1].split("'", 1)[0]
    output = Path(command.split(" -out ", 1)[1])
    assert output != key_file
    assert not output.exists()


def encrypted_key_text(cert: CertFiles) -> bytes:
    key = serialization.load_pem_private_key(cert.key_file.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"),
    )


# Each damage of an encrypted key as (function of the PEM text, phrase expected).
ENCRYPTED_KEY_DAMAGES = {
    "bad_character": (corrupt_base64_character, "not base64 text"),
    "corrupt_der": (corrupt_der, "does not decode as an encrypted private key"),
    "truncated": (truncate, "is truncated"),
}


@pytest.mark.parametrize("damage", ENCRYPTED_KEY_DAMAGES)
def test_damaged_encrypted_key_names_key_file(
    damage: str, tmp_path: Path, listener_cert: CertFiles
) -> None:
    make_broken, phrase = ENCRYPTED_KEY_DAMAGES[damage]
    broken = tmp_path / "encrypted.key"
    broken.write_bytes(make_broken(encrypted_key_text(listener_cert)))
    listener = tls_listener(listener_cert, key_file=broken)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert message.startswith(f"listeners.imaps.key_file: {str(broken)!r} "), message
    assert phrase in message
    assert "PEM lib" not in message


def test_oversized_file_reports_size(tmp_path: Path) -> None:
    huge = tmp_path / "huge.pem"
    size = contexts.pem.MAX_PEM_SIZE + 100
    huge.write_bytes(b"A" * size)
    upstream = UpstreamConfig(host="mail.example.org", ca_file=huge)

    with pytest.raises(TlsContextError) as caught:
        client_context(upstream, "upstreams.mail")

    message = str(caught.value)
    assert message.startswith(f"upstreams.mail.ca_file: {str(huge)!r} "), message
    assert "too large" in message
    assert f"{size} bytes" in message
    assert f"limit of {contexts.pem.MAX_PEM_SIZE} bytes" in message
    assert "PEM lib" not in message


# Each hostile file content as (bytes, phrase expected).
HOSTILE_CONTENTS = {
    "long_label": (b"-----BEGIN " + b"A" * 900_000 + b"-----\nMA==\n", "truncated"),
    "many_labels": (
        b"".join(
            b"-----BEGIN X%d-----\nMA==\n-----END X%d-----\n" % (n, n)
            for n in range(5000)
        ),
        "contains no PEM certificate but",
    ),
}
# Characters of a message about a hostile file; the files above are far longer.
MAX_MESSAGE_CHARS = 600


@pytest.mark.parametrize("content", HOSTILE_CONTENTS)
def test_file_text_in_message_bounded(
    content: str, tmp_path: Path, listener_cert: CertFiles
) -> None:
    data, phrase = HOSTILE_CONTENTS[content]
    hostile = tmp_path / "hostile.pem"
    hostile.write_bytes(data)
    listener = tls_listener(listener_cert, cert_file=hostile)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert phrase in message
    assert len(message) < MAX_MESSAGE_CHARS, message[:MAX_MESSAGE_CHARS]


def test_nested_begin_line_explained(tmp_path: Path, listener_cert: CertFiles) -> None:
    lines = listener_cert.cert_file.read_bytes().splitlines(keepends=True)
    nested = tmp_path / "nested.pem"
    nested.write_bytes(lines[0] + b"".join(lines))
    listener = tls_listener(listener_cert, cert_file=nested)

    with pytest.raises(TlsContextError) as caught:
        server_context(listener, "listeners.imaps")

    message = str(caught.value)
    assert "a new block begins on line 2" in message
    assert "before the END line of the CERTIFICATE block that begins on line 1" in message
    assert "truncated" not in message
