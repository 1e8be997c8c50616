"""Describe in plain words why OpenSSL could not load a certificate, key or CA file.

For a truncated or corrupt PEM file, OpenSSL's only reason is "PEM lib". So after a failed
load, the file is read again and checked block by block with the `cryptography` package.
Each function returns the rest of a sentence that starts with the file's path, such as
"is empty; expected ...", which ends with what the file should contain or how to fix it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import ParamSpec

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from appliance.files import FileTooLargeError, NotRegularFileError, read_regular

# Bytes of a file read for a diagnosis. A certificate chain takes a few kB and the system
# CA bundle of Debian 12 about 220 kB, so the limit only guards against huge files.
MAX_PEM_SIZE = 1 << 20
# Characters of a PEM label, such as "CERTIFICATE", shown in a message. The label comes
# from the file, so a hostile file could otherwise fill a log line with it.
MAX_LABEL_CHARS = 40
# Kinds of blocks listed when a file contains none of the expected kind.
MAX_KINDS_LISTED = 3
# Candidate output paths tried for an openssl conversion command.
MAX_CONVERSION_TARGETS = 20

_BEGIN = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----\s*$")
_END = re.compile(rb"^-----END ([A-Z0-9 ]+)-----\s*$")
_BASE64_LINE = re.compile(rb"^[A-Za-z0-9+/=]*$")
_CERTIFICATE_LABELS = ("CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE")
_P = ParamSpec("_P")
_KIND_BY_LABEL = {
    "CERTIFICATE REQUEST": "a certificate request (CSR)",
    "NEW CERTIFICATE REQUEST": "a certificate request (CSR)",
    "PUBLIC KEY": "a public key",
    "RSA PUBLIC KEY": "a public key",
    "X509 CRL": "a certificate revocation list",
    "DH PARAMETERS": "DH parameters",
    "EC PARAMETERS": "EC parameters",
}


@dataclass(frozen=True)
class PemBlock:
    """One `-----BEGIN label-----` block of a PEM file."""

    label: str
    line: int
    """Line number of the BEGIN line, counted from 1."""
    lines: list[bytes]
    """Lines between BEGIN and END, RFC 1421 headers such as Proc-Type included."""
    complete: bool
    """False when the END line is missing, as in a truncated file."""
    next_begin_line: int | None = None
    """Line of the BEGIN line that cut an incomplete block short, if one did."""

    @property
    def label_for_messages(self) -> str:
        """The label, shortened to MAX_LABEL_CHARS for messages."""
        return shorten(self.label, MAX_LABEL_CHARS)

    @property
    def is_certificate(self) -> bool:
        return self.label in _CERTIFICATE_LABELS

    @property
    def is_private_key(self) -> bool:
        return self.label.endswith("PRIVATE KEY")

    @property
    def is_encrypted(self) -> bool:
        # PKCS#8 names encryption in the label, the older OpenSSL format in a header.
        return self.label == "ENCRYPTED PRIVATE KEY" or any(
            line.startswith(b"Proc-Type:") and b"ENCRYPTED" in line
            for line in self.lines
        )


def shorten(text: str, limit: int) -> str:
    """Return `text` cut to `limit` characters, marked and with its length when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class _Unreadable(Exception):
    """The file cannot be opened or read; `error` is the OSError raised."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _best_effort(
    diagnose: Callable[_P, str | None],
) -> Callable[_P, str | None]:
    """Return None instead of raising when a diagnosis itself fails.

    A diagnosis runs only after OpenSSL rejected a file, and its caller then reports
    OpenSSL's own reason. A file that the `cryptography` package cannot handle, such as
    a certificate with an SM2 key, must not turn that report into a traceback.
    """

    @wraps(diagnose)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> str | None:
        try:
            return diagnose(*args, **kwargs)
        except Exception:  # noqa: BLE001
            return None

    return guarded


@_best_effort
def certificate_file_problem(
    path: Path, expected: str, other_files: Collection[Path] = ()
) -> str | None:
    """Return what is wrong with a PEM certificate file, or None when nothing is found.

    `expected` describes what the file should contain, such as "the certificate chain, leaf
    first". Every CERTIFICATE block must decode, because OpenSSL reads all of them.
    `other_files` are the other files of the same config entry, which a suggested
    conversion must not overwrite.
    """
    blocks, problem = _file_blocks(path, expected, other_files, _no_pem_certificate)
    if problem is not None:
        return problem
    certificates = [block for block in blocks if block.is_certificate]
    if not certificates:
        found = _kinds_found(blocks)
        return f"contains no PEM certificate but {found}; expected {expected}"
    for block in certificates:
        problem = _certificate_block_problem(block)
        if problem is not None:
            return problem
    return None


@_best_effort
def private_key_file_problem(
    path: Path, expected: str, other_files: Collection[Path] = ()
) -> str | None:
    """Return what is wrong with a PEM private key file, or None when nothing is found.

    OpenSSL uses the first private key block and skips the other blocks, so only that
    block is checked. `other_files` are as for `certificate_file_problem`.
    """
    blocks, problem = _file_blocks(path, expected, other_files, _no_pem_private_key)
    if problem is not None:
        return problem
    keys = [block for block in blocks if block.is_private_key]
    if not keys:
        found = _kinds_found(blocks)
        return f"contains no PEM private key but {found}; expected {expected}"
    return _private_key_block_problem(keys[0])


def _file_blocks(
    path: Path,
    expected: str,
    other_files: Collection[Path],
    no_pem: Callable[[Path, bytes, str, Collection[Path]], str],
) -> tuple[list[PemBlock], str | None]:
    """Read and split a PEM file, or return the problem that stops its checks.

    The problem covers a file that cannot be read, is empty, holds no PEM block (then
    `no_pem` describes what it holds instead) or ends inside a block.
    """
    try:
        data = _read(path)
    except _Unreadable as exc:
        return [], open_error_problem(path, exc.error, expected)
    if not data.strip():
        return [], f"is empty; expected {expected}"
    blocks = parse_blocks(data)
    if not blocks:
        return [], no_pem(path, data, expected, other_files)
    return blocks, _truncation_problem(blocks)


@_best_effort
def key_mismatch_problem(
    cert_file: Path, key_file: Path, cert_field: str, key_field: str
) -> str | None:
    """Return how a certificate chain and its key fail to match, or None if they match.

    Call it once both files have passed their own checks. Returns None too when either
    file does not parse, because then the mismatch is not what failed.
    """
    try:
        cert_data = _read(cert_file)
        key_data = _read(key_file)
    except _Unreadable:
        return None
    keys = [block for block in parse_blocks(key_data) if block.is_private_key]
    if not keys:
        return None
    key_der, _ = _decode_body(keys[0], "the private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
        key = serialization.load_der_private_key(key_der or b"", password=None)
        key_public = _public_key_der(key.public_key())
        chain_public = [_public_key_der(cert.public_key()) for cert in chain]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Such as a certificate with a key type that `cryptography` does not support.
        return None
    if chain_public[0] == key_public:
        return None
    for position, public in enumerate(chain_public[1:], start=2):
        if public == key_public:
            return (
                f"does not start with the certificate of the private key in {key_field} "
                f"{str(key_file)!r}: that certificate is number {position} of "
                f"{len(chain)} in the file; put the leaf certificate first, then the "
                "CA certificates that issued it"
            )
    return (
        f"starts with a certificate that does not belong to the private key in "
        f"{key_field} {str(key_file)!r} (their public keys differ); set {key_field} to "
        f"the key that the certificate was issued for, or {cert_field} to the "
        "certificate of that key"
    )


def load_error_reason(exc: BaseException) -> str:
    """Return OpenSSL's reason or the system's error text for a failed load."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return "OpenSSL: " + exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def parse_blocks(data: bytes) -> list[PemBlock]:
    """Split PEM text into its blocks, ignoring text outside them as OpenSSL does."""
    blocks: list[PemBlock] = []
    label: str | None = None
    begin_line = 0
    lines: list[bytes] = []
    for number, line in enumerate(data.splitlines(), start=1):
        begin = _BEGIN.match(line)
        if begin is not None:
            if label is not None:
                blocks.append(PemBlock(label, begin_line, lines, False, number))
            label, begin_line, lines = begin.group(1).decode("ascii"), number, []
            continue
        if label is None:
            continue
        end = _END.match(line)
        if end is not None and end.group(1).decode("ascii") == label:
            blocks.append(PemBlock(label, begin_line, lines, True))
            label = None
        else:
            lines.append(line)
    if label is not None:
        blocks.append(PemBlock(label, begin_line, lines, False))
    return blocks


def _read(path: Path) -> bytes:
    """Return the file's bytes.

    Raises _Unreadable with the reason when the file cannot be opened or read, is no
    regular file or exceeds MAX_PEM_SIZE.
    """
    try:
        return read_regular(path, MAX_PEM_SIZE)
    except OSError as exc:
        raise _Unreadable(exc) from None


def open_error_problem(
    path: Path, error: OSError, expected: str = "a PEM file"
) -> str:
    """Describe a file that could not be opened or read, with the fix."""
    if isinstance(error, NotRegularFileError):
        return (
            f"is not a regular file but {error.kind}; expected {expected} in a "
            "regular file"
        )
    if isinstance(error, FileTooLargeError):
        return (
            f"could not be loaded and is too large to check: {error.size} bytes, more "
            f"than the limit of {error.limit} bytes; expected {expected}"
        )
    if isinstance(error, FileNotFoundError):
        if path.is_absolute():
            return "does not exist; check the path"
        return (
            "does not exist; check the path, which is relative to the working "
            f"directory {str(Path.cwd())!r}"
        )
    if isinstance(error, IsADirectoryError):
        return "is a directory; set the path of the PEM file inside it"
    reason = error.strerror or type(error).__name__
    if isinstance(error, PermissionError):
        return (
            f"cannot be read ({reason}); give the user that runs the appliance read "
            "access to it"
        )
    # Such as EIO from /proc/self/mem, which root may open but not read from offset 0.
    return f"cannot be read ({reason}); set the path of a file that contains {expected}"


def _truncation_problem(blocks: list[PemBlock]) -> str | None:
    for block in blocks:
        if block.complete:
            continue
        label = block.label_for_messages
        if block.next_begin_line is not None:
            return (
                f"is corrupt: a new block begins on line {block.next_begin_line}, "
                f"before the END line of the {label} block that begins on line "
                f"{block.line}; remove the extra BEGIN line, or add the missing "
                f"'-----END {label}-----' line"
            )
        return (
            f"is truncated: the {label} block that begins on line {block.line} has "
            f"no '-----END {label}-----' line; copy the whole file again"
        )
    return None


def _decode_body(block: PemBlock, block_name: str) -> tuple[bytes | None, str | None]:
    """Return the DER bytes of a block, or None and what is wrong with its base64 text.

    `block_name` names the block in the problem, such as "the certificate that begins
    on line 3".
    """
    body: list[tuple[int, bytes]] = []
    in_headers = bool(block.lines) and b":" in block.lines[0]
    for offset, line in enumerate(block.lines):
        stripped = line.strip()
        if in_headers:
            # Headers such as Proc-Type end with an empty line (RFC 1421).
            in_headers = bool(stripped)
            continue
        body.append((block.line + 1 + offset, stripped))
    for number, line in body:
        if not _BASE64_LINE.match(line):
            return None, (
                f"line {number}, in {block_name}, contains characters that are not "
                "base64 text"
            )
    try:
        der = base64.b64decode(b"".join(line for _, line in body), validate=True)
    except binascii.Error:
        return None, (
            f"the base64 text of {block_name} has a wrong length, so lines are "
            "missing or cut short"
        )
    if not der:
        return None, f"{block_name} contains no data"
    return der, None


def _certificate_block_problem(block: PemBlock) -> str | None:
    block_name = f"the certificate that begins on line {block.line}"
    fix = "replace the file with an intact copy of the certificate"
    der, base64_problem = _decode_body(block, block_name)
    if der is None:
        return f"is corrupt: {base64_problem}; {fix}"
    if block.label != "CERTIFICATE":
        # OpenSSL appends trust settings to TRUSTED CERTIFICATE blocks, which
        # `cryptography` does not parse.
        return None
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return (
            f"is corrupt: {block_name} does not decode as an X.509 certificate; {fix}"
        )
    return None


def _private_key_block_problem(block: PemBlock) -> str | None:
    block_name = f"the private key that begins on line {block.line}"
    fix = "replace the file with an intact copy of the key"
    der, base64_problem = _decode_body(block, block_name)
    if der is None:
        return f"is corrupt: {base64_problem}; {fix}"
    if block.is_encrypted:
        return _encrypted_key_problem(block, der, block_name)
    try:
        serialization.load_der_private_key(der, password=None)
    except UnsupportedAlgorithm:
        return (
            f"contains a key type that cannot be loaded: {block_name}; use an RSA, "
            "EC or Ed25519 key"
        )
    except (ValueError, TypeError):
        return f"is corrupt: {block_name} does not decode as a private key; {fix}"
    return None


def _encrypted_key_problem(block: PemBlock, der: bytes, block_name: str) -> str:
    """Describe an encrypted key block that OpenSSL failed to read.

    An intact encrypted key makes OpenSSL ask for the password, which the load reports
    before any diagnosis runs, so the block reaching here is most likely damaged.
    """
    fix = (
        "replace the file with an intact copy of the key, decrypted, because the "
        "appliance takes no key password"
    )
    if block.label == "ENCRYPTED PRIVATE KEY":
        try:
            serialization.load_der_private_key(der, password=None)
        except TypeError:
            # The PKCS#8 structure parsed and needs a password, so it is intact.
            pass
        except (ValueError, UnsupportedAlgorithm):
            return (
                f"is corrupt: {block_name} does not decode as an encrypted private "
                f"key; {fix}"
            )
    return (
        f"contains an encrypted private key that could not be read: {block_name}, "
        f"which may be damaged; {fix}"
    )


def _no_pem_certificate(
    path: Path, data: bytes, expected: str, other_files: Collection[Path]
) -> str:
    source, target = _conversion_paths(path, other_files)
    if _is_der_certificate(data):
        return (
            "contains a certificate in binary DER format, but PEM text is expected; "
            f"convert it with 'openssl x509 -inform DER -in {source} -out {target}' "
            "and use the new file"
        )
    if _is_der_private_key(data):
        return (
            "contains a private key in binary DER format, not a certificate; "
            f"expected {expected}"
        )
    return (
        "contains no PEM certificate (no '-----BEGIN CERTIFICATE-----' line); "
        f"expected {expected}"
    )


def _no_pem_private_key(
    path: Path, data: bytes, expected: str, other_files: Collection[Path]
) -> str:
    source, target = _conversion_paths(path, other_files)
    if _is_der_private_key(data):
        return (
            "contains a private key in binary DER format, but PEM text is expected; "
            f"convert it with 'openssl pkey -inform DER -in {source} -out {target}' "
            "and use the new file"
        )
    if _is_der_certificate(data):
        return (
            "contains a certificate in binary DER format, not a private key; "
            f"expected {expected}"
        )
    return (
        "contains no PEM private key (no '-----BEGIN PRIVATE KEY-----' line); "
        f"expected {expected}"
    )


def _conversion_paths(path: Path, other_files: Collection[Path]) -> tuple[str, str]:
    """Return the shell-quoted input and output paths of an openssl conversion.

    The output path is neither `path`, one of `other_files` nor an existing file, so
    running the suggested command overwrites nothing.
    """
    configured = {_absolute(file) for file in (path, *other_files)}
    stem = path.with_suffix("") if path.suffix != ".pem" else path
    candidates = [Path(f"{stem}.pem")]
    candidates += [
        Path(f"{stem}-{number}.pem") for number in range(2, MAX_CONVERSION_TARGETS + 1)
    ]
    for target in candidates:
        if _absolute(target) not in configured and not os.path.lexists(target):
            break
    else:
        # NOTE: every candidate exists; openssl would overwrite the last one.
        target = candidates[-1]
    return shlex.quote(str(path)), shlex.quote(str(target))


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _kinds_found(blocks: list[PemBlock]) -> str:
    kinds: list[str] = []
    for block in blocks:
        if block.is_certificate:
            kind = "a certificate"
        elif block.is_private_key:
            kind = "a private key"
        else:
            kind = _KIND_BY_LABEL.get(block.label, f"a {block.label_for_messages} block")
        if kind not in kinds:
            kinds.append(kind)
    if len(kinds) > MAX_KINDS_LISTED:
        others = len(kinds) - MAX_KINDS_LISTED
        kinds = [*kinds[:MAX_KINDS_LISTED], f"{others} other kinds of blocks"]
    return " and ".join(kinds)


def _is_der_certificate(data: bytes) -> bool:
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        return False
    return True


def _is_der_private_key(data: bytes) -> bool:
    try:
        serialization.load_der_private_key(data, password=None)
    except TypeError:
        # The key is encrypted, which needs a password but shows that it is a key.
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False
    return True


def _public_key_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
