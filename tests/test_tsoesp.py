"""The one-pass TSO -> ESP -> VXLAN path (softnic._tsoesp) against the stage-by-stage
path and against independent oracles.

Two oracles: (1) the stage-by-stage path of the same Datapath (sn_tso_segment, then
sn_esp_encap and sn_vxlan_encap per segment), switched in with _tsoesp.set_enabled(False):
every packet must have the same length and the same bytes from the outer IPv4 header up
to and including the ESP sequence number, the same plaintext after decryption, and the
counters must agree; (2) scapy decrypts every segment of a 64 KB frame, and the TCP/IPv4
checksums, sequence numbers, flags and IP IDs of the plaintext are checked by rebuilding
them with scapy, the payload reassembled.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from test_esp import ALGS  # noqa: F401  (registers scapy's "AES-GCM-T": truncated ICVs)
from test_pipeline import MAC_A, MAC_B, UNDERLAY_MTU, VM_A, VM_B, VTEP_A, VTEP_B, tx

from softnic import _tsoesp
from softnic._esp import SecurityAssociation
from softnic._fastpath import Datapath
from softnic._tso import make_vnet_hdr

SPI = 0x1000

# (name for ids, softnic alg, key length, scapy alg, icv, esn, engine)
SUITES = [
    ("gcm128", "aes-gcm", 20, "AES-GCM", 16, False, "auto"),
    ("gcm256-esn", "aes-gcm", 36, "AES-GCM", 16, True, "auto"),
    ("gcm128-openssl", "aes-gcm", 20, "AES-GCM", 16, False, "openssl"),
    ("gcm128-icv8", "aes-gcm", 20, None, 8, False, "auto"),
    ("chacha20", "chacha20-poly1305", 36, "CHACHA20-POLY1305", 16, False, "auto"),
]


@pytest.fixture(autouse=True)
def _fused_on():
    yield
    _tsoesp.set_enabled(True)


def frame(payload: bytes, vlan: int | None = None, flags: str = "PA", tos: int = 0,
          options: list | None = None) -> bytes:
    eth = Ether(src=MAC_A, dst=MAC_B)
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    pkt = eth / IP(src=VM_A, dst=VM_B, tos=tos, id=0x1234, flags="DF") / TCP(
        sport=40000, dport=5001, flags=flags, seq=0xFFFFF000, window=512,
        options=options or []) / payload
    return bytes(pkt)


def gso_input(f: bytes, gso_size: int) -> bytes:
    eth = Ether(f)
    l4 = len(f) - len(eth[IP])
    l4 += eth[IP].ihl * 4
    thl = eth[TCP].dataofs * 4
    return make_vnet_hdr(1, 1, l4 + thl, gso_size, l4, 16) + f


def host(mode: str, alg: str, key: bytes, icv: int, esn: bool, engine: str,
         encap=None, seq: int = 0):
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100, ipsec="enforce")
    a.fdb_add(100, MAC_B, VTEP_B)
    sa = SecurityAssociation(SPI, mode, VM_A, VM_B, alg, key, icv_len=icv, esn=esn,
                             encap=encap, engine=engine, seq=seq)
    a.sa_add(0, "out", sa)
    a.policy_set(0, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                      "spi": SPI}])
    return a, sa


def scapy_sa(mode, scapy_alg, key, icv, esn, encap):
    return ScapySA(ESP, spi=SPI, crypt_algo=scapy_alg or "AES-GCM-T", crypt_key=key,
                   crypt_icv_size=icv, auth_algo="NULL", esn_en=esn,
                   tunnel_header=IP(src=VM_A, dst=VM_B) if mode == "tunnel" else None,
                   nat_t_header=UDP(sport=encap[0], dport=encap[1]) if encap else None)


def esp_ip(pkt: bytes):
    """The IP packet carrying ESP inside one underlay packet."""
    inner = IP(pkt)[VXLAN].payload
    return inner[IP]


def run(on: bool, mode, suite, encap, f_in: bytes, key: bytes, seq: int = 0):
    _tsoesp.set_enabled(on)
    _, alg, _, _, icv, esn, engine = suite
    a, sa = host(mode, alg, key, icv, esn, engine, encap, seq)
    out, loc, _ = tx(a, [f_in])
    assert not loc
    return out, a.vf_counters(0), sa.stats()


def header_end(mode: str, encap, vlan: bool) -> int:
    """Bytes of an underlay packet up to and including the ESP sequence number."""
    return 36 + 14 + (4 if vlan else 0) + 20 + (8 if encap else 0) + 8


@pytest.mark.parametrize("suite", SUITES, ids=[s[0] for s in SUITES])
@pytest.mark.parametrize("mode", ["tunnel", "transport"])
@pytest.mark.parametrize("encap", [None, (4500, 4500)], ids=["esp", "espinudp"])
def test_one_pass_equals_stage_by_stage(suite, mode, encap):
    key = os.urandom(suite[2])
    ssa = scapy_sa(mode, suite[3], key, suite[4], suite[5], encap)
    cases = [(60000, 1448, None, "PA", 0), (1, 1448, None, "FPA", 2), (1448, 1448, 7, "A", 1),
             (1449, 1000, None, "CA", 3), (65535 - 40 - 12, 65535, None, "FPA", 0)]
    for n, gso, vlan, flags, tos in cases:
        payload = os.urandom(n)
        opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))] if n % 2 == 0 else []
        f_in = gso_input(frame(payload, vlan, flags, tos, opts), gso)
        g_out, g_c, g_st = run(False, mode, suite, encap, f_in, key)
        taken = _tsoesp.frames()
        f_out, f_c, f_st = run(True, mode, suite, encap, f_in, key)
        assert _tsoesp.frames() == taken + 1          # the one-pass path took it
        assert len(f_out) == len(g_out) > 0
        end = header_end(mode, encap, vlan is not None)
        for g, f in zip(g_out, f_out, strict=True):
            assert len(f) == len(g) <= UNDERLAY_MTU
            assert f[:end] == g[:end]
            assert bytes(ssa.decrypt(esp_ip(f))) == bytes(ssa.decrypt(esp_ip(g)))
        assert f_c == g_c and f_st == g_st


def test_64k_frame_every_segment_decrypts_and_checks():
    key = os.urandom(20)
    payload = os.urandom(65535 - 20 - 32)
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (7, 9))]
    f_in = gso_input(frame(payload, flags="FPA", tos=0x2, options=opts), 65535)
    taken = _tsoesp.frames()
    out, c, st = run(True, "tunnel", SUITES[0], None, f_in, key)
    assert _tsoesp.frames() == taken + 1
    ssa = scapy_sa("tunnel", "AES-GCM", key, 16, False, None)
    got = b""
    seq = 0xFFFFF000
    for i, pkt in enumerate(out):
        assert len(pkt) <= UNDERLAY_MTU
        outer = IP(pkt)
        assert outer.flags.DF and outer.id == 0 and outer[UDP].dport == 4789
        assert outer.tos & 3 == 2                        # inner ECN copied (RFC 6040)
        e = esp_ip(pkt)
        assert e[ESP].seq == i + 1 and e.id == i + 1
        plain = ssa.decrypt(e)
        ip, tcp = plain[IP], plain[TCP]
        assert ip.id == (0x1234 + i) & 0xFFFF and ip.flags.DF
        assert tcp.seq == (seq + len(got)) & 0xFFFFFFFF
        last = i == len(out) - 1
        assert ("F" in tcp.flags) == last and ("P" in tcp.flags) == last
        sent_ip, sent_tcp = ip.chksum, tcp.chksum
        del ip.chksum, tcp.chksum
        rebuilt = IP(bytes(ip))
        assert rebuilt.chksum == sent_ip and rebuilt[TCP].chksum == sent_tcp
        sent_outer = outer.chksum
        del outer.chksum
        assert IP(bytes(outer)).chksum == sent_outer
        got += bytes(tcp.payload)
    assert got == payload
    assert c["tx_tso_frames"] == 1 and c["tx_segments"] == len(out) == c["tx_esp"]
    assert c["tx_packets"] == len(out) and st["packets"] == len(out)


def test_sequence_space_runs_out_mid_frame():
    key = os.urandom(20)
    f_in = gso_input(frame(os.urandom(20000)), 1448)
    left = 5
    results = [run(on, "tunnel", SUITES[0], None, f_in, key, seq=0xFFFFFFFF - left)
               for on in (False, True)]
    (g_out, g_c, g_st), (f_out, f_c, f_st) = results
    assert len(f_out) == len(g_out) == left
    assert f_c == g_c and f_c["drops"] == {"seq_exhausted": 15 - left}
    assert f_st == g_st and f_st["seq"] == 0xFFFFFFFF and "seq_exhausted" in f_st["events"]
    ssa = scapy_sa("tunnel", "AES-GCM", key, 16, False, None)
    for pkt in f_out:
        assert TCP in ssa.decrypt(esp_ip(pkt))


@pytest.mark.parametrize("case", ["cbc", "ip-options"])
def test_what_it_does_not_cover_takes_the_stage_by_stage_path(case):
    """CBC (an IV generator) and IPv4 options (a source route may name the TCP
    pseudo-header's destination) are left to the generic stages, which still work."""
    a = Datapath(VTEP_A, UNDERLAY_MTU)
    a.set_vf(0, MAC_A, 100, ipsec="enforce")
    a.fdb_add(100, MAC_B, VTEP_B)
    key, akey = os.urandom(16 if case == "cbc" else 20), os.urandom(32)
    if case == "cbc":
        sa = SecurityAssociation(SPI, "tunnel", VM_A, VM_B, "aes-cbc-hmac-sha256", key,
                                 auth_key=akey)
        ssa = ScapySA(ESP, spi=SPI, crypt_algo="AES-CBC", crypt_key=key,
                      auth_algo="SHA2-256-128", auth_key=akey,
                      tunnel_header=IP(src=VM_A, dst=VM_B))
        f = frame(os.urandom(5000))
    else:
        sa = SecurityAssociation(SPI, "tunnel", VM_A, VM_B, "aes-gcm", key)
        ssa = scapy_sa("tunnel", "AES-GCM", key, 16, False, None)
        f = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=VM_A, dst=VM_B, options=[
            IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()])
            / TCP(sport=1, dport=2, flags="PA") / os.urandom(5000))
    a.sa_add(0, "out", sa)
    a.policy_set(0, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                      "spi": SPI}])
    taken = _tsoesp.frames()
    out, loc, _ = tx(a, [gso_input(f, 1448)])
    assert _tsoesp.frames() == taken and len(out) >= 4 and not loc
    got = b""
    for pkt in out:
        got += bytes(ssa.decrypt(esp_ip(pkt))[TCP].payload)
    assert got == bytes(Ether(f)[TCP].payload)


def device_host(ul: str, mode: str, keys: list[bytes], select: str, suite, seq: int = 0):
    a = Datapath(VTEP_A, UNDERLAY_MTU, ipsec=ul, sa_select=select)
    a.set_vf(0, MAC_A, 100)
    a.fdb_add(100, MAC_B, VTEP_B)
    _, alg, _, _, icv, esn, engine = suite
    sas = [SecurityAssociation(0x2000 + i, mode, VTEP_A, VTEP_B, alg, k, icv_len=icv,
                               esn=esn, engine=engine, seq=seq,
                               encap=(4500, 4500) if ul == "espinudp" else None)
           for i, k in enumerate(keys)]
    for sa in sas:
        a.sa_add(-1, "out", sa)
    return a, sas


@pytest.mark.parametrize("suite", SUITES[:3] + SUITES[4:], ids=[s[0] for s in SUITES[:3]
                                                               + SUITES[4:]])
@pytest.mark.parametrize("mode", ["transport", "tunnel"])
@pytest.mark.parametrize("ul", ["esp", "espinudp"])
def test_device_terminated_one_pass_equals_stage_by_stage(suite, mode, ul):
    """VXLAN first, then the uplink SA (chosen by the inner flow hash) around it."""
    keys = [os.urandom(suite[2]) for _ in range(3)]
    encap = (4500, 4500) if ul == "espinudp" else None
    oracles = {0x2000 + i: ScapySA(
        ESP, spi=0x2000 + i, crypt_algo=suite[3], crypt_key=k, auth_algo="NULL",
        esn_en=suite[5], tunnel_header=IP(src=VTEP_A, dst=VTEP_B) if mode == "tunnel"
        else None, nat_t_header=UDP(sport=4500, dport=4500) if encap else None)
        for i, k in enumerate(keys)}
    for n, gso, sport, select in [(60000, 1448, 40000, "flow-hash"), (3000, 1000, 40001,
                                  "flow-hash"), (1, 1448, 40002, "single"),
                                  (65535 - 40 - 12, 65535, 40003, "flow-hash")]:
        f_in = gso_input(bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=VM_A, dst=VM_B, tos=1)
                               / TCP(sport=sport, dport=5001, flags="PA")
                               / os.urandom(n)), gso)
        res = []
        for on in (False, True):
            _tsoesp.set_enabled(on)
            a, sas = device_host(ul, mode, keys, select, suite)
            taken = _tsoesp.frames()
            out, loc, _ = tx(a, [f_in])
            assert _tsoesp.frames() == taken + on and not loc
            res.append((out, a.vf_counters(0), a.uplink_counters(),
                        [sa.stats() for sa in sas]))
        (g_out, *g_rest), (f_out, *f_rest) = res
        assert len(f_out) == len(g_out) > 0 and f_rest == g_rest
        end = 20 + (8 if encap else 0) + 8
        for g, f in zip(g_out, f_out, strict=True):
            assert len(f) == len(g) <= UNDERLAY_MTU and f[:end] == g[:end]
            spi = int.from_bytes(f[end - 8:end - 4], "big")
            pf, pg = oracles[spi].decrypt(IP(f)), oracles[spi].decrypt(IP(g))
            assert bytes(pf) == bytes(pg) and pf[VXLAN].vni == 100
            assert TCP in pf[VXLAN].payload


def _open_all(pkts: list[bytes], end: int, key: bytes) -> list[bytes]:
    """AES-GCM-open every packet's ESP payload (RFC 4106) with cryptography's AEAD."""
    aead = AESGCM(key[:-4])
    out = []
    for p in pkts:
        nonce = key[-4:] + p[end:end + 8]
        out.append(aead.decrypt(nonce, p[end + 8:], p[end - 8:end]))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 65535 - 40),
       gso=st.sampled_from([1448, 1448, 65535, 536, 9000, 48, 47, 1, 0]),
       hdr_delta=st.sampled_from([0, 0, 0, -1, 7, 100000]),
       cut=st.sampled_from([0, 0, 0, 1, 13, 900]),
       ip_len_delta=st.sampled_from([0, 0, 0, 0, 1, -1, 30, -30]), model=st.sampled_from(
           ["tunnel", "transport", "tunnel-udp", "device-transport", "device-tunnel"]))
def test_hostile_frames_same_outcome_on_both_paths(n, gso, hdr_delta, cut, ip_len_delta,
                                                     model):
    """Whatever a guest sends (bad gso_size, hdr_len, truncated frames, IP lengths that
    lie), the one-pass path does what the stage-by-stage path does: the same packets,
    the same drop reasons and counters."""
    f = bytearray(frame(bytes(range(256)) * (n // 256) + bytes(n % 256)))
    ip_len = int.from_bytes(f[16:18], "big") + ip_len_delta
    f[16:18] = (ip_len & 0xFFFF).to_bytes(2, "big")
    if cut:
        f = f[:max(14, len(f) - cut)]
    vnet = make_vnet_hdr(1, 1, max(0, 54 + hdr_delta) & 0xFFFF, gso & 0xFFFF, 34, 16)
    key = bytes(range(20))
    device = model.startswith("device")
    mode = model.split("-")[-1] if device else model.split("-")[0]
    encap = (4500, 4500) if model == "tunnel-udp" else None
    res = []
    for on in (False, True):
        _tsoesp.set_enabled(on)
        if device:
            a, sas = device_host("esp", mode, [key], "single", SUITES[0])
            sa = sas[0]
        else:
            a, sa = host(mode, "aes-gcm", key, 16, False, "auto", encap)
        out, loc, inb = tx(a, [vnet + bytes(f)])
        res.append((out, a.vf_counters(0), a.uplink_counters(), sa.stats(),
                    inb.drop_reason(0)))
    (g_out, *g_rest), (f_out, *f_rest) = res
    assert f_rest == g_rest
    assert [len(p) for p in f_out] == [len(p) for p in g_out]
    end = 28 if device else header_end(mode, encap, False)
    assert [p[:end] for p in f_out] == [p[:end] for p in g_out]
    assert _open_all(f_out, end, key) == _open_all(g_out, end, key)
