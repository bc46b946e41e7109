"""The uplink: softnic's underlay sockets (VXLAN RFC 7348 on UDP 4789, ESP RFC 4303 as IP
protocol 50, ESP-in-UDP RFC 3948 on UDP 4500), opened in the current network namespace.

The host kernel's IP stack is the underlay. Outer packets cross this boundary whole
(IP + UDP/ESP, no L2); softnic._io turns them into payloads plus addresses for the kernel
and back. Why sockets and not a raw socket for everything: UDP sockets get UDP_SEGMENT
(GSO) on send and UDP_GRO on receive, which move many datagrams per syscall; the price is
that the source port is the socket's, hence a pool of sockets bound across the ephemeral
range (see softnic._io.Underlay for the entropy this keeps).
"""

from __future__ import annotations

import ipaddress
import random
import socket
from typing import Any

from softnic._batch import Batch
from softnic._io import Underlay

SOL_UDP = 17
UDP_GRO = 104
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_PMTUDISC_DO = 2
IPV6_RECVPKTINFO = 49
IPV6_DONTFRAG = 62
IP_PKTINFO = 8
IP_RECVTOS = 13
IPV6_RECVTCLASS = 66
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SO_RXQ_OVFL = 40
IPPROTO_ESP = 50
NATT_PORT = 4500
SPORT_LO, SPORT_HI = 49152, 65535
CH_UDP, CH_NATT, CH_ESP = 0, 1, 2


def _bufsize(s: socket.socket, opt: int, force: int, size: int) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, force, size)  # root: beyond rmem_max/wmem_max
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, opt, size)


class Uplink:
    """Underlay sockets bound to `local_addr` (IPv4 or IPv6) in the current namespace.

    sport_pool: number of TX sockets spread over 49152..65535 (socket i on a port
    congruent to i modulo the pool size). esp: also a raw IP-protocol-50 socket.
    espinudp: also the UDP 4500 socket (RX, and TX for packets to port 4500).
    send_burst / recv_burst move batches with the GIL released; counters() reads the
    counters at any time; filenos() are the receive sockets for epoll. gso/gro=False
    turn UDP_SEGMENT / UDP_GRO off (the plain sendmmsg/recvmmsg reference).
    """

    def __init__(self, local_addr: str, vxlan_port: int = 4789, sport_pool: int = 128,
                 esp: bool = False, espinudp: bool = False, rcvbuf: int = 8 << 20,
                 sndbuf: int = 4 << 20, gso: bool = True, gro: bool = True) -> None:
        ip = ipaddress.ip_address(local_addr)
        if not 1 <= sport_pool <= min(1024, SPORT_HI - SPORT_LO + 1):
            raise ValueError("sport_pool must be 1..1024")
        self.local_addr = str(ip)
        self.family = ip.version
        self.af = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        self.vxlan_port = vxlan_port
        self.gro = gro
        self._socks: list[socket.socket] = []
        self._ul: Underlay | None = None
        self.pool: list[socket.socket] = []
        self.natt: socket.socket | None = None
        self.esp: socket.socket | None = None
        try:
            self.pool = [self._pool_socket(i, sport_pool, sndbuf) for i in range(sport_pool)]
            self.vxlan = self._rx_udp(vxlan_port, rcvbuf)
            self.natt = self._rx_udp(NATT_PORT, rcvbuf, sndbuf) if espinudp else None
            self.esp = self._esp_socket(rcvbuf, sndbuf) if esp else None
            ul = Underlay(self.family, ip.packed, [s.fileno() for s in self.pool],
                          self.natt.fileno() if self.natt else -1,
                          self.esp.fileno() if self.esp else -1)
            ul.add_rx(self.vxlan.fileno(), CH_UDP, vxlan_port)
            if self.natt:
                ul.add_rx(self.natt.fileno(), CH_NATT, NATT_PORT)
            if self.esp:
                ul.add_rx(self.esp.fileno(), CH_ESP, 0)
            if not gso:
                ul.gso_segs = 1
            self._ul = ul
        except BaseException:
            self.close()
            raise

    # -- socket set-up
    def _new(self, kind: int, proto: int = 0) -> socket.socket:
        s = socket.socket(self.af, kind, proto)
        self._socks.append(s)
        s.setblocking(False)
        if self.family == 6:
            if kind == socket.SOCK_DGRAM:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_DONTFRAG, 1)
        else:
            # DF on every datagram, no local fragmentation: too big is EMSGSIZE, counted.
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        return s

    def _pool_socket(self, i: int, n: int, sndbuf: int) -> socket.socket:
        s = self._new(socket.SOCK_DGRAM)
        _bufsize(s, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)   # TX only: keep nothing
        first = SPORT_LO + ((i - SPORT_LO) % n)                # smallest port = i mod n
        ports = list(range(first, SPORT_HI + 1, n))
        start = random.randrange(len(ports))
        for port in ports[start:] + ports[:start]:
            try:
                s.bind((self.local_addr, port))
                return s
            except OSError:
                continue
        raise OSError(f"no free source port congruent to {i} mod {n} in 49152..65535")

    def _rx_udp(self, port: int, rcvbuf: int, sndbuf: int = 0) -> socket.socket:
        s = self._new(socket.SOCK_DGRAM)
        _bufsize(s, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
        if sndbuf:
            _bufsize(s, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
        if self.gro:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        self._pktinfo(s)
        s.bind((self.local_addr, port))
        return s

    def _esp_socket(self, rcvbuf: int, sndbuf: int) -> socket.socket:
        s = self._new(socket.SOCK_RAW, IPPROTO_ESP)
        _bufsize(s, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
        _bufsize(s, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
        self._pktinfo(s)
        s.bind((self.local_addr, 0))
        return s

    def _pktinfo(self, s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)   # kernel drops -> rx_overflow
        # local address and outer TOS / traffic class (ECN, RFC 6040) of each datagram
        if self.family == 6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVTCLASS, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            s.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)

    # -- data
    def _u(self) -> Underlay:
        if self._ul is None:
            raise ValueError("uplink is closed")
        return self._ul

    @property
    def underlay(self) -> Underlay:
        """The compiled side, for data-plane code that cimports softnic._io."""
        return self._u()

    def tx_queue(self) -> Any:
        """A TxQueue of its own for one more sending thread (send_burst, counters)."""
        return self._u().tx_queue()

    def send_burst(self, batch: Batch, start: int = 0, n: int = -1) -> int:
        """Send slots [start, start+n) (outer IP packets); returns datagrams sent.
        Refused slots carry their drop reason (batch.drop_reason(i))."""
        return self._u().send_burst(batch, start, n)  # type: ignore[no-any-return]

    def recv_burst(self, batch: Batch, max: int = -1) -> int:
        """Append received outer packets (IP + UDP header rebuilt) to `batch`."""
        return self._u().recv_burst(batch, max)  # type: ignore[no-any-return]

    def counters(self) -> dict[str, Any]:
        return self._u().counters()  # type: ignore[no-any-return]

    def fileno(self) -> int:
        return self.vxlan.fileno()

    def filenos(self) -> list[int]:
        """Receive sockets, for epoll."""
        return [s.fileno() for s in (self.vxlan, self.natt, self.esp) if s is not None]

    def source_ports(self) -> list[int]:
        """Bound port of each pool socket (index = source port modulo pool size)."""
        return [s.getsockname()[1] for s in self.pool]

    def close(self) -> None:
        """Close every socket. No send/recv may be running in another thread."""
        self._ul = None
        for s in self._socks:
            s.close()
        self._socks.clear()

    def __enter__(self) -> Uplink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        extra = "".join(f", {k}" for k, v in (("esp", self.esp), ("espinudp", self.natt)) if v)
        return f"Uplink({self.local_addr!r}, vxlan={self.vxlan_port}, pool={len(self.pool)}{extra})"
