"""Find the master on the LAN: mDNS/DNS-SD announcements (python-zeroconf) keyed by the group's public id.

The master announces `_tpi._tcp` with its control port and, in the TXT record, the group id: a hash of
the master's public CURVE key taken from the token. The join secret is never announced, nor the key
itself. A joiner computes the same id from its token and connects only to announcements that carry it,
so groups on one LAN never mix. CURVE still pins the master's key: an impostor announcing someone
else's id fails the handshake (see docs/security.md).
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

from zmq.utils import z85

from tpi.errors import GroupError
from tpi.transport import security

log = logging.getLogger(__name__)

SERVICE_TYPE = "_tpi._tcp.local."
ANNOUNCE_VERSION = "1"
_GROUP_LABEL = b"tpi-group-id-v1"
SHORT_ID = 12  # hex digits of the group id in instance and host names


def group_id(token: str) -> str:
    """The group's public id: SHA-256 of the master's public key (from the token), 32 hex digits."""
    master_key = z85.decode(security.parse_token(token).master_public)
    return hashlib.sha256(_GROUP_LABEL + master_key).hexdigest()[:32]


def lan_addresses(host: str) -> list[str]:
    """The IPv4 addresses a master bound to `host` is reachable at, loopback excluded."""
    import ifaddr  # discovery's dependencies load only when a group announces or looks

    if host not in ("", "0.0.0.0"):
        return [] if ipaddress.ip_address(host).is_loopback else [host]
    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return [a for a in dict.fromkeys(found) if not ipaddress.ip_address(a).is_loopback]


class Announcer:
    """Announces one master on the LAN until closed; registration runs on a background thread."""

    def __init__(self, token: str, port: int, host: str = "0.0.0.0"):
        self.group = group_id(token)
        self.addresses = lan_addresses(host)
        self._zc = self._info = None
        self._closed = threading.Event()
        self._thread = None
        if not self.addresses:
            log.info("not announcing on the LAN: the master listens on %s only", host or "loopback")
            return
        self._thread = threading.Thread(target=self._register, args=(port,), name="tpi-announce", daemon=True)
        self._thread.start()

    def _register(self, port: int) -> None:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf  # (loaded on use, as above)

        short = self.group[:SHORT_ID]
        info = ServiceInfo(SERVICE_TYPE, f"tpi-{short}.{SERVICE_TYPE}", port=port,
                           addresses=[socket.inet_aton(a) for a in self.addresses],
                           properties={"v": ANNOUNCE_VERSION, "group": self.group},
                           server=f"tpi-{short}.local.")  # a per-group host name: masters never share A records
        try:
            zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        except OSError as e:
            log.warning("cannot announce on the LAN (%s); devices must join with the address", e)
            return
        try:
            zc.register_service(info, allow_name_change=True)
        except Exception as e:  # zeroconf raises its own family; the group still serves by address
            log.warning("announcing on the LAN failed (%s); devices must join with the address", e)
            zc.close()
            return
        self._zc, self._info = zc, info
        log.info("announced on the LAN as group %s at %s port %d", short, ", ".join(self.addresses), port)
        if self._closed.is_set():
            self._unregister()

    def _unregister(self) -> None:
        zc, self._zc = self._zc, None
        if zc is not None:
            try:
                zc.unregister_service(self._info)
            finally:
                zc.close()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._unregister()


@dataclass(frozen=True)
class FoundMaster:
    address: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


def find_master(token: str, timeout_s: float = 15.0) -> FoundMaster:
    """The master this token pins, found by mDNS; GroupError naming the fix when none answers in time."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf  # (loaded on use)

    gid = group_id(token)
    names: queue.Queue[str] = queue.Queue()
    others: set[str] = set()

    def on_change(zeroconf, service_type, name, state_change) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        if name.startswith(f"tpi-{gid[:SHORT_ID]}"):
            names.put(name)
        else:
            others.add(name)

    try:
        zc = Zeroconf(ip_version=IPVersion.V4Only)
    except OSError as e:
        raise GroupError(f"cannot look for the master on the LAN ({e}); give its address: "
                         "tpi join HOST:PORT (tpi serve prints it)") from e
    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    deadline = time.monotonic() + timeout_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                name = names.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            found = _resolve(zc, name, gid, deadline)
            if found is not None:
                log.info("found the master of group %s at %s", gid[:SHORT_ID], found.endpoint)
                return found
    finally:
        browser.cancel()
        zc.close()
    seen = f"; {len(others)} other tpi group(s) answered, none for this token" if others else ""
    raise GroupError(f"no tpi serve for this token answered on the LAN within {timeout_s:.0f}s{seen}. "
                     "Check the token (tpi serve prints it), or give the master's address: tpi join HOST:PORT")


def _resolve(zc, name: str, gid: str, deadline: float) -> FoundMaster | None:
    """The announcement's address if it carries this group's id and its port answers, else None."""
    from zeroconf import ServiceInfo  # (loaded on use)

    info = ServiceInfo(SERVICE_TYPE, name)
    if not info.request(zc, max(100, int((deadline - time.monotonic()) * 1000))):
        return None
    if (info.properties or {}).get(b"group") != gid.encode() or not info.port:
        return None  # another group whose id shares the short prefix
    for address in info.parsed_addresses():
        try:
            with socket.create_connection((address, info.port), timeout=2.0):
                return FoundMaster(address, info.port)
        except OSError:
            continue
    return None
