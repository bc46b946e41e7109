"""The whole pipeline (softnic._fastpath.Datapath) between two simulated hosts, no kernel.

Host A's VF sends; its underlay packets are handed to host B's RX. Oracles: scapy parses
every underlay packet (VXLAN, ESP) and decrypts ESP with its own SecurityAssociation;
dpkt checks the TCP/IP checksums of what comes out; the payload must reassemble.
"""

import os

import dpkt
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

from softnic._batch import Batch
from softnic._esp import SecurityAssociation
from softnic._fastpath import Datapath
from softnic._tso import make_vnet_hdr

MAC_A, MAC_B, MAC_C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
VM_A, VM_B = "192.168.10.1", "192.168.10.2"
VTEP_A, VTEP_B = "10.99.0.1", "10.99.0.2"
KEY = bytes(range(16)) + b"\xde\xad\xbe\xef"
KEY2 = bytes(range(100, 116)) + b"\x01\x02\x03\x04"
UNDERLAY_MTU = 1500


def tcp_frame(payload: bytes, src=VM_A, dst=VM_B, smac=MAC_A, dmac=MAC_B, sport=40000,
              dport=5001, flags="PA", seq=1000) -> bytes:
    ip_cls = IP if ":" not in src else IPv6
    return bytes(Ether(src=smac, dst=dmac) / ip_cls(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, window=512) / payload)


def tso_input(frame: bytes, gso_size: int = 1448) -> bytes:
    v6 = frame[12:14] == b"\x86\xdd"
    l4 = 14 + (40 if v6 else 20)
    return make_vnet_hdr(1, 4 if v6 else 1, l4 + 20, gso_size, l4, 16) + frame


def plain_input(frame: bytes) -> bytes:
    return bytes(12) + frame


def hosts(a_ipsec="off", b_ipsec="off", ul="off", mode="tunnel", ul_mode="transport"):
    a = Datapath(VTEP_A, UNDERLAY_MTU, ipsec=ul)
    b = Datapath(VTEP_B, UNDERLAY_MTU, ipsec=ul)
    a.set_vf(0, MAC_A, 100, ipsec=a_ipsec)
    b.set_vf(0, MAC_B, 100, ipsec=b_ipsec)
    a.fdb_add(100, MAC_B, VTEP_B)
    b.fdb_add(100, MAC_A, VTEP_A)
    if a_ipsec != "off":
        out = SecurityAssociation(0x1000, mode, VM_A, VM_B, "aes-gcm", KEY)
        a.sa_add(0, "out", out)
        a.policy_set(0, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                                 "spi": 0x1000}])
    if b_ipsec != "off":
        inb = SecurityAssociation(0x1000, mode, VM_A, VM_B, "aes-gcm", KEY)
        b.sa_add(0, "in", inb)
        b.policy_set(0, [{"dir": "in", "src": VM_A, "dst": VM_B, "action": "protect",
                                "spi": 0x1000}])
    if ul != "off":
        encap = (4500, 4500) if ul == "espinudp" else None
        a.sa_add(-1, "out", SecurityAssociation(0x2000, ul_mode, VTEP_A, VTEP_B, "aes-gcm",
                                                KEY2, encap=encap))
        b.sa_add(-1, "in", SecurityAssociation(0x2000, ul_mode, VTEP_A, VTEP_B, "aes-gcm",
                                               KEY2, encap=encap))
    return a, b


def tx(dp, frames):
    inb = Batch(len(frames) + 1, slot_size=65536 + 1024, headroom=64)
    for f in frames:
        inb.push(f)
    out = Batch(2048, slot_size=UNDERLAY_MTU + 576)
    loc = Batch(2048, slot_size=UNDERLAY_MTU + 576)
    assert dp.tx_burst(0, inb, 0, out, loc) == len(frames)
    return [out.get(i) for i in range(len(out))], [loc.get(i) for i in range(len(loc))], inb


def rx(dp, packets):
    inb = Batch(max(len(packets), 1))
    for p in packets:
        inb.push(p)
    n = dp.rx_burst(inb)
    frames = [inb.get(i)[12:] for i in range(len(inb)) if inb.drop_reason(i) == "ok"]
    assert len(frames) == n
    return frames, [inb.drop_reason(i) for i in range(len(inb))]


def reassemble(frames):
    segs = []
    for f in frames:
        eth = dpkt.ethernet.Ethernet(f)
        ip = eth.data
        tcp = ip.data
        segs.append((tcp.seq, bytes(tcp.data)))
    segs.sort()
    return b"".join(d for _, d in segs)


def check_tcp_checksums(frame: bytes):
    pkt = Ether(frame)
    layer = pkt[IP] if IP in pkt else pkt[IPv6]
    sent_tcp = pkt[TCP].chksum
    del pkt[TCP].chksum
    if IP in pkt:
        sent_ip = pkt[IP].chksum
        del pkt[IP].chksum
    rebuilt = Ether(bytes(pkt))
    assert rebuilt[TCP].chksum == sent_tcp
    if IP in pkt:
        assert rebuilt[IP].chksum == sent_ip
    return layer


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_host_terminated_tso_esp_vxlan(mode):
    a, b = hosts("enforce", "enforce", mode=mode)
    payload = os.urandom(60000)
    out, loc, _ = tx(a, [tso_input(tcp_frame(payload))])
    assert not loc and len(out) > 40
    scapy_sa = ScapySA(ESP, spi=0x1000, crypt_algo="AES-GCM", crypt_key=KEY,
                       auth_algo="NULL", tunnel_header=IP(src=VM_A, dst=VM_B)
                       if mode == "tunnel" else None)
    sports = set()
    for pkt in out:
        assert len(pkt) <= UNDERLAY_MTU
        outer = IP(pkt)
        assert outer.src == VTEP_A and outer.dst == VTEP_B and outer.flags.DF
        assert outer[UDP].dport == 4789 and 49152 <= outer[UDP].sport <= 65535
        sports.add(outer[UDP].sport)
        assert outer[VXLAN].vni == 100
        inner = outer[VXLAN].payload
        assert inner[Ether].dst == MAC_B
        esp_ip = inner[IP]
        assert esp_ip.proto == 50 and payload[:32] not in pkt
        plain = scapy_sa.decrypt(esp_ip)
        assert TCP in plain and plain[TCP].dport == 5001
    assert len(sports) == 1         # one SA, one inner address pair: one flow
    c = a.vf_counters(0)
    assert c["tx_tso_frames"] == 1 and c["tx_segments"] == len(out) == c["tx_esp"]
    frames, reasons = rx(b, out)
    assert set(reasons) == {"ok"}
    for f in frames:
        check_tcp_checksums(f)
    assert reassemble(frames) == payload
    assert b.vf_counters(0)["rx_esp"] == len(out)


def test_mtu_exact_overhead():
    """The largest segment fills the underlay MTU to within the ESP block alignment."""
    a, b = hosts("enforce", "enforce")
    out, _, _ = tx(a, [tso_input(tcp_frame(os.urandom(30000)), gso_size=9000)])
    assert max(len(p) for p in out) > UNDERLAY_MTU - 4
    assert max(len(p) for p in out) <= UNDERLAY_MTU


@pytest.mark.parametrize("ul", ["esp", "espinudp"])
@pytest.mark.parametrize("ul_mode", ["transport", "tunnel"])
def test_device_terminated(ul, ul_mode):
    a, b = hosts(ul=ul, ul_mode=ul_mode)
    payload = os.urandom(20000)
    out, _, _ = tx(a, [tso_input(tcp_frame(payload))])
    encap = None
    if ul == "espinudp":
        from scapy.layers.inet import UDP as U
        encap = U(sport=4500, dport=4500)
    sa = ScapySA(ESP, spi=0x2000, crypt_algo="AES-GCM", crypt_key=KEY2, auth_algo="NULL",
                 tunnel_header=IP(src=VTEP_A, dst=VTEP_B) if ul_mode == "tunnel" else None,
                 nat_t_header=encap)
    for pkt in out:
        assert len(pkt) <= UNDERLAY_MTU
        outer = IP(pkt)
        assert payload[:32] not in pkt
        plain = sa.decrypt(outer)
        assert plain[UDP].dport == 4789 and plain[VXLAN].vni == 100
        assert TCP in plain[VXLAN].payload
    frames, reasons = rx(b, out)
    assert set(reasons) == {"ok"}
    assert reassemble(frames) == payload
    # Plain VXLAN is refused when the underlay requires ESP.
    c, _ = hosts()
    plain_out, _, _ = tx(c, [plain_input(tcp_frame(b"x" * 100))])
    _, reasons = rx(b, plain_out)
    assert reasons == ["policy"]


def test_spi_scoped_per_vf():
    """Two VFs use SPI 0x1000 with different keys: each decrypts only its own traffic."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    b = Datapath(VTEP_B, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100, ipsec="enforce")
    a.set_vf(1, MAC_C, 200, ipsec="enforce")
    b.set_vf(0, MAC_B, 100, ipsec="enforce")
    b.set_vf(1, "02:00:00:00:00:0d", 200, ipsec="enforce")
    a.fdb_add(100, MAC_B, VTEP_B)
    a.fdb_add(200, "02:00:00:00:00:0d", VTEP_B)
    b.fdb_add(100, MAC_A, VTEP_A)
    b.fdb_add(200, MAC_C, VTEP_A)
    for vf, key in ((0, KEY), (1, KEY2)):
        a.sa_add(vf, "out", SecurityAssociation(0x1000, "tunnel", VM_A, VM_B, "aes-gcm", key))
        a.policy_set(vf, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                                  "spi": 0x1000}])
        b.sa_add(vf, "in", SecurityAssociation(0x1000, "tunnel", VM_A, VM_B, "aes-gcm", key))
        b.policy_set(vf, [{"dir": "in", "src": VM_A, "dst": VM_B, "action": "protect",
                           "spi": 0x1000}])
    out0, _, _ = tx(a, [plain_input(tcp_frame(b"vf0" * 50))])
    inb = Batch(4, slot_size=65536 + 1024, headroom=64)
    inb.push(plain_input(tcp_frame(b"vf1" * 50, smac=MAC_C, dmac="02:00:00:00:00:0d")))
    out = Batch(64, slot_size=UNDERLAY_MTU + 576)
    loc = Batch(64, slot_size=UNDERLAY_MTU + 576)
    a.tx_burst(1, inb, 0, out, loc)
    out1 = [out.get(0)]
    # First, VF 0's packet rewritten into VF 1's VNI: VF 1's SA has the same SPI but
    # another key, and must refuse it (anti-replay has seen nothing yet, so the ICV decides).
    forged = bytearray(out0[0])
    vxlan_off = 20 + 8
    forged[vxlan_off + 4:vxlan_off + 7] = (200).to_bytes(3, "big")
    forged[vxlan_off + 8:vxlan_off + 14] = bytes.fromhex("02000000000d")
    _, reasons = rx(b, [bytes(forged)])
    assert reasons == ["icv"]
    frames, reasons = rx(b, out0 + out1)
    assert reasons == ["ok", "ok"]
    assert b"vf0" in frames[0] and b"vf1" in frames[1]
    assert b.vf_counters(1)["drops"] == {"icv": 1}


def test_offload_passes_unknown_spi_enforce_drops():
    a, b = hosts()
    b.set_vf(0, MAC_B, 100, ipsec="offload")
    guest_esp = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=VM_A, dst=VM_B)
                      / ESP(spi=0x7777, seq=1) / (b"\x00" * 40))
    out, _, _ = tx(a, [plain_input(guest_esp)])
    frames, reasons = rx(b, out)
    assert reasons == ["ok"] and frames[0] == guest_esp
    assert b.vf_counters(0)["rx_esp_passthrough"] == 1
    b.set_vf(0, MAC_B, 100, ipsec="enforce")
    _, reasons = rx(b, out)
    assert reasons == ["no_sa"]
    # Plain IP in enforce mode with no bypass policy: dropped; ARP always passes.
    plain_out, _, _ = tx(a, [plain_input(tcp_frame(b"hello"))])
    _, reasons = rx(b, plain_out)
    assert reasons == ["policy"]
    arp = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=VM_A, pdst=VM_B))
    a.fdb_add(100, None, VTEP_B)
    arp_out, _, _ = tx(a, [plain_input(arp)])
    frames, reasons = rx(b, arp_out)
    assert reasons == ["ok"] and frames[0][:len(arp)] == arp


def test_enforce_tx_discards_unprotected():
    a, _ = hosts("enforce", "enforce")
    other = tcp_frame(b"x" * 10, dst="192.168.10.99")
    out, _, inb = tx(a, [plain_input(other)])
    assert out == [] and inb.drop_reason(0) == "policy"


def test_replay_dropped():
    a, b = hosts("enforce", "enforce")
    out, _, _ = tx(a, [plain_input(tcp_frame(b"once"))])
    _, reasons = rx(b, out + out)
    assert reasons == ["ok", "replay"]


def test_too_big_gets_icmp():
    a, _ = hosts("enforce", "enforce")
    frame = tcp_frame(os.urandom(1460))   # 1500-byte IP packet, no TSO, DF set by scapy?
    frame = bytes(Ether(frame)[Ether].__class__(frame))
    pkt = Ether(frame)
    pkt[IP].flags = "DF"
    del pkt[IP].chksum
    out, loc, inb = tx(a, [plain_input(bytes(pkt))])
    assert out == [] and inb.drop_reason(0) == "too_big"
    assert len(loc) == 1
    icmp = Ether(loc[0][12:])
    assert icmp[IP].dst == VM_A and icmp[IP].proto == 1
    assert icmp["ICMP"].type == 3 and icmp["ICMP"].code == 4
    assert icmp["ICMP"].nexthopmtu == a.mss_for(0, spi=0x1000) + 40


def test_local_switching():
    """Between two VFs of one host a GSO frame crosses whole (both ends speak GSO, as on
    a software switch); where the local slots cannot hold it, it is segmented instead."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100)
    a.set_vf(1, MAC_B, 100)
    payload = os.urandom(10000)
    frame = tso_input(tcp_frame(payload))
    inb = Batch(2, slot_size=65536 + 1024, headroom=64)
    inb.push(frame)
    out = Batch(64, slot_size=UNDERLAY_MTU + 576)
    big = Batch(8, slot_size=65536 + 1024, headroom=64)
    assert a.tx_burst(0, inb, 0, out, big) == 1
    assert len(out) == 0 and [big.get(i) for i in range(len(big))] == [frame]
    assert big.port(0) == 1 and a.vf_counters(1)["rx_frames"] == 1
    out2, loc, _ = tx(a, [frame])
    assert out2 == [] and len(loc) >= 7
    assert reassemble([f[12:] for f in loc]) == payload


def test_hostile_frames_are_counted():
    a, _ = hosts("enforce", "enforce")
    bad = [b"", b"\x00" * 11, plain_input(b"\x01" * 13),
           make_vnet_hdr(1, 1, 9999, 0, 0, 0) + tcp_frame(b"x" * 3000)]
    inb = Batch(8, slot_size=65536 + 1024, headroom=64)
    for f in bad:
        inb.push(f)
    out = Batch(64, slot_size=UNDERLAY_MTU + 576)
    loc = Batch(64, slot_size=UNDERLAY_MTU + 576)
    assert a.tx_burst(0, inb, 0, out, loc) == len(bad)
    assert len(out) == 0
    reasons = [inb.drop_reason(i) for i in range(len(bad))]
    assert all(r != "ok" for r in reasons)
    assert sum(a.vf_counters(0)["drops"].values()) == len(bad)


@pytest.mark.parametrize("ul", ["off", "esp"])
def test_ipv6_underlay_ipv6_overlay(ul):
    """A flat IPv6 network needs no configured underlay: any address the hypervisor owns
    on it (ULA here) serves as VTEP, and device-terminated ESP runs between those."""
    va, vb = "fd00:99::1", "fd00:99::2"
    a = Datapath(va, UNDERLAY_MTU, ipsec=ul)
    b = Datapath(vb, UNDERLAY_MTU, ipsec=ul)
    a.set_vf(0, MAC_A, 7)
    b.set_vf(0, MAC_B, 7)
    a.fdb_add(7, MAC_B, vb)
    b.fdb_add(7, None, va)                   # admits host A's VTEP as a sender
    if ul != "off":
        a.sa_add(-1, "out", SecurityAssociation(0x2000, "transport", va, vb, "aes-gcm", KEY2))
        b.sa_add(-1, "in", SecurityAssociation(0x2000, "transport", va, vb, "aes-gcm", KEY2))
    payload = os.urandom(30000)
    out, _, _ = tx(a, [tso_input(tcp_frame(payload, src="fd00:1::1", dst="fd00:1::2"))])
    for pkt in out:
        assert len(pkt) <= UNDERLAY_MTU
        outer = IPv6(pkt)
        assert outer.src == va and outer.dst == vb
        assert (outer.nh == 50) == (ul == "esp")
    frames, reasons = rx(b, out)
    assert set(reasons) == {"ok"}
    for f in frames:
        check_tcp_checksums(f)
    assert reassemble(frames) == payload


@pytest.mark.parametrize("select", ["flow-hash", "single"])
def test_device_terminated_sa_selection(select):
    """Several uplink SAs towards one VTEP: the inner flow hash spreads flows over them
    (each flow stays on one SA, so no flow is reordered); `single` uses the first."""
    a = Datapath(VTEP_A, UNDERLAY_MTU, ipsec="esp", sa_select=select)
    a.set_vf(0, MAC_A, 100)
    a.fdb_add(100, MAC_B, VTEP_B)
    spis = [0x2000 + i for i in range(4)]
    for spi in spis:
        a.sa_add(-1, "out", SecurityAssociation(spi, "transport", VTEP_A, VTEP_B, "aes-gcm",
                                                KEY2))
    seen: dict[int, set[int]] = {}
    for flow in range(64):
        frames = [plain_input(tcp_frame(b"x" * 40, sport=10000 + flow, seq=s))
                  for s in (1, 41, 81)]
        out, _, _ = tx(a, frames)
        seen[flow] = {IP(p)[ESP].spi for p in out}
    assert all(len(v) == 1 for v in seen.values())     # a flow keeps its SA
    used = set().union(*seen.values())
    if select == "single":
        assert used == {spis[0]}
    else:
        assert used == set(spis)


def test_local_switching_carries_the_full_vf_mtu():
    """No tunnel lies between two VFs of one host: a 1500-byte IP packet passes whole
    (the tunnel's smaller MTU applies only towards the underlay)."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100)
    a.set_vf(1, MAC_B, 100)
    frame = tcp_frame(os.urandom(1460))
    out, loc, inb = tx(a, [plain_input(frame)])
    assert out == [] and inb.drop_reason(0) == "ok"
    assert [f[12:] for f in loc] == [frame]
    assert a.vf_counters(1)["rx_frames"] == 1


def test_too_big_without_df_is_fragmented_before_the_tunnel():
    """An IPv4 packet too big for the tunnel with DF clear is fragmented before ESP and
    VXLAN (RFC 4459 3.1), never in the underlay; the far VF gets fragments that the
    oracle (scapy's defragment) puts back together."""
    from scapy.layers.inet import defragment

    a, b = hosts("enforce", "enforce")
    payload = os.urandom(1472)
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=VM_A, dst=VM_B, flags=0, id=77)
                  / UDP(sport=1234, dport=5678) / payload)
    out, loc, inb = tx(a, [plain_input(frame)])
    assert inb.drop_reason(0) == "ok" and loc == [] and len(out) == 2
    assert all(len(p) <= UNDERLAY_MTU for p in out)
    assert a.vf_counters(0)["tx_fragmented"] == 1
    frames, reasons = rx(b, out)
    assert reasons == ["ok", "ok"]
    whole = defragment([Ether(f)[IP] for f in frames])
    assert len(whole) == 1 and bytes(whole[0][UDP].payload) == payload


def test_fdb_learning_from_received_packets():
    """With learning on, a frame from a known VTEP teaches (VNI, source MAC) -> that VTEP;
    a static entry is never overridden by it."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    b = Datapath(VTEP_B, UNDERLAY_MTU, learning=True)
    a.set_vf(0, MAC_A, 100)
    b.set_vf(0, MAC_B, 100)
    a.fdb_add(100, MAC_B, VTEP_B)
    b.fdb_add(100, None, VTEP_A)             # the flood list makes VTEP_A known
    out, _, _ = tx(a, [plain_input(tcp_frame(b"hi"))])
    _, reasons = rx(b, out)
    assert reasons == ["ok"]
    assert (100, MAC_A, VTEP_A, True) in b.fdb_entries()
    b.fdb_add(100, MAC_A, VTEP_A)             # static now
    rx(b, tx(a, [plain_input(tcp_frame(b"again", seq=2000))])[0])
    assert (100, MAC_A, VTEP_A, False) in b.fdb_entries()


# ---- isolation between VFs and from the underlay (issue 10) ------------------------------

VM_P = "192.168.10.50"        # a remote peer whose traffic VF 1's inbound policy protects
MAC_D = "02:00:00:00:00:0d"


def local_pair(rx_mode="enforce"):
    """One host: VF 0 (ipsec off) and VF 1 (rx_mode) in VNI 100; VF 1's inbound policy
    protects what comes from the remote peer VM_P with its SA 0x1000 and bypasses
    192.168.10.60."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100)
    a.set_vf(1, MAC_B, 100, ipsec=rx_mode)
    a.fdb_add(100, None, VTEP_B)
    a.sa_add(1, "in", SecurityAssociation(0x1000, "tunnel", VM_P, VM_B, "aes-gcm", KEY))
    a.policy_set(1, [
        {"dir": "in", "src": VM_P, "dst": VM_B, "action": "protect", "spi": 0x1000},
        {"dir": "in", "src": "192.168.10.60", "dst": VM_B, "action": "bypass"}])
    return a


def local_tx(dp, frames, vf=0, loc_slot=UNDERLAY_MTU + 576):
    """tx_burst of VF vf: (underlay packets, [(local frame, its drop reason, port)])."""
    inb = Batch(len(frames) + 1, slot_size=65536 + 1024, headroom=64)
    for f in frames:
        inb.push(f)
    out = Batch(2048, slot_size=UNDERLAY_MTU + 576)
    loc = Batch(256, slot_size=loc_slot)
    assert dp.tx_burst(vf, inb, 0, out, loc) == len(frames)
    return ([out.get(i) for i in range(len(out))],
            [(loc.get(i), loc.drop_reason(i), loc.port(i)) for i in range(len(loc))])


@pytest.mark.parametrize("shape", ["unicast", "gso-whole", "flooded"])
def test_local_switching_meets_the_receivers_inbound_policy(shape):
    """A VF with ipsec off hands an enforce VF cleartext with a spoofed source (the peer
    whose traffic the receiver's policy protects): refused and counted as `policy` on the
    receiver, as on RX. So is clear traffic no policy of the receiver allows; a bypass
    policy's traffic passes. For every shape of local delivery."""
    a = local_pair()
    big = shape == "gso-whole"

    def frame(src):
        payload = os.urandom(5000 if big else 100)
        f = tcp_frame(payload, src=src, dmac="ff:ff:ff:ff:ff:ff" if shape == "flooded"
                      else MAC_B)
        return tso_input(f) if big else plain_input(f)

    slot = 65536 + 1024 if big else UNDERLAY_MTU + 576
    out, loc = local_tx(a, [frame(VM_P), frame(VM_A), frame("192.168.10.60")], loc_slot=slot)
    mine = [(f, r) for f, r, port in loc if port == 1]
    assert [r for _, r in mine] == ["policy", "policy", "ok"], mine
    if big:     # crossed whole: one GSO frame each, the accepted one with its vnet header
        assert len(loc) == 3 and len(mine[2][0]) > 5000 and mine[2][0][1] == 1
    c = a.vf_counters(1)
    assert c["drops"] == {"policy": 2} and c["rx_frames"] == 1
    assert a.vf_counters(0)["tx_local"] == 3
    if shape == "flooded":
        assert len(out) == 3            # the flood list still gets all three


def test_local_switching_offload_receiver():
    """offload: clear traffic no policy covers passes (NIC semantics), but clear traffic
    the receiver's policy protects does not (it would have to arrive through the SA)."""
    a = local_pair("offload")
    _, loc = local_tx(a, [plain_input(tcp_frame(b"x" * 64, src=VM_P)),
                          plain_input(tcp_frame(b"y" * 64, src=VM_A))])
    assert [r for _, r, _ in loc] == ["policy", "ok"]


def protected_pair(rx_key=KEY, rx_mode="enforce", rx_sa=True, gso=True):
    """VF 0 and VF 1 on one host, each holding one end of SA 0x1000 (VM_A -> VM_B), as
    two hosts would; rx_key, rx_sa vary VF 1's end."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100, ipsec="enforce")
    a.set_vf(1, MAC_B, 100, ipsec=rx_mode)
    a.sa_add(0, "out", SecurityAssociation(0x1000, "tunnel", VM_A, VM_B, "aes-gcm", KEY))
    a.policy_set(0, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                      "spi": 0x1000}])
    if rx_sa:
        a.sa_add(1, "in", SecurityAssociation(0x1000, "tunnel", VM_A, VM_B, "aes-gcm",
                                              rx_key))
        a.policy_set(1, [{"dir": "in", "src": VM_A, "dst": VM_B, "action": "protect",
                          "spi": 0x1000}])
    return a


def test_local_switching_protected_traffic_needs_the_receivers_sa():
    """The sender's policy protects VM_A -> VM_B: locally the frame is protected with the
    sender's SA and must be opened by the receiver's own SA, exactly as across the
    underlay. The two ends of one SA: the 64 KB frame arrives (segmented, decrypted,
    checksums valid, payload whole). A receiver whose SA has another key: `icv`; none:
    `no_sa`; an offload receiver without an SA gets the ESP itself, which scapy opens
    with the sender's key."""
    payload = os.urandom(20000)
    frame = tso_input(tcp_frame(payload))
    a = protected_pair()
    _, loc = local_tx(a, [frame], loc_slot=65536 + 1024)
    assert loc and {r for _, r, _ in loc} == {"ok"}
    for f, _, _ in loc:
        check_tcp_checksums(f[12:])
    assert reassemble([f[12:] for f, _, _ in loc]) == payload
    c0, c1 = a.vf_counters(0), a.vf_counters(1)
    assert c0["tx_esp"] == c1["rx_esp"] == len(loc) and c1["drops"] == {}

    a = protected_pair(rx_key=KEY2)
    _, loc = local_tx(a, [frame], loc_slot=65536 + 1024)
    assert loc and {r for _, r, _ in loc} == {"icv"}
    assert a.vf_counters(1)["drops"] == {"icv": len(loc)}

    a = protected_pair(rx_sa=False)
    _, loc = local_tx(a, [plain_input(tcp_frame(b"z" * 100))])
    assert [r for _, r, _ in loc] == ["no_sa"]

    a = protected_pair(rx_sa=False, rx_mode="offload")
    _, loc = local_tx(a, [plain_input(tcp_frame(b"secret" * 20))])
    assert [r for _, r, _ in loc] == ["ok"]
    got = Ether(loc[0][0][12:])
    assert got[IP].proto == 50 and b"secret" not in loc[0][0]
    sa = ScapySA(ESP, spi=0x1000, crypt_algo="AES-GCM", crypt_key=KEY, auth_algo="NULL",
                 tunnel_header=IP(src=VM_A, dst=VM_B))
    assert bytes(sa.decrypt(got[IP])[TCP].payload) == b"secret" * 20


# RFC 4301 5.2: what comes out of an SA must be what an inbound policy of that SA allows.

VM_C = "192.168.10.3"


def inbound_host(mode="enforce"):
    """Host B: VF 0 (mode) with SA 0x1000 (VM_A's) and SA 0x2000 (VM_C's), each with its
    inbound protect policy, and a bypass policy for 192.168.10.77."""
    b = Datapath(VTEP_B, UNDERLAY_MTU)
    b.set_vf(0, MAC_B, 100, ipsec=mode)
    b.fdb_add(100, MAC_A, VTEP_A)
    b.sa_add(0, "in", SecurityAssociation(0x1000, "tunnel", VM_A, VM_B, "aes-gcm", KEY))
    b.sa_add(0, "in", SecurityAssociation(0x2000, "tunnel", VM_C, VM_B, "aes-gcm", KEY2))
    b.policy_set(0, [
        {"dir": "in", "src": VM_A, "dst": VM_B, "action": "protect", "spi": 0x1000},
        {"dir": "in", "src": VM_C, "dst": VM_B, "action": "protect", "spi": 0x2000},
        {"dir": "in", "src": "192.168.10.77", "dst": VM_B, "action": "bypass"}])
    return b


def scapy_esp(sa, src, dst, payload=b"inner"):
    """An underlay packet from VTEP A: VXLAN around the ESP that scapy's SA makes of an
    inner TCP packet src -> dst."""
    inner = IP(src=src, dst=dst) / TCP(sport=1000, dport=2000, flags="PA") / payload
    esp = sa.encrypt(inner)
    return bytes(IP(src=VTEP_A, dst=VTEP_B) / UDP(sport=50000, dport=4789)
                 / VXLAN(vni=100, flags=0x08) / Ether(src=MAC_A, dst=MAC_B) / esp)


def test_inbound_selectors_after_decryption():
    """enforce: ESP that decrypts under SA 0x1000 must carry VM_A -> VM_B. A wrong inner
    source, a wrong inner destination (both match no policy), a packet matching SA
    0x2000's policy, one matching a bypass policy: each `policy`, counted on the VF and
    never delivered. The right one passes. scapy builds every ESP packet."""
    sa1 = ScapySA(ESP, spi=0x1000, crypt_algo="AES-GCM", crypt_key=KEY, auth_algo="NULL",
                  tunnel_header=IP(src=VM_A, dst=VM_B))
    b = inbound_host()
    cases = [(VM_A, VM_B, "ok"), ("192.168.10.66", VM_B, "policy"),
             (VM_A, "192.168.10.67", "policy"), (VM_C, VM_B, "policy"),
             ("192.168.10.77", VM_B, "policy"), (VM_A, VM_B, "ok")]
    frames, reasons = rx(b, [scapy_esp(sa1, s, d, b"case%d" % i)
                             for i, (s, d, _) in enumerate(cases)])
    assert reasons == [w for _, _, w in cases]
    assert [bytes(Ether(f)[TCP].payload) for f in frames] == [b"case0", b"case5"]
    c = b.vf_counters(0)
    assert c["drops"] == {"policy": 4} and c["rx_esp"] == 2 and c["rx_frames"] == 2


def test_inbound_selectors_offload_leaves_uncovered_traffic_to_the_sa():
    """offload (NIC semantics): a decrypted packet no policy covers is the SA's business
    and passes; one that another SA's policy or a bypass policy covers does not."""
    sa1 = ScapySA(ESP, spi=0x1000, crypt_algo="AES-GCM", crypt_key=KEY, auth_algo="NULL",
                  tunnel_header=IP(src=VM_A, dst=VM_B))
    b = inbound_host("offload")
    _, reasons = rx(b, [scapy_esp(sa1, "192.168.10.66", VM_B), scapy_esp(sa1, VM_C, VM_B),
                        scapy_esp(sa1, "192.168.10.77", VM_B)])
    assert reasons == ["ok", "policy", "policy"]


def vxlan_from(src, frame, vni=100, dst=VTEP_B):
    return bytes(IP(src=src, dst=dst) / UDP(sport=50000, dport=4789)
                 / VXLAN(vni=vni, flags=0x08) / frame)


def test_underlay_broadcast_reaches_every_local_vf_of_the_vni():
    """A broadcast (and a multicast) from the underlay reaches each VF of its VNI, each
    copy through that VF's own checks (an enforce VF refuses clear IP), and no VF of
    another VNI; a unicast frame still reaches its one VF."""
    b = Datapath(VTEP_B, UNDERLAY_MTU)
    b.set_vf(0, MAC_B, 100)
    b.set_vf(1, MAC_C, 200)
    b.set_vf(2, MAC_D, 100)
    b.set_vf(3, "02:00:00:00:00:0e", 100, ipsec="enforce")
    b.fdb_add(100, None, VTEP_A)
    arp = bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=VM_A, pdst=VM_B))
    mcast = bytes(Ether(src=MAC_A, dst="01:00:5e:00:00:fb") / IP(src=VM_A, dst="224.0.0.251")
                  / UDP(sport=5353, dport=5353) / b"mdns")
    uni = tcp_frame(b"to-d", dmac=MAC_D)
    inb = Batch(4)
    for f in (arp, mcast, uni):
        inb.push(vxlan_from(VTEP_A, f))
    extra = Batch(16)
    assert b.rx_burst(inb, extra) == 3
    got = {(inb.port(i), inb.get(i)[12:]) for i in range(3)}
    got |= {(extra.port(i), extra.get(i)[12:]) for i in range(len(extra))
            if extra.drop_reason(i) == "ok"}
    assert got == {(0, arp), (2, arp), (3, arp), (0, mcast), (2, mcast), (2, uni)}
    assert [extra.drop_reason(i) for i in range(len(extra))] == ["ok", "ok", "ok", "policy"]
    assert b.vf_counters(3)["drops"] == {"policy": 1} and b.vf_counters(1)["rx_frames"] == 0
    assert [b.vf_counters(i)["rx_frames"] for i in (0, 2, 3)] == [2, 3, 1]


def test_vxlan_only_from_admitted_vteps():
    """VXLAN is accepted only from a VTEP the configuration names for that VNI: a static
    FDB entry, a flood-list membership or an accept entry (peer_add). Anyone else, and
    an admitted VTEP speaking for another VNI, is `unknown_vtep` on the uplink; ARP
    included (it passes every mode's policy, so it is how a neighbour table is
    poisoned). Admission ends with the last entry that gave it."""
    b = Datapath(VTEP_B, UNDERLAY_MTU)
    b.set_vf(0, MAC_B, 100, ipsec="enforce")
    b.set_vf(1, MAC_C, 200)
    arp = bytes(Ether(src=MAC_A, dst=MAC_B) / ARP(op=2, psrc=VM_A, pdst=VM_B, hwsrc=MAC_A))
    arp200 = bytes(Ether(src=MAC_A, dst=MAC_C) / ARP(op=2, psrc=VM_A, pdst=VM_B))
    rogue = "10.99.0.77"

    def verdicts():
        _, r = rx(b, [vxlan_from(VTEP_A, arp), vxlan_from(rogue, arp),
                      vxlan_from(VTEP_A, arp200, vni=200)])
        return r

    assert verdicts() == ["unknown_vtep"] * 3       # nothing configured: nobody
    b.fdb_add(100, MAC_A, VTEP_A)                   # a static entry admits VTEP A
    assert verdicts() == ["ok", "unknown_vtep", "unknown_vtep"]
    b.fdb_add(100, None, VTEP_A)                    # and so does the flood list
    b.fdb_del(100, MAC_A)
    assert verdicts() == ["ok", "unknown_vtep", "unknown_vtep"]
    b.fdb_del(100, None, VTEP_A)
    assert verdicts() == ["unknown_vtep"] * 3
    b.peer_add(200, VTEP_A)                         # admitted as a sender only
    b.peer_add(100, rogue)
    assert verdicts() == ["unknown_vtep", "ok", "ok"]
    assert b.peers_admitted() == [(100, rogue), (200, VTEP_A)]
    out, _, _ = tx(b, [plain_input(tcp_frame(b"x", smac=MAC_B, dmac="ff:ff:ff:ff:ff:ff"))])
    assert out == []                                # an accept entry is not a destination
    b.peer_del(100, rogue)
    b.peer_del(200, VTEP_A)
    assert verdicts() == ["unknown_vtep"] * 3 and b.peers_admitted() == []
    assert b.uplink_counters()["drops"] == {"unknown_vtep": 14}
    assert b.vf_counters(0)["rx_frames"] == 3


def test_learning_never_admits_a_vtep():
    """With learning on, a frame from an unadmitted VTEP teaches nothing (it is refused
    before learning), nor does a VTEP admitted for VNI 100 learn into VNI 200; entries
    learned behind a VTEP go when it loses its admission."""
    b = Datapath(VTEP_B, UNDERLAY_MTU, learning=True)
    b.set_vf(0, MAC_B, 100)
    b.set_vf(1, MAC_C, 200)
    rogue = "10.99.0.77"
    b.fdb_add(200, None, rogue)                 # known, but only for VNI 200
    _, r = rx(b, [vxlan_from(rogue, tcp_frame(b"hi", smac=MAC_A)),
                  vxlan_from(VTEP_A, tcp_frame(b"hi", smac=MAC_A))])
    assert r == ["unknown_vtep", "unknown_vtep"] and b.fdb_entries() == []
    b.fdb_add(100, None, VTEP_A)
    _, r = rx(b, [vxlan_from(VTEP_A, tcp_frame(b"hi", smac=MAC_A))])
    assert r == ["ok"] and b.fdb_entries() == [(100, MAC_A, VTEP_A, True)]
    # Learned into VNI 100, the MAC is still no ticket into VNI 200 from VTEP A.
    _, r = rx(b, [vxlan_from(VTEP_A, tcp_frame(b"hi", smac=MAC_A, dmac=MAC_C), vni=200)])
    assert r == ["unknown_vtep"]
    b.fdb_del(100, None, VTEP_A)
    assert b.fdb_entries() == []
