"""Admission and authentication on the master: who may join (the token), who was admitted (device
keys, remembered across token rotations), and who may open the data channel (the ZAP decision)."""
from __future__ import annotations

from pathlib import Path

import zmq

from tpi.transport import security
from tpi.transport.protocol import Hello


class Admission:
    """The master's keys and join secret, and the device keys admitted so far (keeper thread only)."""

    def __init__(self, key_dir: Path, insecure: bool):
        self.insecure = insecure
        self._key_dir = key_dir
        self._keys = security.load_or_create_keypair(key_dir, "master")
        self._secret = security.load_or_create_join_secret(key_dir)
        self._admitted = security.AdmittedKeys(key_dir)
        self._data_keys: set[bytes] = set()
        self.token = security.make_token(self._keys.public, self._secret)

    def secure(self, sock: zmq.Socket, domain: bytes) -> None:
        """CURVE on a server socket of this master (nothing on an insecure link)."""
        if not self.insecure:
            security.configure_server(sock, self._keys, domain)

    def proves_token(self, hello: Hello, device_key: bytes) -> bool:
        """Whether a joining device holds the current token (or was admitted once with its key)."""
        if device_key and device_key in self._admitted:
            return True
        # Re-read the secret per join (a small file): `tpi token rotate` takes effect at once.
        self._secret = security.load_or_create_join_secret(self._key_dir)
        self.token = security.make_token(self._keys.public, self._secret)
        return security.proof_is_valid(hello.proof, self._secret, self._keys.public, device_key)

    def admit(self, device_key: bytes) -> None:
        """Remember the device and let it open the data channel."""
        if device_key:
            self._admitted.add(device_key)
            self._data_keys.add(device_key)

    def revoke_data(self, device_key: bytes) -> None:
        """A lost device's data channel is closed to it until it is admitted again."""
        self._data_keys.discard(device_key)

    def zap_allows(self, domain: bytes, key: bytes) -> bool:
        # Anyone may attempt the control handshake (the token decides); data needs admission.
        return domain == security.CONTROL_DOMAIN or key in self._data_keys
