"""The declarative state of a softnic instance: uplink, VFs, SAs, policies, FDB entries.

What the fields mean follows the specifications they configure: ESP SAs per RFC 4303
(SPI 1-255 reserved by IANA, §2.1; anti-replay §3.4.3; ESN per RFC 4304), the algorithms
of RFC 4106 (AES-GCM, key || 4-byte salt), RFC 7634 (ChaCha20-Poly1305, key || salt),
RFC 3602 + RFC 4868 (AES-CBC with HMAC-SHA-256-128), UDP encapsulation per RFC 3948,
VXLAN per RFC 7348 (24-bit VNI), and selectors in the spirit of RFC 4301 §4.4.1 / Linux
`ip xfrm policy`.

Every object is a frozen dataclass that validates itself on construction and raises
`ValidationError` naming the offending field. `from_dict()` builds an object from
untrusted JSON/TOML values (strict types, no silent coercion) and prefixes the field path
("vf[1].mac", "sa.spi"). `to_dict()` gives the public, redacted view: key bytes never leave
a `Secret` except through `Secret.reveal()`, which only the datapath calls.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class ValidationError(ValueError):
    """A value was rejected. `field` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message

    def prefixed(self, prefix: str) -> ValidationError:
        path = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return ValidationError(path, self.message)


class Secret:
    """Key bytes that never show themselves: not in repr/str/format, not in JSON, not in
    pickles. Only `reveal()` gives the bytes (for the datapath's crypto setup), as a
    read-only view of the one buffer that holds them.

    The bytes live in a bytearray, the one Python object that can be overwritten in
    place: `wipe()` zeroes it, and so does the collector when the last reference goes
    (an SA deleted, a config replaced by a reload). What Python cannot wipe is the hex
    text a key arrives as (TOML and JSON parsing make immutable str objects); that is
    freed, not zeroed, so core dumps stay off (softnic.daemon) and only root can read
    the daemon's memory."""

    __slots__ = ("_b",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._b = bytearray(data)

    def reveal(self) -> memoryview:
        return memoryview(self._b).toreadonly()

    def wipe(self) -> None:
        # Same-length slice assignment overwrites the buffer in place (no reallocation
        # that would leave the old bytes behind), even while a view of it exists.
        self._b[:] = bytes(len(self._b))

    def __del__(self) -> None:
        try:
            self.wipe()
        except (AttributeError, TypeError):  # half-built, or at interpreter shutdown
            pass

    def __len__(self) -> int:
        return len(self._b)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._b)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        # Constant time, so equality (used by reload diffs) leaks no key bytes by timing.
        return isinstance(other, Secret) and hmac.compare_digest(self._b, other._b)

    def __hash__(self) -> int:
        return hash((Secret, len(self._b)))

    def __reduce__(self) -> Any:
        raise TypeError("Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: Any) -> Secret:
        return self

    @classmethod
    def from_hex(cls, value: Any, field: str) -> Secret:
        """Parse "0x..." / "..." hex. The error never echoes the value. The raw bytes are
        made straight into the Secret's own buffer (no intermediate bytes object)."""
        if isinstance(value, Secret):
            return value
        if not isinstance(value, str):
            raise ValidationError(field, "must be a hex string (0x...)")
        s = value[2:] if value[:2] in ("0x", "0X") else value
        if not s or len(s) % 2 or not re.fullmatch(r"[0-9a-fA-F]+", s):
            raise ValidationError(field, "must be an even number of hex digits (0x...)")
        out = cls.__new__(cls)
        out._b = bytearray.fromhex(s)
        return out


REDACTED = "<redacted>"

# --- small strict converters (each raises ValidationError(field, ...)) -------------------


def _int(v: Any, f: str, lo: int, hi: int) -> int:
    # bool is an int in Python; a JSON true must not become 1.
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str):
            try:
                v = int(v, 0)
            except ValueError:
                raise ValidationError(f, "must be an integer") from None
        else:
            raise ValidationError(f, "must be an integer")
    if not lo <= v <= hi:
        raise ValidationError(f, f"must be in {lo}..{hi}")
    return v


def _opt_int(v: Any, f: str, lo: int, hi: int) -> int | None:
    return None if v is None else _int(v, f, lo, hi)


def _seti(obj: Any, name: str, lo: int, hi: int, optional: bool = False) -> int | None:
    """Check an int field of a frozen dataclass and store its canonical value."""
    v = getattr(obj, name)
    v = None if optional and v is None else _int(v, name, lo, hi)
    object.__setattr__(obj, name, v)
    return v


def _bool(v: Any, f: str) -> bool:
    if not isinstance(v, bool):
        raise ValidationError(f, "must be true or false")
    return v


def _choice(v: Any, f: str, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValidationError(f, "must be one of " + "|".join(choices))
    return v


def _str(v: Any, f: str, pattern: str, what: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(pattern, v):
        raise ValidationError(f, f"must be {what}")
    return v


def _addr(v: Any, f: str) -> IPAddress:
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return v
    if not isinstance(v, str):
        raise ValidationError(f, "must be an IPv4 or IPv6 address")
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        raise ValidationError(f, "must be an IPv4 or IPv6 address") from None


def _net(v: Any, f: str) -> IPNetwork:
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return v
    if not isinstance(v, str):
        raise ValidationError(f, "must be an address prefix (A/LEN)")
    try:
        # Host bits are masked off, as `ip xfrm policy` does.
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValidationError(f, "must be an address prefix (A/LEN)") from None


def _iface(v: Any, f: str) -> IPInterface:
    if isinstance(v, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return v
    if not isinstance(v, str) or "/" not in v:
        raise ValidationError(f, "must be an address with prefix length (A/LEN)")
    try:
        return ipaddress.ip_interface(v)
    except ValueError:
        raise ValidationError(f, "must be an address with prefix length (A/LEN)") from None


def _mac(v: Any, f: str) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", v):
        raise ValidationError(f, "must be a MAC address (aa:bb:cc:dd:ee:ff)")
    v = v.lower()
    if int(v[:2], 16) & 1:
        raise ValidationError(f, "must be a unicast MAC address")
    if v == "00:00:00:00:00:00":
        raise ValidationError(f, "must not be all zeros")
    return v


NAME_RE = r"[A-Za-z][A-Za-z0-9_.-]{0,31}"
IFNAME_RE = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}"  # IFNAMSIZ 16 with the NUL
UPLINK = "uplink"  # the scope name of the device-terminated SA table; no VF may use it

PROTOCOLS = {"any": None, "icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50,
             "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132}
PORT_PROTOCOLS = (6, 17, 132)


def _check_keys(d: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
    """Reject unknown keys: a typo in a config must not silently become a default."""
    if not isinstance(d, Mapping):
        raise ValidationError(prefix, "must be a table/object")
    for k in d:
        if k not in allowed:
            raise ValidationError(f"{prefix}.{k}" if prefix else str(k), "unknown field")


def _build(cls: type, d: Mapping[str, Any], prefix: str, conv: dict[str, Any]) -> Any:
    allowed = {f.name for f in fields(cls)}
    _check_keys(d, allowed, prefix)
    kw = {}
    try:
        for k, v in d.items():
            kw[k] = conv[k](v, k) if k in conv else v
        return cls(**kw)
    except ValidationError as e:
        raise e.prefixed(prefix) from None
    except TypeError as e:  # a missing required field
        m = re.search(r"arguments?: '(\w+)'", str(e))
        name = m.group(1) if m else ""
        raise ValidationError(f"{prefix}.{name}" if prefix and name else (name or prefix),
                              "is required") from None


# --- the objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Uplink:
    """The underlay side: local VTEP address, MTU, ports, device-terminated IPsec."""

    local: IPAddress
    mtu: int = 1500
    vxlan_port: int = 4789
    ipsec: str = "off"             # off | esp | espinudp (device-terminated model)
    espinudp_port: int = 4500      # RFC 3948 NAT-T port
    sa_select: str = "flow-hash"   # flow-hash: several SAs per VTEP pair (RFC 9611 spirit)
    fdb_learning: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "local", _addr(self.local, "local"))
        _seti(self, "mtu", 576 if self.local.version == 4 else 1280, 65535)
        _seti(self, "vxlan_port", 1, 65535)
        _choice(self.ipsec, "ipsec", ("off", "esp", "espinudp"))
        _seti(self, "espinudp_port", 1, 65535)
        _choice(self.sa_select, "sa_select", ("flow-hash", "single"))
        _bool(self.fdb_learning, "fdb_learning")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "uplink") -> Uplink:
        return _build(cls, d, prefix, {})

    def to_dict(self) -> dict[str, Any]:
        return {"local": str(self.local), "mtu": self.mtu, "vxlan_port": self.vxlan_port,
                "ipsec": self.ipsec, "espinudp_port": self.espinudp_port,
                "sa_select": self.sa_select, "fdb_learning": self.fdb_learning}


@dataclass(frozen=True)
class VF:
    """A VF port: a TAP device (optionally moved into a netns) or a vhost-user socket."""

    name: str
    kind: str                       # tap | vhost-user
    mac: str
    vni: int
    mtu: int = 1500
    ipsec: str = "off"              # off | offload | enforce
    # tap
    ifname: str | None = None
    netns: str | None = None
    addresses: tuple[IPInterface, ...] = ()
    # vhost-user
    socket: str | None = None
    vhost_mode: str | None = None   # server | client
    queues: int | None = None

    def __post_init__(self) -> None:
        _str(self.name, "name", NAME_RE, "a name of letters, digits, _ . - (at most 32)")
        if self.name == UPLINK:
            raise ValidationError("name", f"'{UPLINK}' is reserved")
        _choice(self.kind, "kind", ("tap", "vhost-user"))
        object.__setattr__(self, "mac", _mac(self.mac, "mac"))
        _seti(self, "vni", 0, (1 << 24) - 1)
        _seti(self, "mtu", 68, 65535)
        _choice(self.ipsec, "ipsec", ("off", "offload", "enforce"))
        if self.kind == "tap":
            for f in ("socket", "vhost_mode", "queues"):
                if getattr(self, f) is not None:
                    raise ValidationError(f, "only for kind vhost-user")
            ifname = self.name[:15] if self.ifname is None else self.ifname
            object.__setattr__(self, "ifname", _str(ifname, "ifname", IFNAME_RE,
                                                    "an interface name (at most 15 chars)"))
            if self.netns is not None:
                _str(self.netns, "netns", r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}",
                     "a network namespace name")
            if not isinstance(self.addresses, list | tuple):
                raise ValidationError("addresses", "must be a list of A/LEN")
            addrs = tuple(_iface(a, f"addresses[{i}]") for i, a in enumerate(self.addresses))
            object.__setattr__(self, "addresses", addrs)
        else:
            for f in ("ifname", "netns"):
                if getattr(self, f) is not None:
                    raise ValidationError(f, "only for kind tap")
            if self.addresses:
                raise ValidationError("addresses", "only for kind tap")
            if self.socket is None:
                raise ValidationError("socket", "is required for kind vhost-user")
            _str(self.socket, "socket", r"/[^\x00]{1,106}", "an absolute path (at most 107 bytes)")
            mode = "server" if self.vhost_mode is None else self.vhost_mode
            object.__setattr__(self, "vhost_mode",
                               _choice(mode, "vhost_mode", ("server", "client")))
            object.__setattr__(self, "queues", _int(1 if self.queues is None else self.queues,
                                                    "queues", 1, 64))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "vf") -> VF:
        return _build(cls, d, prefix, {})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "mac": self.mac,
                             "vni": self.vni, "mtu": self.mtu, "ipsec": self.ipsec}
        if self.kind == "tap":
            d.update(ifname=self.ifname, netns=self.netns,
                     addresses=[str(a) for a in self.addresses])
        else:
            d.update(socket=self.socket, vhost_mode=self.vhost_mode, queues=self.queues)
        return d


# Algorithm name (model) -> (Linux xfrm name, allowed cipher key lengths incl. salt,
# allowed ICV bits, needs an auth key).
ALGS: dict[str, tuple[str, tuple[int, ...], tuple[int, ...], bool]] = {
    "aes-gcm": ("rfc4106(gcm(aes))", (20, 36), (64, 96, 128), False),
    "chacha20-poly1305": ("rfc7539esp(chacha20,poly1305)", (36,), (128,), False),
    "aes-cbc-hmac-sha256": ("cbc(aes)", (16, 32), (128,), True),
}
AUTH_KEY_LEN = 32  # hmac(sha256) per RFC 4868: key = output size
# enum sn_alg / enum sn_engine of softnic/csrc/sn_crypto.h
ALG_IDS = {"aes-gcm": 1, "chacha20-poly1305": 2, "aes-cbc-hmac-sha256": 3}
ENGINE_IDS = {"auto": 0, "openssl": 1, "ipsec-mb": 2}


@dataclass(frozen=True)
class SA:
    """An ESP SA in one scope (a VF's table or the uplink's), one direction."""

    scope: str                      # a VF name, or "uplink"
    dir: str                        # out | in
    src: IPAddress
    dst: IPAddress
    spi: int
    alg: str
    key: Secret                     # cipher key || salt (RFC 4106 / 7634 layout)
    icv_bits: int = 128
    auth_key: Secret | None = None  # CBC+HMAC only
    reqid: int = 0
    mode: str = "tunnel"            # tunnel | transport
    replay_window: int = 64
    esn: bool = False
    encap_sport: int | None = None  # espinudp (RFC 3948) when set
    encap_dport: int | None = None
    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_packets: int | None = None
    hard_packets: int | None = None
    engine: str = "auto"            # auto | openssl | ipsec-mb

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.scope != UPLINK:
            _str(self.scope, "scope", NAME_RE, f"a VF name or '{UPLINK}'")
        _choice(self.dir, "dir", ("out", "in"))
        s(self, "src", _addr(self.src, "src"))
        s(self, "dst", _addr(self.dst, "dst"))
        if self.src.version != self.dst.version:
            raise ValidationError("dst", "address family differs from src")
        _seti(self, "spi", 256, 0xFFFFFFFF)  # 0 is invalid, 1-255 reserved (RFC 4303 §2.1)
        _choice(self.alg, "alg", tuple(ALGS))
        _, key_lens, icvs, needs_auth = ALGS[self.alg]
        if not isinstance(self.key, Secret):
            raise ValidationError("key", "must be key bytes")
        if len(self.key) not in key_lens:
            raise ValidationError("key", f"{self.alg} needs {' or '.join(map(str, key_lens))}"
                                  f" bytes{'' if needs_auth else ' (key + 4-byte salt)'},"
                                  f" got {len(self.key)}")
        _seti(self, "icv_bits", 0, 512)
        if self.icv_bits not in icvs:
            raise ValidationError("icv_bits", f"{self.alg} allows {'/'.join(map(str, icvs))}")
        if needs_auth:
            if not isinstance(self.auth_key, Secret):
                raise ValidationError("auth_key", "is required for " + self.alg)
            if len(self.auth_key) != AUTH_KEY_LEN:
                raise ValidationError("auth_key", f"hmac(sha256) needs {AUTH_KEY_LEN} bytes,"
                                      f" got {len(self.auth_key)}")
        elif self.auth_key is not None:
            raise ValidationError("auth_key", "only for aes-cbc-hmac-sha256")
        _seti(self, "reqid", 0, 0xFFFFFFFF)
        _choice(self.mode, "mode", ("tunnel", "transport"))
        _seti(self, "replay_window", 0, 4096)
        _bool(self.esn, "esn")
        if self.esn and self.replay_window == 0:  # as the kernel: ESN needs a window
            raise ValidationError("esn", "needs replay_window > 0")
        if (self.encap_sport is None) != (self.encap_dport is None):
            raise ValidationError("encap_dport" if self.encap_dport is None else "encap_sport",
                                  "encap needs both ports")
        if self.encap_sport is not None:
            _seti(self, "encap_sport", 1, 65535)
            _seti(self, "encap_dport", 1, 65535)
        for kind in ("bytes", "packets"):
            soft = _opt_int(getattr(self, "soft_" + kind), "soft_" + kind, 1, (1 << 64) - 1)
            hard = _opt_int(getattr(self, "hard_" + kind), "hard_" + kind, 1, (1 << 64) - 1)
            object.__setattr__(self, "soft_" + kind, soft)
            object.__setattr__(self, "hard_" + kind, hard)
            if soft is not None and hard is not None and soft > hard:
                raise ValidationError("soft_" + kind, "must not exceed hard_" + kind)
        _choice(self.engine, "engine", ("auto", "openssl", "ipsec-mb"))

    @property
    def ident(self) -> tuple[str, str, int]:
        return (self.scope, self.dir, self.spi)

    # What sn_xform_new() (softnic/csrc/sn_crypto.h) takes; key/auth_key already have the
    # layout it expects (GCM/ChaCha: key || 4-byte salt, as `ip xfrm`).
    @property
    def alg_id(self) -> int:
        return ALG_IDS[self.alg]

    @property
    def engine_id(self) -> int:
        return ENGINE_IDS[self.engine]

    @property
    def icv_len(self) -> int:
        return self.icv_bits // 8

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "sa") -> SA:
        def key(v: Any, f: str) -> Secret:
            return Secret.from_hex(v, f)
        return _build(cls, d, prefix, {"key": key, "auth_key": key})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Secret):
                v = REDACTED
            elif isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
                v = str(v)
            d[f.name] = v
        d["spi"] = f"0x{self.spi:08x}"
        return d


@dataclass(frozen=True)
class Policy:
    """A selector -> protect (an SA by reqid or SPI) | bypass | discard, per scope and dir.
    Lower `priority` wins, as in Linux xfrm."""

    scope: str
    dir: str                         # out | in
    src: IPNetwork
    dst: IPNetwork
    action: str                      # protect | bypass | discard
    proto: int | None = None         # None = any
    sport: int | None = None
    dport: int | None = None
    reqid: int | None = None         # protect: the SA(s) with this reqid ...
    spi: int | None = None           # ... or the SA with this SPI
    priority: int = 0

    def __post_init__(self) -> None:
        s = object.__setattr__
        if self.scope != UPLINK:
            _str(self.scope, "scope", NAME_RE, f"a VF name or '{UPLINK}'")
        _choice(self.dir, "dir", ("out", "in"))
        s(self, "src", _net(self.src, "src"))
        s(self, "dst", _net(self.dst, "dst"))
        if self.src.version != self.dst.version:
            raise ValidationError("dst", "address family differs from src")
        _choice(self.action, "action", ("protect", "bypass", "discard"))
        proto = self.proto
        if isinstance(proto, str) and proto.lower() in PROTOCOLS:
            proto = PROTOCOLS[proto.lower()]
        s(self, "proto", _opt_int(proto, "proto", 0, 255))
        for f in ("sport", "dport"):
            if getattr(self, f) is not None:
                if self.proto not in PORT_PROTOCOLS:
                    raise ValidationError(f, "ports need proto tcp, udp or sctp")
                object.__setattr__(self, f, _int(getattr(self, f), f, 0, 65535))
        _seti(self, "reqid", 1, 0xFFFFFFFF, optional=True)
        _seti(self, "spi", 256, 0xFFFFFFFF, optional=True)
        if self.action == "protect":
            if (self.reqid is None) == (self.spi is None):
                raise ValidationError("reqid", "protect needs exactly one of reqid or spi")
        elif self.reqid is not None or self.spi is not None:
            raise ValidationError("reqid" if self.reqid is not None else "spi",
                                  "only for action protect")
        _seti(self, "priority", 0, 0xFFFFFFFF)

    @property
    def ident(self) -> tuple[Any, ...]:
        """The selector, which identifies a policy (as in `ip xfrm policy del`)."""
        return (self.scope, self.dir, str(self.src), str(self.dst), self.proto,
                self.sport, self.dport)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "policy") -> Policy:
        return _build(cls, d, prefix, {})

    def to_dict(self) -> dict[str, Any]:
        inv = {v: k for k, v in PROTOCOLS.items() if k not in ("icmpv6",)}
        return {"scope": self.scope, "dir": self.dir, "src": str(self.src),
                "dst": str(self.dst),
                "proto": None if self.proto is None else inv.get(self.proto, self.proto),
                "sport": self.sport, "dport": self.dport, "action": self.action,
                "reqid": self.reqid,
                "spi": None if self.spi is None else f"0x{self.spi:08x}",
                "priority": self.priority}


@dataclass(frozen=True)
class FdbEntry:
    """VXLAN forwarding: (VNI, MAC) -> remote VTEP, or a flood-list member for the VNI,
    or ("accept") a VTEP admitted to send for the VNI without being sent to. Each of the
    three admits its remote as a sender for the VNI: VXLAN from any other source is
    refused (`unknown_vtep`)."""

    vni: int
    mac: str                         # unicast MAC, "flood" or "accept"
    remote: IPAddress

    def __post_init__(self) -> None:
        _seti(self, "vni", 0, (1 << 24) - 1)
        if self.mac not in ("flood", "accept"):
            object.__setattr__(self, "mac", _mac(self.mac, "mac"))
        object.__setattr__(self, "remote", _addr(self.remote, "remote"))
        if self.remote.is_multicast or self.remote.is_unspecified:
            raise ValidationError("remote", "must be a unicast VTEP address")

    @property
    def ident(self) -> tuple[Any, ...]:
        # A flood list (or the accepted senders) holds many remotes per VNI; a unicast
        # MAC maps to one remote.
        return (self.vni, self.mac, str(self.remote)) if self.mac in ("flood", "accept") \
            else (self.vni, self.mac)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "fdb") -> FdbEntry:
        return _build(cls, d, prefix, {})

    def to_dict(self) -> dict[str, Any]:
        return {"vni": self.vni, "mac": self.mac, "remote": str(self.remote)}


@dataclass(frozen=True)
class Daemon:
    """Process settings: where the admin socket lives and who may use it, where the
    vhost-user sockets live and who may connect to them."""

    admin_socket: str = "/run/softnic/admin.sock"
    admin_group: str | None = None
    admin_max_clients: int = 64
    metrics_listen: str | None = None   # "127.0.0.1:9101" -> HTTP /metrics; "9101": loopback
    tx_workers: int | None = None       # None: one per CPU but one (for RX), 1..8
    seq_state: str | None = None        # file keeping outbound sequence numbers over restarts
    vhost_socket_dir: str | None = None    # None: the admin socket's directory
    vhost_socket_user: str | None = None   # owner of server-mode VF sockets (None: the daemon)
    vhost_socket_group: str | None = None  # their group (None: the daemon's)
    vhost_socket_mode: int | None = None   # None: 0660 with a group, else 0600
    # Guest memory one vhost-user frontend may map, MiB (vhost.memory.DEFAULT_MAX_MEMORY):
    # a few times a large guest; 256 VFs at it map 16 TiB, 1/8 of an x86-64 process's
    # 128 TiB of address space, so frontends together cannot exhaust the daemon's.
    vhost_max_memory_mib: int = 65536

    def __post_init__(self) -> None:
        _str(self.admin_socket, "admin_socket", r"/[^\x00]{1,106}",
             "an absolute path (at most 107 bytes)")
        if self.admin_group is not None:
            _str(self.admin_group, "admin_group", r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}",
                 "a group name")
        _seti(self, "admin_max_clients", 1, 1024)
        if self.tx_workers is not None:
            _seti(self, "tx_workers", 1, 16)
        if self.seq_state is not None:
            _str(self.seq_state, "seq_state", r"/[^\x00]{1,4000}", "an absolute path")
        _seti(self, "vhost_max_memory_mib", 1, 1 << 22)
        if self.metrics_listen is not None:
            listen = self.metrics_listen
            if isinstance(listen, int) and not isinstance(listen, bool):
                listen = str(listen)
            if isinstance(listen, str) and re.fullmatch(r":?\d+", listen):
                # A port alone is served on loopback: exposing counters to a network is
                # a choice to write out (ADDRESS:PORT).
                listen = "127.0.0.1:" + listen.lstrip(":")
            m = re.fullmatch(r"\[?([0-9a-fA-F.:]+)\]?:(\d+)", str(listen))
            if not m:
                raise ValidationError("metrics_listen", "must be PORT or ADDRESS:PORT")
            _addr(m.group(1), "metrics_listen")
            _int(int(m.group(2)), "metrics_listen", 0, 65535)  # 0: any free port
            object.__setattr__(self, "metrics_listen", listen)
        if self.vhost_socket_dir is not None:
            _str(self.vhost_socket_dir, "vhost_socket_dir", r"/[^\x00]{0,90}",
                 "an absolute path (at most 91 bytes: a socket path is at most 107)")
            object.__setattr__(self, "vhost_socket_dir",
                               os.path.normpath(self.vhost_socket_dir))
        for f in ("vhost_socket_user", "vhost_socket_group"):
            if getattr(self, f) is not None:
                _str(getattr(self, f), f, r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?",
                     "a user or group name")
        if self.vhost_socket_mode is not None:
            _seti(self, "vhost_socket_mode", 0, 0o770)
            if self.vhost_socket_mode & 0o007:
                # Whoever can connect may become a VM's network device.
                raise ValidationError("vhost_socket_mode", "must give others no access"
                                      " (at most 0o770)")
            if not self.vhost_socket_mode & 0o200:
                raise ValidationError("vhost_socket_mode", "must let the owner connect"
                                      " (0o200)")

    @property
    def vhost_dir(self) -> str:
        """The directory every vhost-user VF socket must be in."""
        return self.vhost_socket_dir or os.path.normpath(os.path.dirname(self.admin_socket))

    @property
    def vhost_mode(self) -> int:
        """The file mode of server-mode VF sockets."""
        if self.vhost_socket_mode is not None:
            return self.vhost_socket_mode
        return 0o660 if self.vhost_socket_group is not None else 0o600

    @property
    def lock_file(self) -> str:
        """The file a running daemon holds locked (flock) beside its admin socket."""
        return self.admin_socket + ".lock"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "daemon") -> Daemon:
        return _build(cls, d, prefix, {})


@dataclass(frozen=True)
class Config:
    """The whole desired state. `validate()` checks what spans objects."""

    daemon: Daemon = field(default_factory=Daemon)
    uplink: Uplink | None = None
    vfs: tuple[VF, ...] = ()
    sas: tuple[SA, ...] = ()
    policies: tuple[Policy, ...] = ()
    fdb: tuple[FdbEntry, ...] = ()

    def vf(self, name: str) -> VF | None:
        return next((v for v in self.vfs if v.name == name), None)

    def validate(self) -> Config:
        """Cross-object rules; field paths index the lists (vf[1].mac). Returns self."""
        seen: dict[Any, int] = {}
        for i, vf in enumerate(self.vfs):
            for what, key in (("name", vf.name), ("ifname", vf.ifname),
                              ("socket", vf.socket), ("mac", vf.mac)):
                if key is None:
                    continue
                if (what, key) in seen:
                    j = seen[(what, key)]
                    raise ValidationError(f"vf[{i}].{what}",
                                          f"duplicate of vf[{j}] ({self.vfs[j].name})")
                seen[(what, key)] = i
            if vf.socket is not None:
                self._check_vhost_socket(vf.socket, f"vf[{i}].socket")
        ul_family = self.uplink.local.version if self.uplink else None
        sa_ids: dict[tuple[str, str, int], int] = {}
        for i, sa in enumerate(self.sas):
            p = f"sa[{i}]"
            if sa.scope == UPLINK:
                if self.uplink is None:
                    raise ValidationError(f"{p}.scope", "no uplink is configured")
                if sa.src.version != ul_family:
                    raise ValidationError(f"{p}.src", "address family differs from uplink.local")
                # The uplink's mode decides the wire format of all its SAs.
                if self.uplink.ipsec == "off":
                    raise ValidationError(f"{p}.scope", "uplink.ipsec is off")
                if (sa.encap_sport is not None) != (self.uplink.ipsec == "espinudp"):
                    raise ValidationError(f"{p}.encap_sport", "uplink.ipsec is "
                                          f"{self.uplink.ipsec}: encap ports "
                                          + ("required" if sa.encap_sport is None
                                             else "not allowed"))
            elif self.vf(sa.scope) is None:
                raise ValidationError(f"{p}.scope", f"no VF named '{sa.scope}'")
            if sa.ident in sa_ids:
                raise ValidationError(f"{p}.spi", f"duplicate of sa[{sa_ids[sa.ident]}]"
                                      " (same scope, dir and SPI)")
            sa_ids[sa.ident] = i
        pol_ids: dict[Any, int] = {}
        for i, pol in enumerate(self.policies):
            p = f"policy[{i}]"
            if pol.scope == UPLINK:
                if self.uplink is None:
                    raise ValidationError(f"{p}.scope", "no uplink is configured")
            elif self.vf(pol.scope) is None:
                raise ValidationError(f"{p}.scope", f"no VF named '{pol.scope}'")
            if pol.ident in pol_ids:
                raise ValidationError(f"{p}.src", f"duplicate selector of policy[{pol_ids[pol.ident]}]")
            pol_ids[pol.ident] = i
        fdb_ids: dict[Any, int] = {}
        vnis = {vf.vni for vf in self.vfs}
        for i, e in enumerate(self.fdb):
            p = f"fdb[{i}]"
            if e.vni not in vnis:
                raise ValidationError(f"{p}.vni", "no VF has this VNI")
            if self.uplink is None:
                raise ValidationError(f"{p}.remote", "no uplink is configured")
            if e.remote.version != ul_family:
                raise ValidationError(f"{p}.remote", "address family differs from uplink.local")
            if e.ident in fdb_ids:
                raise ValidationError(f"{p}.mac", f"duplicate of fdb[{fdb_ids[e.ident]}]")
            fdb_ids[e.ident] = i
        return self

    def _check_vhost_socket(self, path: str, field: str) -> None:
        """A VF socket is a plain name directly in [daemon] vhost_socket_dir, and none of
        the daemon's own files: the daemon binds (or connects to) only what is there, and
        vhost.sockfile refuses whatever it did not make."""
        d = self.daemon
        parent, name = os.path.split(path)
        if os.path.normpath(path) != path or parent != d.vhost_dir:
            raise ValidationError(field, f"must be a file directly in {d.vhost_dir}"
                                  " ([daemon] vhost_socket_dir)")
        if name.startswith("."):
            raise ValidationError(field, "must not start with '.' (softnic's own files)")
        if path in (d.admin_socket, d.lock_file, d.seq_state):
            raise ValidationError(field, "is a file of the daemon's own")

    def replace(self, **kw: Any) -> Config:
        return replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        _check_keys(d, {"daemon", "uplink", "vf", "sa", "policy", "fdb"}, "")

        def many(key: str, build: Any) -> tuple[Any, ...]:
            items = d.get(key, [])
            if not isinstance(items, list):
                raise ValidationError(key, f"must be a list of tables ([[{key}]])")
            return tuple(build(x, f"{key}[{i}]") for i, x in enumerate(items))

        return cls(
            daemon=Daemon.from_dict(d.get("daemon", {})),
            uplink=Uplink.from_dict(d["uplink"]) if "uplink" in d else None,
            vfs=many("vf", VF.from_dict),
            sas=many("sa", SA.from_dict),
            policies=many("policy", Policy.from_dict),
            fdb=many("fdb", FdbEntry.from_dict),
        ).validate()
