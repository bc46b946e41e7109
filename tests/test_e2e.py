"""End to end (issue 3, "Proof"): two softnic daemons in "hypervisor" namespaces joined by
a veth underlay (MTU 1500), four VM namespaces behind TAP VFs, SAs installed through the
admin socket. Models: host-terminated ESP (RFC 4303 tunnel and transport) then VXLAN
(RFC 7348); device-terminated VXLAN then ESP between the VTEPs, raw (IP protocol 50) and
in UDP (RFC 3948).

The oracles are nobody's code here: the Linux kernel (ping, TCP with TSO, sha256 of what
the far VM received), scapy's ESP (`SecurityAssociation`) for every captured ESP packet,
and the kernel's own capture of the underlay (AF_PACKET, GSO trains split as the wire
carries them). Hostile traffic is sent from the peer host's namespace with ordinary
sockets, as a peer on the underlay could.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from softnic import topo
from softnic.client import AdminError, Client
from softnic.scenario import KEYS, PLAINTEXT_MARK, REPO, VMS, Daemon, Overlay, Sniffer

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(topo.can_netns() is not None, reason=str(topo.can_netns())),
]

pytest.importorskip("scapy.all")
from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.ipsec import ESP, IPSecIntegrityError, SecurityAssociation  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from scapy.layers.vxlan import VXLAN  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "host-tunnel": {"model": "host", "host_mode": "tunnel"},
    "host-transport": {"model": "host", "host_mode": "transport"},
    "device-esp": {"model": "device", "device_encap": "esp"},
    "device-espinudp": {"model": "device", "device_encap": "espinudp"},
}
SPORT_LO, SPORT_HI = 49152, 65535
BIG = 50_000_000


@pytest.fixture(scope="module", params=list(MODELS))
def ov(request: pytest.FixtureRequest) -> Iterator[Overlay]:
    """One overlay per model, shared by the module's tests (pytest orders the tests so
    that only one is alive at a time)."""
    o = Overlay(**MODELS[request.param])
    o.__enter__()
    try:
        yield o
    finally:
        o.close()


# ---- helpers ---------------------------------------------------------------------------------

def _delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return int(after.get(key, 0)) - int(before.get(key, 0))


def _drops(ov: Overlay, side: str) -> dict[str, int]:
    return dict(ov.stats(side)["drops"])


def _ping_ok(ov: Overlay, src: str, dst: str) -> None:
    out = ov.ping(src, dst)
    assert " 0% packet loss" in out, out


def _sa(ov: Overlay, spi: int, vni: int | None, src: str, dst: str) -> SecurityAssociation:
    """scapy's SA for a captured packet, from the keys the scenario installed."""
    if ov.model == "host":
        key = KEYS[spi + (0 if vni == 100 else 0x1000)]
        tunnel = IP(src=src, dst=dst) if ov.host_mode == "tunnel" else None
        return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key,
                                   auth_algo="NULL", tunnel_header=tunnel)
    nat_t = UDP(sport=4500, dport=4500) if ov.device_encap == "espinudp" else None
    return SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=KEYS[spi],
                               auth_algo="NULL", nat_t_header=nat_t)


class Decoded:
    """What the underlay capture proves, datagram by datagram."""

    def __init__(self) -> None:
        self.esp = 0
        self.clear_ip = 0            # tenant IP packets not inside ESP
        self.other = 0               # underlay IPv4 that is neither VXLAN nor ESP
        self.sports: dict[Any, set[int]] = {}    # flow key -> outer (VXLAN) source ports
        self.spis: set[int] = set()
        self.marks = 0               # tenant payload found AFTER decryption
        self.largest = 0
        self.esp_samples: list[bytes] = []       # (host: VXLAN payload; device: IP packet)


def _decode(ov: Overlay, datagrams: list[bytes]) -> Decoded:
    """Decrypt every ESP packet of the capture with scapy; fail on any that does not."""
    d = Decoded()
    for raw in datagrams:
        d.largest = max(d.largest, len(raw))
        if raw[0] >> 4 != 4:
            continue              # the hosts' own IPv6 link-local chatter (MLD, RS)
        pkt = IP(raw)
        if ov.model == "host":
            if UDP not in pkt or pkt[UDP].dport != 4789:
                d.other += 1
                continue
            sport, vx = pkt[UDP].sport, pkt[VXLAN]
            inner = vx[Ether]
            if inner.type == 0x86DD:
                # ND/MLD (ICMPv6, or hop-by-hop first) pass in every mode by design;
                # any other IPv6 in clear is tenant traffic that escaped ESP
                if bytes(inner.payload)[6] not in (0, 58):
                    d.clear_ip += 1
                continue
            if IP not in inner:
                continue          # ARP passes in every mode, by design
            ip = IP(bytes(inner[IP]))
            if ESP not in ip:
                d.clear_ip += 1
                continue
            spi = ip[ESP].spi
            plain = _sa(ov, spi, vx.vni, ip.src, ip.dst).decrypt(ip)
            d.sports.setdefault((vx.vni, spi), set()).add(sport)
            d.esp_samples.append(bytes(pkt[UDP].payload))
        else:
            if ESP not in pkt:
                d.other += 1      # e.g. VXLAN in clear: nothing else crosses this underlay
                continue
            spi = pkt[ESP].spi
            plain = _sa(ov, spi, None, pkt.src, pkt.dst).decrypt(IP(raw))
            vx = plain[VXLAN]
            d.sports.setdefault(vx.vni, set()).add(plain[UDP].sport)
            d.esp_samples.append(raw)
        d.esp += 1
        d.spis.add(spi)
        if PLAINTEXT_MARK in bytes(plain):
            d.marks += 1
    return d


def _raw_send(ov: Overlay, side: str, packets: list[bytes]) -> None:
    """Send whole IPv4 packets from host `side`'s namespace (IP_HDRINCL), as a peer on
    the underlay could; the kernel routes them over the veth."""
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            for p in packets:
                s.sendto(p, (socket.inet_ntoa(p[16:20]), 0))
                time.sleep(0.0005)
    ov.host(side).ns.call(send)


def _udp_send(ov: Overlay, side: str, dst: str, port: int, payloads: list[bytes]) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in payloads:
                s.sendto(p, (dst, port))
                time.sleep(0.0005)
    ov.host(side).ns.call(send)


def _settle(ov: Overlay, side: str, timeout: float = 5.0) -> dict[str, int]:
    """Drop counters once they stop moving (the RX worker is asynchronous)."""
    last: dict[str, int] = {}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        cur = _drops(ov, side)
        if cur == last:
            return cur
        last = cur
        time.sleep(0.3)
    return last


def _vxlan(vni: int, inner: bytes) -> bytes:
    return struct.pack("!BBHI", 0x08, 0, 0, vni << 8) + inner


# ---- the proof -----------------------------------------------------------------------------

def test_ping_both_pairs(ov: Overlay) -> None:
    """Both VM pairs reach each other; in the host model they use the same SPIs with
    different keys (SPIs scoped per VF)."""
    for src, dst in (("a1", "b1"), ("b1", "a1"), ("a2", "b2"), ("b2", "a2")):
        _ping_ok(ov, src, dst)


def test_tcp_50mb_with_tso(ov: Overlay) -> None:
    """>= 50 MB of marked data, sha256-verified by the far VM; 64 KB TSO frames were
    segmented; the underlay never carried tenant payload in clear nor a packet over
    the MTU."""
    before = ov.vf_stats("a1")
    with Sniffer(ov.host("a").ns, keep=0) as sn:
        r = ov.tcp_transfer("a1", "b1", BIG)
    after = ov.vf_stats("a1")
    assert r["ok"], r
    tso, segs = _delta(before, after, "tx_tso_frames"), _delta(before, after, "tx_segments")
    assert tso > 0 and segs > tso, (tso, segs)
    assert sn.count > 10_000, (sn.count, sn.dropped)   # the capture saw the transfer
    assert sn.marks == 0
    assert 1000 < sn.max_wire <= 1500, sn.max_wire


def test_capture_decrypts_and_spreads(ov: Overlay) -> None:
    """Every ESP packet on the underlay (both directions, both VM pairs, several TCP
    flows) decrypts with the configured keys in scapy and carries tenant data; no
    packet exceeds 1500; VXLAN source ports of different flows spread over 49152-65535."""
    with Sniffer(ov.host("a").ns, keep=100_000) as sa, \
            Sniffer(ov.host("b").ns, keep=100_000) as sb:
        ov.tcp_parallel("a1", "b1", 150_000, streams=12)   # P(one SA for all) = 2**-11
        ov.tcp_parallel("a2", "b2", 200_000, streams=2, port=5401)
        _ping_ok(ov, "b2", "a2")
        time.sleep(0.3)
    assert sa.dropped == 0 and sb.dropped == 0
    assert sa.marks == 0 and sb.marks == 0
    d = _decode(ov, sa.datagrams() + sb.datagrams())
    assert d.clear_ip == 0 and d.other == 0, (d.clear_ip, d.other)
    assert d.esp > 300, d.esp
    assert d.marks > 100, d.marks            # decryption yields the tenant's data
    assert d.largest <= 1500
    ports = set().union(*d.sports.values())
    assert all(SPORT_LO <= p <= SPORT_HI for p in ports), sorted(ports)
    assert len(ports) > 1, d.sports
    if ov.model == "host":
        # the same SPI in both VNIs (scoped per VF), and a different port per pair
        assert {(100, 0x1001), (200, 0x1001), (100, 0x1002), (200, 0x1002)} <= set(d.sports)
        assert d.sports[(100, 0x1001)] != d.sports[(200, 0x1001)]
    else:
        # two SAs per direction, chosen by the inner flow hash: 12 flows use both
        assert {0x3001, 0x3011} <= d.spis, sorted(map(hex, d.spis))
        assert {100, 200} <= set(d.sports), d.sports     # both tenants, inside the ESP
        assert len(d.sports[100]) > 1, d.sports


def _capture_esp(ov: Overlay, src: str, dst: str) -> list[bytes]:
    with Sniffer(ov.host(src[0]).ns, keep=10_000) as sn:
        ov.tcp_transfer(src, dst, 300_000, port=5501)
        time.sleep(0.2)
    return _decode(ov, sn.datagrams()).esp_samples


def test_spi_scoping_cross_vni_replay_is_icv_drop(ov: Overlay) -> None:
    """A pair-1 ESP packet (SPI 0x1001, key of pair 1) re-sent by the peer into pair 2's
    VNI meets pair 2's SA with the same SPI: an ICV failure, counted on vm2; VM b2 gets
    nothing; pair 2's key cannot open it in scapy either."""
    if ov.model != "host":
        pytest.skip("per-VF SPI scoping is the host-terminated model")
    samples = _capture_esp(ov, "a1", "b1")
    esp1 = [s for s in samples if struct.unpack("!I", s[4:8])[0] >> 8 == 100]
    assert esp1
    # the newest one: its sequence number is beyond anything pair 2 has seen (no replay)
    vx = VXLAN(esp1[-1])
    ip = IP(bytes(vx[IP]))
    assert ip[ESP].spi == 0x1001
    with pytest.raises(IPSecIntegrityError):
        _sa(ov, 0x1001, 200, ip.src, ip.dst).decrypt(IP(bytes(ip)))
    inner = bytes(Ether(src=VMS["a2"].mac, dst=VMS["b2"].mac) / ip)
    before = ov.vf_stats("b2")
    with Sniffer(ov.vm["b2"], dev=ov.vm_dev["b2"], outgoing=False) as sn:
        _udp_send(ov, "a", ov.host("b").addr, 4789, [_vxlan(200, inner)] * 3)
        time.sleep(0.5)
    after = ov.vf_stats("b2")
    assert _delta(before, after, "drop_icv") == 3, after
    assert not any(f[12:14] == b"\x08\x00" for _, f in sn.captures), sn.captures
    assert _delta(before, after, "rx_esp") == 0    # (the VM's own IPv6 chatter may pass)
    _ping_ok(ov, "a2", "b2")
    _ping_ok(ov, "a1", "b1")


def test_garbage_replay_unknown_spi_change_only_counters(ov: Overlay) -> None:
    """Random UDP to 4789, random raw ESP and random UDP/4500, replayed ESP packets and
    (enforce) ESP for an unknown SPI: only drop counters move; the daemons keep
    forwarding."""
    rng = random.Random(1234)
    b_addr = ov.host("b").addr
    samples = _capture_esp(ov, "a1", "b1")[:50]
    assert len(samples) >= 20
    base = _settle(ov, "b")
    # garbage
    junk = [rng.randbytes(rng.randrange(0, 1400)) for _ in range(60)]
    _udp_send(ov, "a", b_addr, 4789, junk)
    junk_esp = [rng.randbytes(rng.randrange(8, 1400)) for _ in range(40)]
    a_addr = ov.host("a").addr
    _raw_send(ov, "a", [bytes(IP(src=a_addr, dst=b_addr, proto=50) / j) for j in junk_esp])
    _udp_send(ov, "a", b_addr, 4500, [b"\x01" + j for j in junk_esp])
    # a VXLAN header good enough to reach the VF, then junk
    inner_eth = bytes(Ether(src=VMS["a1"].mac, dst=VMS["b1"].mac, type=0x0800))
    _udp_send(ov, "a", b_addr, 4789, [_vxlan(100, inner_eth + j) for j in junk[:20]])
    mid = _settle(ov, "b")
    moved = sum(mid.values()) - sum(base.values())
    assert moved >= 60, (base, mid)
    assert ov.daemons["b"].poll() is None
    # replays of packets the peer already accepted
    if ov.model == "host":
        _udp_send(ov, "a", b_addr, 4789, samples)
    elif ov.device_encap == "espinudp":
        # ESP in UDP from 4500: the payload after the UDP header, from a socket of our own
        _udp_send(ov, "a", b_addr, 4500, [s[28:] for s in samples])
    else:
        _raw_send(ov, "a", samples)
    after_replay = _settle(ov, "b")
    assert _delta(mid, after_replay, "replay") == len(samples), (mid, after_replay)
    # ESP for an SPI nobody configured
    if ov.model == "host":
        assert ov.vf_ipsec == "enforce"
        esp = bytes(Ether(src=VMS["a1"].mac, dst=VMS["b1"].mac)
                    / IP(src=VMS["a1"].addr, dst=VMS["b1"].addr, proto=50)
                    / (struct.pack("!II", 0xDEAD01, 1) + rng.randbytes(64)))
        _udp_send(ov, "a", b_addr, 4789, [_vxlan(100, esp)] * 5)
    else:
        esp = struct.pack("!II", 0xDEAD01, 1) + rng.randbytes(64)
        if ov.device_encap == "espinudp":
            _udp_send(ov, "a", b_addr, 4500, [esp] * 5)
        else:
            _raw_send(ov, "a", [bytes(IP(src=a_addr, dst=b_addr, proto=50) / esp)] * 5)
    end = _settle(ov, "b")
    assert _delta(after_replay, end, "no_sa") == 5, (after_replay, end)
    # nothing but counters changed: both pairs still work, both daemons alive
    for p in ov.daemons.values():
        assert p.poll() is None
    _ping_ok(ov, "a1", "b1")
    _ping_ok(ov, "a2", "b2")
    assert ov.tcp_transfer("a1", "b1", 2_000_000, port=5601)["ok"]


def test_offload_unknown_spi_reaches_vf_untouched() -> None:
    """offload mode: the VF's SAs apply, but ESP for an SPI the VF has no SA for is the
    guest's own business and reaches the VM byte for byte."""
    with Overlay("host", vf_ipsec="offload") as o:
        _ping_ok(o, "a1", "b1")
        before = o.vf_stats("b1")
        frame = bytes(Ether(src=VMS["a1"].mac, dst=VMS["b1"].mac)
                      / IP(src=VMS["a1"].addr, dst=VMS["b1"].addr, proto=50)
                      / (struct.pack("!II", 0xBEEF01, 7) + bytes(range(80))))
        with Sniffer(o.vm["b1"], dev=o.vm_dev["b1"], outgoing=False) as sn:
            _udp_send(o, "a", o.host("b").addr, 4789, [_vxlan(100, frame)] * 3)
            time.sleep(0.5)
        got = [f for _, f in sn.captures if f[12:14] == b"\x08\x00"]
        assert got == [frame] * 3, [g.hex() for g in got]
        after = o.vf_stats("b1")
        assert _delta(before, after, "rx_esp_passthrough") == 3, after
        _ping_ok(o, "a1", "b1")


def test_two_tx_workers_share_the_uplink_sa() -> None:
    """Device-terminated with two TX workers: each host's two VFs are in different lanes
    and both encrypt with the one uplink SA. Both transfers arrive intact and the
    receiving host's anti-replay and ICV checks drop nothing. (tests/test_lanes.py is
    the sharper check: it keeps two lanes encrypting with one SA at the same instant.)"""
    with Overlay("device", tx_workers=2) as o:
        _ping_ok(o, "a1", "b1")
        _ping_ok(o, "a2", "b2")
        before = _drops(o, "b")
        results: dict[str, Any] = {}

        def run(src: str, dst: str, port: int) -> None:
            try:
                results[src] = o.tcp_transfer(src, dst, 20_000_000, port=port)
            except BaseException as e:      # handed back below
                results[src] = e

        threads = [threading.Thread(target=run, args=a)
                   for a in (("a1", "b1", 5401), ("a2", "b2", 5402))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results.values():
            if isinstance(r, BaseException):
                raise r
            assert r["ok"], r
        after = _drops(o, "b")
        for reason in ("replay", "icv"):
            assert _delta(before, after, reason) == 0, after
        ul = o.stats("a")["uplink"]
        assert ul["tx_esp"] > 2 * 20_000_000 // 1500, ul


# ---- isolation (issue 10): each through real daemons, namespaces and kernels ---------------

def _vf_toml(name: str, ifname: str, ns: topo.Netns, mac: str, addr: str, vni: int = 100,
             ipsec: str = "off") -> str:
    return (f'[[vf]]\nname = "{name}"\nkind = "tap"\nifname = "{ifname}"\n'
            f'netns = "{ns.name}"\nmac = "{mac}"\naddresses = ["{addr}/24"]\nvni = {vni}\n'
            f'ipsec = "{ipsec}"\n')


def _ifname(tag: str) -> str:
    return f"sn{tag}{os.getpid() % 100000}"


def _neigh(ns: topo.Netns, addr: str) -> str:
    return ns.run(["ip", "neigh", "show", addr]).strip()


def _frame_send(ns: topo.Netns, dev: str, frames: list[bytes]) -> None:
    """Put whole Ethernet frames on a VM's interface (AF_PACKET), as its guest could."""
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((dev, 0))
            for f in frames:
                s.send(f)
    ns.call(send)


def _vf_counter(d: Any, vf: str, key: str) -> int:
    return int(d.stats()["vf"][vf].get(key, 0))


def test_local_switching_applies_the_receivers_inbound_policy(tmp_path: Any) -> None:
    """Two VMs on one host, one VNI: S (ipsec off) and R (enforce, an inbound protect
    policy for traffic from its remote peer 10.200.0.9, a bypass for S's UDP port 7001).
    S puts on its wire a UDP packet whose source is the peer's address: R's kernel never
    sees it and R counts it as `policy`; the packet R's bypass allows arrives (so the
    path works), and so does ARP."""
    with topo.Host("i") as host:
        host.ns.ip("link", "set", "lo", "up")
        s_ns, r_ns = host.add_vm("s"), host.add_vm("r")
        s_mac, r_mac = "02:00:00:00:0c:01", "02:00:00:00:0c:02"
        s_dev, r_dev = _ifname("s"), _ifname("r")
        key = KEYS[0x1001].hex()
        cfg = ('[uplink]\nlocal = "127.0.0.1"\n'
               + _vf_toml("s", s_dev, s_ns, s_mac, "10.200.0.5")
               + _vf_toml("r", r_dev, r_ns, r_mac, "10.200.0.6", ipsec="enforce")
               + '[[sa]]\nscope = "r"\ndir = "in"\nsrc = "10.200.0.9"\ndst = "10.200.0.6"\n'
               f'spi = 0x1001\nreqid = 1\nalg = "aes-gcm"\nkey = "0x{key}"\n'
               '[[policy]]\nscope = "r"\ndir = "in"\nsrc = "10.200.0.9/32"\n'
               'dst = "10.200.0.6/32"\naction = "protect"\nreqid = 1\n'
               '[[policy]]\nscope = "r"\ndir = "in"\nsrc = "10.200.0.5/32"\n'
               'dst = "10.200.0.6/32"\nproto = "udp"\ndport = 7001\naction = "bypass"\n')
        d = Daemon(host.ns, cfg, tmp_path)
        d.start()
        try:
            def udp(src: str, dport: int, mark: bytes) -> bytes:
                return bytes(Ether(src=s_mac, dst=r_mac) / IP(src=src, dst="10.200.0.6")
                             / UDP(sport=5555, dport=dport) / mark)

            spoofed = udp("10.200.0.9", 7001, b"SPOOFED-PEER")
            own = udp("10.200.0.5", 7002, b"NO-POLICY-LETS-ME")
            allowed = udp("10.200.0.5", 7001, b"BYPASS-ALLOWS-ME")
            arp = bytes(Ether(src=s_mac, dst="ff:ff:ff:ff:ff:ff")
                        / ARP(hwsrc=s_mac, psrc="10.200.0.5", pdst="10.200.0.6"))
            with Sniffer(r_ns, dev=r_dev, outgoing=False) as sn:
                _frame_send(s_ns, s_dev, [spoofed, own, allowed, arp])
                topo.wait_until(lambda: any(b"BYPASS-ALLOWS-ME" in f for _, f in sn.captures)
                                and _vf_counter(d, "r", "drop_policy") >= 2, timeout=20)
            got = [f for _, f in sn.captures]
            assert not any(b"SPOOFED-PEER" in f or b"NO-POLICY-LETS-ME" in f for f in got)
            assert any(f[12:14] == b"\x08\x06" for f in got)       # ARP passes
            # (S's own IPv6 chatter, MLD, is clear IP too and may add to the count)
            assert _vf_counter(d, "r", "drop_policy") >= 2
            d.assert_clean_log()
        finally:
            d.stop()


def test_underlay_broadcast_reaches_both_local_vms(tmp_path: Any) -> None:
    """Host A (softnic): VMs a1 and a3 in VNI 100. Host B: the Linux kernel's own VXLAN
    device in VNI 100 (10.200.0.9), its flood target host A. The kernel resolves both VMs
    (its ARP requests are broadcasts from the underlay) and both VMs resolve it."""
    with topo.TwoHosts() as t:
        a1, a3 = t.a.add_vm("a1"), t.a.add_vm("a3")
        d1, d3 = _ifname("a1"), _ifname("a3")
        cfg = (f'[uplink]\nlocal = "{t.a.addr}"\n'
               + _vf_toml("a1", d1, a1, "02:00:00:00:0a:01", "10.200.0.1")
               + _vf_toml("a3", d3, a3, "02:00:00:00:0a:03", "10.200.0.3")
               + f'[[fdb]]\nvni = 100\nmac = "flood"\nremote = "{t.b.addr}"\n')
        b = t.b.ns
        b.ip("link", "add", "vx0", "type", "vxlan", "id", "100", "local", t.b.addr,
             "remote", t.a.addr, "dstport", "4789")
        b.ip("link", "set", "vx0", "address", "02:00:00:00:0b:09")
        b.addr_add("vx0", "10.200.0.9/24")
        b.link_up("vx0")
        d = Daemon(t.a.ns, cfg, tmp_path)
        d.start()
        try:
            for dst in ("10.200.0.1", "10.200.0.3"):        # the kernel resolves each VM
                out = b.run(["ping", "-c", "2", "-W", "3", dst], check=False, timeout=30)
                assert " 0% packet loss" in out, (dst, out, d.stats()["vf"])
            for vm in (a1, a3):
                vm.run(["ip", "neigh", "flush", "all"])
            b.run(["ip", "neigh", "flush", "dev", "vx0"])
            for vm in (a1, a3):                             # and each VM the kernel
                out = vm.run(["ping", "-c", "2", "-W", "3", "10.200.0.9"], check=False,
                             timeout=30)
                assert " 0% packet loss" in out, out
            assert "02:00:00:00:0b:09" in _neigh(a1, "10.200.0.9")
            assert "02:00:00:00:0b:09" in _neigh(a3, "10.200.0.9")
            d.assert_clean_log()
        finally:
            d.stop()


def test_vxlan_from_an_unlisted_vtep_is_refused(tmp_path: Any) -> None:
    """Host B's VM b1 (VNI 100, enforce) admits host A (10.99.0.1, its flood target).
    From host A's namespace, an ARP request arrives as VXLAN from 10.99.0.77, which no
    entry names: it never reaches b1 (its neighbour table stays clean, learning on or
    not) and counts as `unknown_vtep`. The same from 10.99.0.1 poisons nothing new but
    reaches b1; an `accept` entry added through the admin socket admits 10.99.0.77, and
    deleting it refuses it again."""
    with topo.TwoHosts() as t:
        b1 = t.b.add_vm("b1")
        dev = _ifname("b1")
        cfg = (f'[uplink]\nlocal = "{t.b.addr}"\nfdb_learning = true\n'
               + _vf_toml("vm1", dev, b1, "02:00:00:00:0b:01", "10.200.0.2", ipsec="enforce")
               + f'[[fdb]]\nvni = 100\nmac = "flood"\nremote = "{t.a.addr}"\n')
        rogue = "10.99.0.77"
        t.a.ns.addr_add("ul0", f"{rogue}/24")
        d = Daemon(t.b.ns, cfg, tmp_path)
        d.start()

        def who_has(tell: str) -> bytes:
            mac = f"02:00:00:00:0e:{int(tell.split('.')[-1]):02x}"
            return _vxlan(100, bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
                                     / ARP(hwsrc=mac, psrc=tell, pdst="10.200.0.2")))

        def send_from(src: str, pkts: list[bytes]) -> None:
            def send() -> None:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((src, 0))
                    for p in pkts:
                        s.sendto(p, (t.b.addr, 4789))
            t.a.ns.call(send)

        def unknown() -> int:
            return int(d.stats()["uplink"].get("drop_unknown_vtep", 0))

        try:
            send_from(rogue, [who_has("10.200.0.66")] * 3)
            send_from(t.a.addr, [who_has("10.200.0.67")])   # after it, on the same path
            topo.wait_until(lambda: _neigh(b1, "10.200.0.67"), timeout=20)
            assert _neigh(b1, "10.200.0.66") == ""          # the rogue's ARP never got in
            topo.wait_until(lambda: unknown() == 3, timeout=20)
            with d.client() as c:
                c.fdb_add(100, "accept", rogue)
                send_from(rogue, [who_has("10.200.0.68")])
                topo.wait_until(lambda: _neigh(b1, "10.200.0.68"), timeout=20)
                c.fdb_del(100, "accept", rogue)
            send_from(rogue, [who_has("10.200.0.69")] * 2)
            topo.wait_until(lambda: unknown() == 5, timeout=20)
            assert _neigh(b1, "10.200.0.69") == "" and _neigh(b1, "10.200.0.66") == ""
            d.assert_clean_log()
        finally:
            d.stop()


def test_policy_reloads_never_send_cleartext(tmp_path: Any) -> None:
    """An offload VF's protect policy moves between two SAs on every reload, 1,000 times
    (half by SIGHUP, half through the admin socket, some by the real softnicctl), while
    the VM sends marked UDP the policy covers. The kernel's capture of the underlay
    (nothing dropped) sees the traffic throughout and never one byte of it in clear: the
    VF's SPD is replaced in one step, never emptied in between."""
    reloads = 1000
    with topo.TwoHosts() as t:
        vm = t.a.add_vm("p")
        dev = _ifname("p")
        head = (f'[uplink]\nlocal = "{t.a.addr}"\n'
                + _vf_toml("vm1", dev, vm, "02:00:00:00:0a:01", "10.200.0.1", ipsec="offload")
                + f'[[fdb]]\nvni = 100\nmac = "02:00:00:00:0b:01"\nremote = "{t.b.addr}"\n')
        for spi in (0x1001, 0x1002):
            head += ('[[sa]]\nscope = "vm1"\ndir = "out"\nsrc = "10.200.0.1"\n'
                     f'dst = "10.200.0.2"\nspi = {spi:#x}\nalg = "aes-gcm"\n'
                     f'key = "0x{KEYS[spi].hex()}"\n')

        def cfg(spi: int) -> str:
            return head + ('[[policy]]\nscope = "vm1"\ndir = "out"\nsrc = "10.200.0.1/32"\n'
                           f'dst = "10.200.0.2/32"\naction = "protect"\nspi = {spi:#x}\n')

        d = Daemon(t.a.ns, cfg(0x1001), tmp_path)
        d.start()
        sink = t.b.ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        t.b.ns.call(sink.bind, (t.b.addr, 4789))       # host B takes the VXLAN silently
        vm.run(["ip", "neigh", "replace", "10.200.0.2", "lladdr", "02:00:00:00:0b:01",
                "dev", dev])
        sender = vm.popen([sys.executable, "-c", (
            "import socket,time\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "s.connect(('10.200.0.2',9))\n"
            f"m={PLAINTEXT_MARK!r}*8\n"
            "while True:\n"
            "    for _ in range(16):\n"
            "        try: s.send(m)\n"
            "        except OSError: pass\n"
            "    time.sleep(0.001)\n")])
        events: queue.Queue[dict[str, Any]] = queue.Queue()

        def watch() -> None:
            with contextlib.suppress(AdminError):      # ends when the daemon does
                for ev in Client(d.sock, timeout=None).monitor(types=["reloaded",
                                                                       "reload-failed"]):
                    events.put(ev)

        threading.Thread(target=watch, daemon=True).start()
        time.sleep(0.5)                     # the subscription is in place
        try:
            with Sniffer(t.a.ns, keep=5_000) as sn, d.client() as c:
                topo.wait_until(lambda: sn.count > 50, timeout=20)
                before = sn.count
                seen = 0                    # every reload, of any kind, posts one event
                for i in range(reloads):
                    spi = 0x1002 if i % 2 == 0 else 0x1001
                    tmp = d.cfg.with_suffix(".new")     # replaced whole, never half-read
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT
                                      | os.O_TRUNC, 0o600)
                    with open(fd, "w") as f:
                        f.write(f'[daemon]\nadmin_socket = "{d.sock}"\n' + cfg(spi))
                    os.replace(tmp, d.cfg)
                    if i % 2 == 0:
                        d.proc.send_signal(signal.SIGHUP)           # type: ignore[union-attr]
                        while seen <= i:
                            ev = events.get(timeout=30)
                            seen += 1
                            assert ev["type"] == "reloaded" and ev["changes"] == 2, ev
                    elif i % 100 == 1:
                        out = subprocess.run(
                            [sys.executable, "-m", "softnic.cli", "-s", d.sock, "reload"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=REPO))
                        assert out.returncode == 0, out.stderr
                    else:
                        assert len(c.reload()["changes"]) == 2
                during = sn.count - before
                time.sleep(0.3)
                pols = c.policy_list("vm1")
        finally:
            sender.kill()
            sender.wait()
            sink.close()
            d.stop()
        assert sn.dropped == 0                  # the capture saw everything
        assert sn.marks == 0, sn.marks          # and no tenant byte in clear
        assert during > reloads, during         # traffic flowed all the while
        spis = set()
        for p in sn.datagrams():        # outer IPv4 / UDP 4789 / VXLAN / Ethernet / IPv4
            inner = p[20 + 8 + 8 + 14:]
            if p[9] == 17 and p[22:24] == b"\x12\xb5" and p[48:50] == b"\x08\x00":
                assert inner[9] == 50, inner[:40].hex()            # ESP, nothing else
                spis.add(struct.unpack_from("!I", inner, (inner[0] & 15) * 4)[0])
        assert spis == {0x1001, 0x1002}, spis
        assert [p["spi"] for p in pols] == ["0x00001001"]
