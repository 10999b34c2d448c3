"""Keys, join tokens, admission proofs and the ZAP handler for CURVE links.

The master keeps a CURVE keypair and a join secret in a directory (files mode 0600). A join
token is URL-safe base64 of ``master public key (32 bytes) || join secret``: it pins the
master's key for the worker and lets the worker prove it was invited, with an HMAC bound
to its own CURVE key (so a proof is useless to anyone without that device's secret key).
Device keys admitted once are remembered, so ``rotate_token`` locks out only new devices.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zmq
from zmq.utils import z85

from tpi.errors import GroupError

log = logging.getLogger(__name__)

SECRET_BYTES = 16
_PROOF_LABEL = b"tpi-join-v1"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
CONTROL_DOMAIN = b"tpi-control"
DATA_DOMAIN = b"tpi-data"


@dataclass(frozen=True)
class Keypair:
    """A CURVE keypair, both halves Z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes


@dataclass(frozen=True)
class JoinToken:
    """What a worker learns from the token: the master's key (Z85) and the join secret."""

    master_public: bytes
    secret: bytes


def _write_private(path: Path, data: bytes) -> None:
    """Write a file readable only by its owner, replacing any previous one atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _ensure_dir(key_dir: Path) -> Path:
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return key_dir


def load_or_create_keypair(key_dir: Path, name: str) -> Keypair:
    """The keypair stored as ``{name}.key`` in key_dir, generated on first use."""
    path = _ensure_dir(key_dir) / f"{name}.key"
    if path.exists():
        secret = path.read_bytes().strip()
        if len(secret) != 40:
            raise GroupError(f"key file {path} is damaged; delete it to generate a new key")
        return Keypair(public=zmq.curve_public(secret), secret=secret)
    public, secret = zmq.curve_keypair()
    _write_private(path, secret + b"\n")
    return Keypair(public=public, secret=secret)


def load_or_create_join_secret(key_dir: Path) -> bytes:
    """The master's current join secret, generated on first use."""
    path = _ensure_dir(key_dir) / "join.secret"
    if path.exists():
        raw = bytes.fromhex(path.read_text().strip())
        if len(raw) == SECRET_BYTES:
            return raw
        log.warning("join secret in %s is damaged; issuing a new one", path)
    return _new_join_secret(path)


def _new_join_secret(path: Path) -> bytes:
    raw = secrets.token_bytes(SECRET_BYTES)
    _write_private(path, raw.hex().encode() + b"\n")
    return raw


def make_token(master_public: bytes, secret: bytes) -> str:
    """Join token text: URL-safe base64 of raw master public key || secret, no padding."""
    raw = z85.decode(master_public) + secret
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def master_token(key_dir: Path) -> str:
    """The token for the master keys in key_dir (creating keys and secret if missing)."""
    keys = load_or_create_keypair(key_dir, "master")
    return make_token(keys.public, load_or_create_join_secret(key_dir))


def rotate_token(key_dir: Path) -> str:
    """Issue a new join secret; devices already admitted keep their admission."""
    keys = load_or_create_keypair(key_dir, "master")
    secret = _new_join_secret(_ensure_dir(key_dir) / "join.secret")
    return make_token(keys.public, secret)


def parse_token(token: str) -> JoinToken:
    """Token text -> JoinToken; raises GroupError when it is not a tpi token."""
    text = token.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as e:
        raise GroupError("join token is not valid base64: copy the whole --token value printed by tpi serve") from e
    if len(raw) != 32 + SECRET_BYTES:
        raise GroupError(
            f"join token decodes to {len(raw)} bytes, expected {32 + SECRET_BYTES}: "
            "copy the whole --token value printed by tpi serve"
        )
    return JoinToken(master_public=z85.encode(raw[:32]), secret=raw[32:])


def join_proof(secret: bytes, master_public: bytes, device_public: bytes) -> bytes:
    """HMAC-SHA256 proving knowledge of the join secret, bound to both CURVE keys."""
    return hmac.new(secret, _PROOF_LABEL + master_public + device_public, hashlib.sha256).digest()


def proof_is_valid(proof: bytes, secret: bytes, master_public: bytes, device_public: bytes) -> bool:
    return hmac.compare_digest(proof, join_proof(secret, master_public, device_public))


class AdmittedKeys:
    """Device public keys admitted before, persisted one per line in key_dir/admitted.keys."""

    def __init__(self, key_dir: Path):
        self._path = _ensure_dir(key_dir) / "admitted.keys"
        self._keys: set[bytes] = set()
        if self._path.exists():
            self._keys = {ln.strip() for ln in self._path.read_bytes().splitlines() if len(ln.strip()) == 40}

    def __contains__(self, key: bytes) -> bool:
        return key in self._keys

    def add(self, key: bytes) -> None:
        if key and key not in self._keys:
            self._keys.add(key)
            _write_private(self._path, b"".join(k + b"\n" for k in sorted(self._keys)))


def zap_reply(frames: list[bytes], allow: Callable[[bytes, bytes], bool]) -> list[bytes]:
    """Answer one ZAP request; ``allow(domain, z85_client_key)`` decides, User-Id is the key."""
    if len(frames) < 6 or frames[0] != b"1.0":
        return [b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"bad ZAP request", b"", b""]
    request_id, domain, address, mechanism = frames[1], frames[2], frames[3], frames[5]
    if mechanism != b"CURVE" or len(frames) < 7 or len(frames[6]) != 32:
        return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
    key = z85.encode(frames[6])
    if allow(domain, key):
        return [b"1.0", request_id, b"200", b"OK", key, b""]
    log.warning("refused encrypted connection from %s on %s: device key not admitted",
                address.decode(errors="replace"), domain.decode(errors="replace"))
    return [b"1.0", request_id, b"400", b"not admitted", b"", b""]


def configure_server(sock: zmq.Socket, keys: Keypair, domain: bytes) -> None:
    """Make sock a CURVE server with the master keys, checked by our ZAP handler."""
    sock.zap_domain = domain
    sock.curve_server = True
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public


def configure_client(sock: zmq.Socket, keys: Keypair, master_public: bytes) -> None:
    """Make sock a CURVE client pinned to the master's public key."""
    sock.curve_serverkey = master_public
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
