"""TAP VF ports against the real kernel: TSO frames in, virtio-net headers both ways.

Oracles: the Linux TCP stack (it produces the TSO frames, and reassembles what we forward),
the kernel's UDP receive path and its checksum counters (/proc/net/snmp), dpkt and scapy
for frame layout."""

import os
import struct
import threading
import time

import dpkt
import pytest

from softnic import topo
from softnic._batch import Batch

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(topo.can_netns() is not None, reason=str(topo.can_netns())),
]

from softnic.tap import TSO_SLOT_SIZE  # noqa: E402

MAC1, MAC2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6 = 1, 1, 4


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, 0)


def unvnet(frame):
    f, g, hl, gs, cs, co, _ = struct.unpack("<BBHHHHH", frame[:12])
    return dict(flags=f, gso_type=g, hdr_len=hl, gso_size=gs, csum_start=cs, csum_offset=co)


@pytest.fixture
def pair():
    """One host, two VMs behind TAPs: (host, vm1, tap1, vm2, tap2)."""
    with topo.Host("t") as h:
        v1, v2 = h.add_vm(), h.add_vm()
        t1 = h.open_tap(v1, mac=MAC1, addrs=["10.77.0.1/24", "fd00:77::1/64"])
        t2 = h.open_tap(v2, mac=MAC2, addrs=["10.77.0.2/24", "fd00:77::2/64"])
        yield h, v1, t1, v2, t2


class Forwarder:
    """Moves frames, virtio-net header included, between two TAPs in batches: the
    kernel on each side sees the other as its link peer. Keeps every header it saw."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.seen = []            # (from_a, vnet dict, frame length)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run)

    def run(self):
        batch = Batch(64, slot_size=TSO_SLOT_SIZE)
        while not self.stop.is_set():
            moved = 0
            for src, dst in ((self.a, self.b), (self.b, self.a)):
                batch.clear()
                n = src.read_burst(batch)
                for i in range(n):
                    f = batch.get(i)
                    self.seen.append((src is self.a, unvnet(f), f))
                if n:
                    dst.write_burst(batch, 0, n)
                    moved += n
            if not moved:
                time.sleep(0.0005)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


def tcp_transfer(v1, v2, dst, family, data):
    import socket

    srv = v2.call(socket.socket, family, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((dst, 5001))
    srv.listen(1)
    got = bytearray()

    def rx():
        c, _ = srv.accept()
        c.settimeout(10)
        while d := c.recv(1 << 20):
            got.extend(d)
        c.close()

    rt = threading.Thread(target=rx)
    rt.start()
    cli = v1.call(socket.socket, family, socket.SOCK_STREAM)
    cli.settimeout(10)
    cli.connect((dst, 5001))
    cli.sendall(data)
    cli.close()
    rt.join(20)
    srv.close()
    return bytes(got)


@pytest.mark.parametrize("v6", [False, True])
def test_tso_frames_read_and_forwarded(pair, v6):
    import socket

    _, v1, t1, v2, t2 = pair
    data = bytes(range(256)) * 4096 * 2       # 2 MiB
    with Forwarder(t1, t2) as fw:
        got = tcp_transfer(v1, v2, "fd00:77::2" if v6 else "10.77.0.2",
                           socket.AF_INET6 if v6 else socket.AF_INET, data)
    assert got == data
    want = GSO_TCPV6 if v6 else GSO_TCPV4
    tso = [(h, f) for a, h, f in fw.seen if a and h["gso_type"] & 0x7F == want]
    assert tso, "the kernel handed over no TSO frame"
    assert max(len(f) for _, f in tso) > 16384
    for h, f in tso:
        eth = dpkt.ethernet.Ethernet(f[12:])
        ip = eth.data
        l3 = 40 if v6 else 20
        tcp_off = 14 + l3
        tcp = ip.data
        assert isinstance(tcp, dpkt.tcp.TCP)
        # the header describes this very frame
        assert h["flags"] & NEEDS_CSUM
        assert h["csum_start"] == tcp_off and h["csum_offset"] == 16
        # hdr_len covers at least L2..L4 (Linux reports the linear part, virtio 5.1.6.2)
        assert tcp_off + tcp.off * 4 <= h["hdr_len"] <= len(f) - 12
        assert 500 <= h["gso_size"] <= 1500 - l3 - 20
        total = (ip.plen + 40) if v6 else ip.len
        assert total == len(f) - 12 - 14
        assert len(tcp.data) > h["gso_size"]
    c1, c2 = t1.counters(), t2.counters()
    assert c1["rx_pkts"] == c2["tx_pkts"] and c1["rx_bytes"] == c2["tx_bytes"]
    assert c1["rx_truncated"] == 0 and c2["tx_errors"] == 0 and c1["rx_eagain"] > 0


def _snmp(ns, proto="Udp"):
    lines = [ln.split() for ln in ns.run(["cat", "/proc/net/snmp"]).splitlines()
             if ln.startswith(proto + ":")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def _udp_frame(payload, csum_mode, dport=7000):
    """Ether/IPv4/UDP to VM 10.77.0.1 built by scapy; checksum 'full', 'partial'
    (pseudo-header sum only, for NEEDS_CSUM) or 'bad'."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import checksum

    pkt = (Ether(src=MAC2, dst=MAC1) / IP(src="10.77.0.9", dst="10.77.0.1", id=1)
           / UDP(sport=4242, dport=dport) / payload)
    raw = bytearray(bytes(pkt))            # scapy fills lengths and the full checksum
    if csum_mode == "partial":
        ulen = 8 + len(payload)
        pseudo = bytes(raw[26:34]) + struct.pack("!BBH", 0, 17, ulen)
        partial = (~checksum(pseudo)) & 0xFFFF     # folded sum, not complemented
        raw[40:42] = struct.pack("!H", partial)
    elif csum_mode == "bad":
        raw[40:42] = struct.pack("!H", (struct.unpack("!H", raw[40:42])[0] ^ 0x5555) or 1)
    return bytes(raw)


def test_written_frames_reach_the_vm(pair):
    import socket

    h, v1, t1, _, _ = pair
    v1.ip("neigh", "add", "10.77.0.9", "lladdr", MAC2, "dev", "eth0")
    rx = v1.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("10.77.0.1", 7000))
    rx.settimeout(2)
    before = _snmp(v1)
    b = Batch(8)
    b.push(vnet() + _udp_frame(b"full checksum", "full"))
    b.push(vnet(NEEDS_CSUM, csum_start=34, csum_offset=6)
           + _udp_frame(b"needs csum", "partial"))
    b.push(vnet() + _udp_frame(b"bad checksum", "bad"))
    assert t1.write_burst(b, 0, 3) == 3
    got = {rx.recv(100) for _ in range(2)}
    assert got == {b"full checksum", b"needs csum"}
    time.sleep(0.05)
    after = _snmp(v1)
    assert after["InCsumErrors"] - before["InCsumErrors"] == 1   # the kernel checked
    assert after["InDatagrams"] - before["InDatagrams"] == 2
    assert t1.counters()["tx_pkts"] == 3
    rx.close()


def test_bad_vnet_header_is_a_counted_drop(pair):
    _, v1, t1, _, _ = pair
    frame = _udp_frame(b"x" * 100, "full")
    b = Batch(8)
    b.push(vnet(gso_type=GSO_TCPV4, hdr_len=54, gso_size=0) + frame)   # GSO without size
    b.push(vnet(NEEDS_CSUM, csum_start=4000, csum_offset=6) + frame)   # csum past the end
    b.push(vnet() + frame)                                             # fine
    done = t1.write_burst(b, 0, 3)
    assert done == 1
    assert b.drop_reason(0) == "bad_vnet_hdr" and b.drop_reason(1) == "bad_vnet_hdr"
    assert b.drop_reason(2) == "ok"
    c = t1.counters()
    assert c["tx_errors"] == 2 and c["tx_pkts"] == 1 and c["tx_syscalls"] == 3


def test_read_stops_at_eagain_and_counts_truncation(pair):
    import socket

    _, v1, t1, _, _ = pair
    b = Batch(4, slot_size=1024, headroom=256)
    while t1.read_burst(b):                  # the VM's own chatter (IPv6 ND, MLD)
        b.clear()
    assert t1.counters()["rx_eagain"] >= 1
    v1.ip("link", "set", "eth0", "mtu", "9000")
    v1.ip("neigh", "add", "10.77.0.9", "lladdr", MAC2, "dev", "eth0")
    tx = v1.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    tx.sendto(b"y" * 5000, ("10.77.0.9", 9))        # one 5 KB frame, larger than a slot
    tx.sendto(b"z" * 100, ("10.77.0.9", 9))
    tx.close()

    b = Batch(64, slot_size=1024, headroom=256)

    def read_some():
        t1.read_burst(b)
        return t1.counters()["rx_truncated"] and any(
            b.get(i).endswith(b"z" * 100) for i in range(b.count))

    topo.wait_until(read_some)
    frames = [b.get(i)[12:] for i in range(b.count)]
    assert any(f.endswith(b"z" * 100) for f in frames)
    assert not any(b"y" * 100 in f for f in frames)
    assert t1.counters()["rx_truncated"] == 1


def test_counters_are_readable_and_closed_port_refuses(pair):
    _, _, t1, _, _ = pair
    c = t1.counters()
    assert set(c) >= {"rx_syscalls", "rx_pkts", "rx_bytes", "rx_eagain", "rx_truncated",
                      "tx_syscalls", "tx_pkts", "tx_bytes", "tx_ring_full", "tx_errors"}
    t1.close()
    with pytest.raises(ValueError):
        t1.read_burst(Batch(1))
    assert "fd=-1" in repr(t1)


def test_forward_loop_carries_tcp(pair):
    import socket

    from softnic.tap import forward

    _, v1, t1, v2, t2 = pair
    stop = threading.Event()
    th = threading.Thread(target=forward, args=(t1, t2, stop))
    th.start()
    try:
        data = os.urandom(1 << 20)
        assert tcp_transfer(v1, v2, "10.77.0.2", socket.AF_INET, data) == data
    finally:
        stop.set()
        th.join()
    assert t1.counters()["rx_bytes"] > len(data)
