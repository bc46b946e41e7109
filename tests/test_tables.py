"""SA table, FDB and policy lists: behaviour, isolation, limits, and hypothesis models."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from softnic._tables import Fdb, PeerTable, PolicyTable, SATable

UPLINK = 0xFFFFFFFF


# --- SA table -------------------------------------------------------------------------

def test_sa_basic_and_isolation():
    t = SATable(64)
    t.add(1, 0x1000, "in", 11)
    t.add(2, 0x1000, "in", 22)            # same SPI, another VF: another SA
    t.add(1, 0x1000, "out", 13)
    t.add(UPLINK, 0x1000, "in", 99)       # the uplink table shares the structure
    assert t.lookup(1, 0x1000, "in") == 11
    assert t.lookup(2, 0x1000, "in") == 22
    assert t.lookup(1, 0x1000, "out") == 13
    assert t.lookup(UPLINK, 0x1000, "in") == 99
    assert t.lookup(3, 0x1000, "in") is None          # a VF never sees another's SA
    assert t.lookup(2, 0x1000, "out") is None
    assert t.lookup(1, 0x1001, "in") is None
    with pytest.raises(KeyError):
        t.add(1, 0x1000, "in", 12)
    assert t.remove(1, 0x1000, "in") == 11
    assert t.lookup(1, 0x1000, "in") is None and t.lookup(2, 0x1000, "in") == 22
    with pytest.raises(KeyError):
        t.remove(1, 0x1000, "in")
    assert len(t) == 3
    with pytest.raises(ValueError):
        t.add(1, 1, "sideways", 1)
    with pytest.raises(ValueError):
        t.add(1, 1, "in", 0)


def test_sa_vf_isolation_many():
    t = SATable(2000)
    for vf in range(20):
        for spi in range(50):
            t.add(vf, 0x100 + spi, "in", (vf << 16) | spi | 1 << 32)
    for vf in range(20):
        for spi in range(50):
            assert t.lookup(vf, 0x100 + spi, "in") == (vf << 16) | spi | 1 << 32
        assert t.lookup(vf + 20, 0x100, "in") is None
    assert t._max_probe() < 32


def test_sa_full_and_reuse():
    t = SATable(5)
    assert t.capacity >= 10 and (t.capacity & (t.capacity - 1)) == 0
    for i in range(5):
        t.add(0, i, "out", i + 1)
    with pytest.raises(OverflowError):
        t.add(0, 99, "out", 1)
    t.remove(0, 3, "out")
    t.add(0, 99, "out", 100)
    assert t.lookup(0, 99, "out") == 100 and len(t) == 5
    with pytest.raises(ValueError):
        SATable(0)


def test_sa_colliding_keys_delete_middle():
    # many keys in a tiny table: long clusters that wrap around the end
    t = SATable(8)
    keys = [(v, s) for v in range(2) for s in range(4)]
    for v, s in keys:
        t.add(v, s, "in", 1000 + v * 10 + s)
    for v, s in keys[::2]:
        t.remove(v, s, "in")
    for v, s in keys[1::2]:
        assert t.lookup(v, s, "in") == 1000 + v * 10 + s
    for v, s in keys[::2]:
        assert t.lookup(v, s, "in") is None


SA_KEYS = st.tuples(st.integers(0, 3), st.integers(0, 12), st.sampled_from(["in", "out"]))


class SAModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.t = SATable(24)
        self.m = {}
        self.n = 1

    @rule(k=SA_KEYS)
    def add(self, k):
        self.n += 1
        if k in self.m:
            with pytest.raises(KeyError):
                self.t.add(*k, self.n)
        elif len(self.m) >= 24:
            with pytest.raises(OverflowError):
                self.t.add(*k, self.n)
        else:
            self.t.add(*k, self.n)
            self.m[k] = self.n

    @rule(k=SA_KEYS)
    def remove(self, k):
        if k in self.m:
            assert self.t.remove(*k) == self.m.pop(k)
        else:
            with pytest.raises(KeyError):
                self.t.remove(*k)

    @rule(k=SA_KEYS)
    def lookup(self, k):
        assert self.t.lookup(*k) == self.m.get(k)

    @invariant()
    def same(self):
        assert len(self.t) == len(self.m)
        assert {(v, s, d): h for v, s, d, h in self.t.entries()} == self.m


SAModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestSAModel = SAModel.TestCase


# --- FDB ------------------------------------------------------------------------------

MAC1 = "02:00:00:00:00:01"
MAC2 = "02:00:00:00:00:02"


def test_fdb_basic_learn_age():
    f = Fdb(16, 4)
    f.add(100, MAC1, 1)
    assert f.lookup(100, MAC1) == 1
    assert f.lookup(101, MAC1) is None                # VNI is part of the key
    assert f.lookup(100, bytes.fromhex("020000000001")) == 1
    with pytest.raises(KeyError):
        f.add(100, MAC1, 2)
    # learning: static entries win, learned ones move and refresh
    assert f.learn(100, MAC1, 7, now=5) is False and f.lookup(100, MAC1) == 1
    assert f.learn(100, MAC2, 2, now=10) is True and f.lookup(100, MAC2) == 2
    assert f.learn(100, MAC2, 3, now=20) is True and f.lookup(100, MAC2) == 3
    assert f.learn(100, "01:00:5e:00:00:01", 3, now=20) is False   # group MAC
    assert f.lookup(100, "01:00:5e:00:00:01") is None
    assert f.age(now=25, max_age=10) == 0
    assert f.age(now=31, max_age=10) == 1
    assert f.lookup(100, MAC2) is None and f.lookup(100, MAC1) == 1   # static stays
    f.remove(100, MAC1)
    assert f.lookup(100, MAC1) is None and len(f) == 0
    with pytest.raises(KeyError):
        f.remove(100, MAC1)
    with pytest.raises(ValueError):
        f.add(1, "02:00", 1)


def test_fdb_full_and_flood():
    f = Fdb(4, 2)
    for i in range(4):
        f.add(1, bytes([2, 0, 0, 0, 0, i]), i)
    with pytest.raises(OverflowError):
        f.add(1, bytes([2, 0, 0, 0, 0, 9]), 9)
    with pytest.raises(OverflowError):
        f.learn(1, bytes([2, 0, 0, 0, 0, 9]), 9, 0)
    f.set_flood(1, [3, 1, 2])
    f.set_flood(2, [5])
    assert f.flood(1) == [3, 1, 2] and f.flood(2) == [5] and f.flood(3) == []
    with pytest.raises(OverflowError):
        f.set_flood(3, [1])
    f.set_flood(1, [4])                     # replace
    assert f.flood(1) == [4]
    f.set_flood(2, [])                      # remove
    assert f.flood(2) == []
    f.set_flood(3, [7, 8])
    assert f.flood(3) == [7, 8] and f.flood(1) == [4]
    with pytest.raises(ValueError):
        f.set_flood(4, list(range(65)))


FDB_KEYS = st.tuples(st.integers(0, 3), st.binary(min_size=6, max_size=6).map(
    lambda b: bytes([b[0] & 0xFE]) + b[1:2] + b"\0\0\0\0")) | st.tuples(
    st.integers(0, 3), st.sampled_from([bytes([2, 0, 0, 0, 0, i]) for i in range(6)]))


class FdbModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.f = Fdb(16, 8)
        self.m = {}
        self.flood = {}

    @rule(k=FDB_KEYS, v=st.integers(0, 1000))
    def add(self, k, v):
        if k in self.m:
            with pytest.raises(KeyError):
                self.f.add(*k, v)
        elif len(self.m) >= 16:
            with pytest.raises(OverflowError):
                self.f.add(*k, v)
        else:
            self.f.add(*k, v)
            self.m[k] = v

    @rule(k=FDB_KEYS)
    def remove(self, k):
        if k in self.m:
            self.f.remove(*k)
            del self.m[k]
        else:
            with pytest.raises(KeyError):
                self.f.remove(*k)

    @rule(k=FDB_KEYS)
    def lookup(self, k):
        assert self.f.lookup(*k) == self.m.get(k)

    @rule(vni=st.integers(0, 10), vteps=st.lists(st.integers(0, 99), max_size=5))
    def set_flood(self, vni, vteps):
        if vteps and vni not in self.flood and len(self.flood) >= 8:
            with pytest.raises(OverflowError):
                self.f.set_flood(vni, vteps)
            return
        self.f.set_flood(vni, vteps)
        if vteps:
            self.flood[vni] = vteps
        else:
            self.flood.pop(vni, None)

    @invariant()
    def same(self):
        assert len(self.f) == len(self.m)
        for vni in range(11):
            assert self.f.flood(vni) == self.flood.get(vni, [])


FdbModel.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestFdbModel = FdbModel.TestCase


# --- admitted VTEPs -------------------------------------------------------------------

def test_peer_admission_is_per_vni_and_exact():
    t = PeerTable(16)
    t.add(100, "10.99.0.1", 3)
    t.add(200, "10.99.0.2", 4)
    t.add(100, "fd00:99::1", 5)
    assert t.lookup(100, "10.99.0.1") == 3
    assert t.lookup(200, "10.99.0.1") is None          # admitted for VNI 100 only
    assert t.lookup(100, "10.99.0.2") is None
    assert t.lookup(100, "10.99.1.1") is None and t.lookup(100, "0.0.0.0") is None
    # the IPv4 key is not the IPv6 address with the same leading bytes
    assert t.lookup(100, "a63:1::") is None and t.lookup(100, "fd00:99::1") == 5
    with pytest.raises(KeyError):
        t.add(100, "10.99.0.1", 9)
    t.remove(100, "10.99.0.1")
    assert t.lookup(100, "10.99.0.1") is None and len(t) == 2
    with pytest.raises(KeyError):
        t.remove(100, "10.99.0.1")
    assert sorted((v, str(a), i) for v, a, i in t.entries()) == \
        [(100, "fd00:99::1", 5), (200, "10.99.0.2", 4)]


PEER_KEYS = st.tuples(st.integers(0, 3), st.sampled_from(
    ["10.0.0.1", "10.0.0.2", "10.0.1.1", "fd00::1", "fd00::2", "::a00:1"]))


class PeerModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.t = PeerTable(8)
        self.m = {}

    @rule(k=PEER_KEYS, v=st.integers(0, 255))
    def add(self, k, v):
        if k in self.m:
            with pytest.raises(KeyError):
                self.t.add(*k, v)
        elif len(self.m) >= 8:
            with pytest.raises(OverflowError):
                self.t.add(*k, v)
        else:
            self.t.add(*k, v)
            self.m[k] = v

    @rule(k=PEER_KEYS)
    def remove(self, k):
        if k in self.m:
            self.t.remove(*k)
            del self.m[k]
        else:
            with pytest.raises(KeyError):
                self.t.remove(*k)

    @invariant()
    def same(self):
        assert len(self.t) == len(self.m)
        for vni in range(4):
            for a in ["10.0.0.1", "10.0.0.2", "10.0.1.1", "fd00::1", "fd00::2", "::a00:1"]:
                assert self.t.lookup(vni, a) == self.m.get((vni, a))


PeerModel.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestPeerModel = PeerModel.TestCase


# --- policy ---------------------------------------------------------------------------

def test_policy_order_and_selectors():
    p = PolicyTable(n_vfs=4, max_rules=8)
    r_web = p.add(0, src="10.0.0.0/8", dst="192.0.2.0/24", proto=6, dport=(80, 443),
                  action="protect", sa=0xA1, priority=100)
    p.add(0, src="10.0.0.0/8", action="discard", priority=200)
    p.add(0, src="0.0.0.0/0", action="bypass", priority=300)
    p.add(0, src="2001:db8::/32", dst="2001:db8:1::/48", proto=17, sport=500,
          action="bypass", priority=50)
    p.add(0, src="::/0", dir="in", action="discard", priority=50)
    assert p.lookup(0, "out", "10.1.1.1", "192.0.2.7", 6, 5555, 443) == ("protect", 0xA1)
    assert p.lookup(0, "out", "10.1.1.1", "192.0.2.7", 6, 5555, 444) == ("discard", None)
    assert p.lookup(0, "out", "10.1.1.1", "192.0.3.7", 6, 5555, 443) == ("discard", None)
    assert p.lookup(0, "out", "10.1.1.1", "192.0.2.7", 17, 5555, 443) == ("discard", None)
    assert p.lookup(0, "out", "11.1.1.1", "192.0.2.7", 6, 5555, 443) == ("bypass", None)
    assert p.lookup(0, "in", "11.1.1.1", "192.0.2.7", 6, 5555, 443) == ("none", None)
    assert p.lookup(0, "out", "2001:db8::5", "2001:db8:1::9", 17, 500, 500) == ("bypass", None)
    assert p.lookup(0, "out", "2001:db8::5", "2001:db8:1::9", 17, 501, 500) == ("none", None)
    assert p.lookup(0, "in", "2001:db8::5", "2001:db8:1::9", 17, 501, 500) == ("discard", None)
    # another VF has none of these rules
    assert p.lookup(1, "out", "10.1.1.1", "192.0.2.7", 6, 5555, 443) == ("none", None)
    assert p.lookup(99, "out", "10.1.1.1", "192.0.2.7", 6, 5555, 443) == ("none", None)
    # equal priority: the older rule first; removal re-exposes the next
    a = p.add(1, action="bypass", priority=10)
    p.add(1, action="discard", priority=10)
    assert p.lookup(1, "out", "1.2.3.4", "5.6.7.8", 1) == ("bypass", None)
    p.remove(1, a)
    assert p.lookup(1, "out", "1.2.3.4", "5.6.7.8", 1) == ("discard", None)
    p.remove(0, r_web)
    assert p.lookup(0, "out", "10.1.1.1", "192.0.2.7", 6, 5555, 443) == ("discard", None)
    with pytest.raises(KeyError):
        p.remove(0, r_web)
    assert [r["priority"] for r in p.rules(0)] == [50, 50, 200, 300]


def test_policy_limits():
    p = PolicyTable(n_vfs=2, max_rules=3)
    for _ in range(3):
        p.add(1, action="bypass")
    with pytest.raises(OverflowError):
        p.add(1, action="bypass")
    p.add(0, action="bypass")
    with pytest.raises(IndexError):
        p.add(2, action="bypass")
    with pytest.raises(ValueError):
        p.add(0, src="10.0.0.0/8", dst="::/0", action="bypass")
    with pytest.raises(ValueError):
        p.add(0, action="protect")            # no SA handle
    with pytest.raises(ValueError):
        p.add(0, action="reject", sa=1)
    with pytest.raises(ValueError):
        p.add(0, action="bypass", dport=(10, 5))
    p.clear(1)
    assert p.count(1) == 0 and len(p) == 1


ADDR4 = st.integers(0, 2**32 - 1).map(lambda x: str(ipaddress.IPv4Address(x)))
SEL = st.fixed_dictionaries({
    "src": st.tuples(st.sampled_from(["10.0.0.0", "10.1.0.0", "0.0.0.0", "192.0.2.0"]),
                     st.integers(0, 32)),
    "dst": st.tuples(st.sampled_from(["10.0.0.0", "198.51.100.0", "0.0.0.0"]),
                     st.integers(0, 32)),
    "proto": st.sampled_from([None, 6, 17]),
    "dport": st.sampled_from([None, (80, 80), (1000, 2000)]),
    "action": st.sampled_from(["bypass", "discard", "protect"]),
    "dir": st.sampled_from(["in", "out"]),
    "priority": st.integers(0, 5),
})
PKT = st.tuples(st.sampled_from(["in", "out"]),
                st.sampled_from(["10.0.0.1", "10.1.2.3", "192.0.2.9"]) | ADDR4,
                st.sampled_from(["10.0.0.9", "198.51.100.1"]) | ADDR4,
                st.sampled_from([6, 17, 1]), st.sampled_from([0, 80, 1500, 3000]))


def model_lookup(rules, d, src, dst, proto, dport):
    for _prio, _id, r in sorted(rules):
        s = ipaddress.ip_network(f"{r['src'][0]}/{r['src'][1]}", strict=False)
        t = ipaddress.ip_network(f"{r['dst'][0]}/{r['dst'][1]}", strict=False)
        lo, hi = r["dport"] or (0, 65535)
        if (r["dir"] == d and ipaddress.ip_address(src) in s
                and ipaddress.ip_address(dst) in t
                and r["proto"] in (None, proto) and lo <= dport <= hi):
            return r["action"], r["sa"]
    return "none", None


@settings(max_examples=300, deadline=None)
@given(st.lists(SEL, max_size=10), st.lists(PKT, min_size=1, max_size=10), st.data())
def test_policy_against_model(sels, pkts, data):
    p = PolicyTable(n_vfs=2, max_rules=16)
    rules = []
    for i, r in enumerate(sels):
        sa = 0x100 + i if r["action"] == "protect" else None
        rid = p.add(1, src=f"{r['src'][0]}/{r['src'][1]}",
                    dst=f"{r['dst'][0]}/{r['dst'][1]}", proto=r["proto"],
                    dport=r["dport"], action=r["action"], dir=r["dir"],
                    priority=r["priority"], sa=sa or 0)
        rules.append((r["priority"], rid, dict(r, sa=sa)))
    if rules and data.draw(st.booleans()):
        victim = data.draw(st.sampled_from(rules))
        p.remove(1, victim[1])
        rules.remove(victim)
    for d, src, dst, proto, dport in pkts:
        assert p.lookup(1, d, src, dst, proto, 0, dport) == \
            model_lookup(rules, d, src, dst, proto, dport)
        assert p.lookup(0, d, src, dst, proto, 0, dport) == ("none", None)


# --- the cimport contract the lead's pipeline relies on ------------------------------------

PROBE = '''
# cython: language_level=3
from libc.stdint cimport uint8_t, uint32_t
from softnic._pkt cimport sn_pkt
from softnic._tables cimport (SATable, Fdb, PolicyTable, sn_sa_lookup, sn_fdb_lookup,
                              sn_policy_lookup, SN_DIR_IN)
from softnic._vxlan cimport (sn_vxlan_tx, sn_vxlan_rx, sn_vxlan_encap, sn_vxlan_decap,
                             sn_flow_hash, sn_flow_port, sn_vxlan_tx_init)

def probe(SATable t, Fdb f, PolicyTable p, bytes frame):
    cdef void *sa
    cdef void *psa = NULL
    cdef uint32_t v
    cdef int act, r1, r2
    cdef uint8_t mac[6]
    cdef uint8_t a[16]
    cdef sn_vxlan_tx tx
    cdef sn_vxlan_rx rx
    cdef bytearray buf = bytearray(512)
    cdef sn_pkt pk
    sn_vxlan_tx_init(&tx, "10.0.0.1", "10.0.0.2", 7)
    pk.data = <uint8_t *>(<char *>buf)
    pk.cap = 512
    pk.off = 256
    pk.len = len(frame)
    pk.hash = 0
    buf[256:256 + len(frame)] = frame
    mac[:] = [2, 0, 0, 0, 0, 1]
    a[:] = [10, 0, 0, 1] + [0] * 12
    with nogil:
        sa = sn_sa_lookup(&t.t, 1, 5, SN_DIR_IN)
        v = sn_fdb_lookup(&f.f, 9, mac)
        act = sn_policy_lookup(&p.t, 0, 1, 2, a, a, 6, 1, 2, &psa)
        r1 = sn_vxlan_encap(&pk, &tx)
        r2 = sn_vxlan_decap(&pk, &rx)
    return (<size_t>sa, v, act, <size_t>psa, r1, r2, rx.vni, pk.len,
            sn_flow_port(sn_flow_hash(<const uint8_t *>frame, len(frame))))
'''


@pytest.mark.slow
def test_cimport_contract_from_another_extension(tmp_path):
    """A separate extension cimports the .pxd files and calls every lookup and the VXLAN
    stages without the GIL, as softnic/_fastpath.pyx will."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "lead_probe.pyx").write_text(PROBE)
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup, Extension\n"
        "from Cython.Build import cythonize\n"
        "setup(ext_modules=cythonize([Extension('lead_probe', ['lead_probe.pyx'])],"
        f" include_path=[{root!r}]))\n")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import lead_probe
    finally:
        sys.path.remove(str(tmp_path))
    from softnic._vxlan import flow_hash, flow_port
    t = SATable(8)
    t.add(1, 5, "in", 1234)
    f = Fdb(8)
    f.add(9, "02:00:00:00:00:01", 3)
    p = PolicyTable(2, 2)
    p.add(0, src="10.0.0.0/8", action="protect", sa=77)
    frame = bytes(range(64))
    assert lead_probe.probe(t, f, p, frame) == (1234, 3, 1, 77, 0, 0, 7, 64,
                                                flow_port(flow_hash(frame)))
