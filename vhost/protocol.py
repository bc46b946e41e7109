"""vhost-user message framing and validation (QEMU docs/interop/vhost-user.rst, "Message
Specification", "Communication", "Back-end message types"); feature bits from the virtio
1.1 spec (§6 reserved bits, §5.1.3 net device bits).

A message is validated in three layers before any handler acts on it:

1. syntax   -- header version, a known request, the payload size that request has;
2. framing  -- the number of file descriptors that came with it;
3. meaning  -- values against what was negotiated and the device state (in the backend).

Every failure is a VhostError subclass; nothing here asserts or exits. Received fds are
owned by the Message until a handler takes them; Message.close_fds() closes the rest.
"""

from __future__ import annotations

import array
import enum
import os
import socket
import struct
from dataclasses import dataclass, field

# --- errors -------------------------------------------------------------------------


class VhostError(Exception):
    """Base of every vhost-user failure."""


class VhostSyntaxError(VhostError):
    """Bad header, unknown request, or a payload size the request does not have."""


class VhostFramingError(VhostError):
    """Wrong number of file descriptors, truncated message or ancillary data."""


class VhostStateError(VhostError):
    """A message out of order (e.g. a vring change while the ring runs)."""


class VhostNotNegotiated(VhostError):
    """A message or feature the backend did not offer or the frontend did not accept."""


class VhostBoundsError(VhostError):
    """A value out of its negotiated range (queue index, ring size, address, MTU)."""


class VhostMemoryError(VhostError):
    """A memory region that is invalid, overlapping, or could not be mapped."""


class VhostFdError(VhostError):
    """A file descriptor of the wrong kind (e.g. a pipe where an eventfd belongs)."""


class VhostDisconnected(VhostError):
    """The peer closed the connection."""


# --- constants ----------------------------------------------------------------------


class Req(enum.IntEnum):
    """Front-end -> back-end requests (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtoFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class Feature(enum.IntEnum):
    """Virtio (net) feature bit numbers used here."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    MQ = 22
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26  # VHOST_F_LOG_ALL
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    RING_PACKED = 34


def bits(*names: enum.IntEnum) -> int:
    """Mask of the given bit numbers."""
    m = 0
    for n in names:
        m |= 1 << int(n)
    return m


VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
FLAGS_KNOWN = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

HDR = struct.Struct("<III")
HDR_SIZE = HDR.size
MAX_PAYLOAD = 4096  # far above the largest message a net backend handles (264 bytes)
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the most fds any message carries
MEM_TABLE_MAX_REGIONS = 8

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
VRING_F_LOG = 0x1

U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")  # index, num
ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
REGION = struct.Struct("<QQQQ")  # gpa, size, uva, mmap_offset
LOG = struct.Struct("<QQ")  # size, offset


@dataclass(frozen=True)
class Region:
    """One guest memory region as the frontend describes it."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


# Payload shapes: request -> exact size (or a callable for variable sizes), and the
# allowed fd counts. Replies the backend sends are listed in REPLIES.
_SIZE_EXACT: dict[Req, int] = {
    Req.GET_FEATURES: 0,
    Req.SET_FEATURES: 8,
    Req.SET_OWNER: 0,
    Req.RESET_OWNER: 0,
    Req.SET_LOG_BASE: LOG.size,
    Req.SET_LOG_FD: 0,
    Req.SET_VRING_NUM: STATE.size,
    Req.SET_VRING_ADDR: ADDR.size,
    Req.SET_VRING_BASE: STATE.size,
    Req.GET_VRING_BASE: STATE.size,
    Req.SET_VRING_KICK: 8,
    Req.SET_VRING_CALL: 8,
    Req.SET_VRING_ERR: 8,
    Req.GET_PROTOCOL_FEATURES: 0,
    Req.SET_PROTOCOL_FEATURES: 8,
    Req.GET_QUEUE_NUM: 0,
    Req.SET_VRING_ENABLE: STATE.size,
    Req.NET_SET_MTU: 8,
    Req.RESET_DEVICE: 0,
    Req.GET_MAX_MEM_SLOTS: 0,
    Req.ADD_MEM_REG: 8 + REGION.size,
    Req.REM_MEM_REG: 8 + REGION.size,
    Req.SET_STATUS: 8,
    Req.GET_STATUS: 0,
}

# Requests whose handler always answers with a payload (REPLY_ACK does not apply).
REPLIES = frozenset(
    {
        Req.GET_FEATURES,
        Req.GET_PROTOCOL_FEATURES,
        Req.GET_VRING_BASE,
        Req.GET_QUEUE_NUM,
        Req.GET_MAX_MEM_SLOTS,
        Req.GET_STATUS,
    }
)


@dataclass
class Message:
    """One received message: header fields, raw payload, and the fds it carried."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Req(self.request).name
        except ValueError:
            return f"request {self.request}"

    def take_fd(self) -> int:
        """Hands the (single) fd to the caller, who then owns it."""
        return self.fds.pop(0)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    # --- payload decoders (syntax already checked: sizes are exact) ---
    def u64(self) -> int:
        return U64.unpack_from(self.payload)[0]

    def state(self) -> tuple[int, int]:
        return STATE.unpack_from(self.payload)

    def vring_addr(self) -> VringAddr:
        return VringAddr(*ADDR.unpack_from(self.payload))

    def vring_file(self) -> tuple[int, bool]:
        """(queue index, has_fd) of SET_VRING_KICK/CALL/ERR."""
        v = self.u64()
        return v & VRING_IDX_MASK, not (v & VRING_NOFD_MASK)

    def mem_table(self) -> list[Region]:
        nregions = struct.unpack_from("<I", self.payload)[0]
        return [Region(*REGION.unpack_from(self.payload, 8 + i * REGION.size))
                for i in range(nregions)]

    def mem_region(self) -> Region:
        return Region(*REGION.unpack_from(self.payload, 8))


def check_syntax(request: int, flags: int, size: int) -> Req:
    """Layer 1 on the header alone (before reading the payload)."""
    if flags & FLAG_VERSION_MASK != VERSION:
        raise VhostSyntaxError(f"unsupported message version {flags & FLAG_VERSION_MASK}")
    if flags & ~FLAGS_KNOWN:
        raise VhostSyntaxError(f"unknown header flags {flags:#x}")
    if flags & FLAG_REPLY:
        raise VhostSyntaxError("reply flag set on a request")
    if size > MAX_PAYLOAD:
        raise VhostSyntaxError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    try:
        req = Req(request)
    except ValueError:
        raise VhostSyntaxError(f"unknown request {request}") from None
    if req is Req.SET_MEM_TABLE:
        if size < 8 or (size - 8) % REGION.size:
            raise VhostSyntaxError(f"SET_MEM_TABLE payload of {size} bytes")
    elif req in _SIZE_EXACT:
        if size != _SIZE_EXACT[req]:
            raise VhostSyntaxError(
                f"{req.name} payload of {size} bytes, expected {_SIZE_EXACT[req]}")
    # other known requests: sizes checked by nobody since no handler accepts them
    return req


def check_framing(req: Req, msg: Message) -> None:
    """Layers 1b (payload fields) and 2 (fd count) once the payload is in."""
    nfds = len(msg.fds)
    want: tuple[int, ...]
    if req is Req.SET_MEM_TABLE:
        n, pad = struct.unpack_from("<II", msg.payload)
        if n == 0 or n > MEM_TABLE_MAX_REGIONS or 8 + n * REGION.size != len(msg.payload):
            raise VhostSyntaxError(f"SET_MEM_TABLE with {n} regions in {len(msg.payload)} bytes")
        want = (n,)
    elif req in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
        v = msg.u64()
        if v & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise VhostSyntaxError(f"{req.name} with unknown bits {v:#x}")
        want = (0,) if v & VRING_NOFD_MASK else (1,)
    elif req is Req.ADD_MEM_REG or req is Req.SET_LOG_FD:
        want = (1,)
    elif req is Req.REM_MEM_REG:
        want = (0, 1)  # older frontends attach the region's fd; it is closed unused
    elif req is Req.SET_LOG_BASE:
        want = (0, 1)
    else:
        want = (0,)
    if nfds not in want:
        raise VhostFramingError(f"{req.name} carried {nfds} fds, expected {want}")


# --- the wire ------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise VhostFramingError("connection closed inside a message")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """Reads one message (blocking), validated by layers 1 and 2. Raises
    VhostDisconnected on a clean EOF between messages. Fds received with a message that
    fails validation are closed before the error propagates."""
    fds = array.array("i")
    data, anc, mflags, _ = sock.recvmsg(HDR_SIZE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            usable = len(cdata) - (len(cdata) % fds.itemsize)
            fds.frombytes(cdata[:usable])
    msg = Message(0, 0, b"", list(fds))
    try:
        if not data:
            if msg.fds:
                raise VhostFramingError("fds without a message")
            raise VhostDisconnected("peer closed the connection")
        if mflags & socket.MSG_CTRUNC:
            raise VhostFramingError(f"more than {MAX_FDS} fds attached")
        if len(data) < HDR_SIZE:
            data += _recv_exact(sock, HDR_SIZE - len(data))
        request, flags, size = HDR.unpack(data)
        msg.request, msg.flags = request, flags
        req = check_syntax(request, flags, size)
        msg.payload = _recv_exact(sock, size) if size else b""
        check_framing(req, msg)
        return msg
    except BaseException:
        msg.close_fds()
        raise


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HDR.pack(request, flags, len(payload)) + payload


def send_message(sock: socket.socket, request: int, payload: bytes = b"", flags: int = VERSION,
                 fds: list[int] | None = None) -> None:
    data = encode(request, payload, flags)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def send_reply(sock: socket.socket, request: int, payload: bytes) -> None:
    send_message(sock, request, payload, VERSION | FLAG_REPLY)


def recv_reply(sock: socket.socket, request: int) -> bytes:
    """Frontend side: one reply to request; its payload."""
    data = _recv_exact(sock, HDR_SIZE)
    req, flags, size = HDR.unpack(data)
    if req != request or flags & FLAG_VERSION_MASK != VERSION or not flags & FLAG_REPLY:
        raise VhostSyntaxError(f"unexpected reply header {req} {flags:#x} to {request}")
    if size > MAX_PAYLOAD:
        raise VhostSyntaxError(f"reply payload of {size} bytes")
    return _recv_exact(sock, size) if size else b""
