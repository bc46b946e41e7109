"""Bounded fuzzing of VXLAN decap/encap and ICMP too-big (tests/fuzz/vxlan.py)."""

import pytest
from fuzz import vxlan
from fuzz.common import Finding, run_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(st.binary(max_size=400))
def test_random_input(data):
    vxlan.one(data)


@SETTINGS
@given(st.sampled_from(vxlan.SEEDS), st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)),
                                             max_size=6))
def test_mutated_seeds(seed, edits):
    b = bytearray(seed)
    for i, v in edits:
        b[i % len(b)] = v
    vxlan.one(bytes(b))


def test_bounded_mutation_run():
    labels = run_for(vxlan.one, vxlan.SEEDS, seconds=3)
    for want in ("decap:ok", "encap:ok", "icmp:ok", "icmp:none"):
        assert want in labels, sorted(labels)
    assert any(k.startswith("decap:malformed") for k in labels)
    assert any(k.startswith("decap_batch:") for k in labels)
    assert any(k.startswith("encap_batch:") for k in labels)
    # through the data plane: admission, broadcast copies, local switching
    for want in ("rx:unknown_vtep", "rx:ok", "rx:no_fdb", "rx:unknown_vni", "local:ok",
                 "local:policy"):
        assert want in labels, sorted(labels)
    assert any(k.startswith("rx:") and k.endswith(":bum") for k in labels), sorted(labels)


def test_admission_oracle():
    """The model refuses a wrong answer: clear IP taken by an enforce VF, a changed frame."""
    ip = vxlan.inner_frame(vxlan.Reader(bytes([1] + [7] * 40)))
    with pytest.raises(Finding):
        vxlan._check_copy(1, "ok", bytes(12) + ip, ip, {})
    with pytest.raises(Finding):
        vxlan._check_copy(0, "ok", bytes(12) + ip[:-1] + b"\0", ip, {})
    with pytest.raises(Finding):                     # an off VF refuses nothing by policy
        vxlan._check_copy(0, "policy", None, ip, {})
    vxlan._check_copy(0, "ok", bytes(12) + ip, ip, {})


def test_ecn_oracle():
    # RFC 6040 §4.2 on known points, so a wrong propagation cannot pass unseen.
    eth = bytes(12) + b"\x08\x00"
    ip = bytearray(bytes([0x45, 0x01]) + bytes(18))          # inner ECT(1)
    vxlan.check_ecn_decap(eth + bytes(ip), eth + bytes(ip), 0)
    ce = bytearray(ip)
    ce[1] = 0x03
    with pytest.raises(Finding):                              # outer CE must mark CE
        vxlan.check_ecn_decap(eth + bytes(ip), eth + bytes(ip), 3)
    with pytest.raises(Finding):                              # never CE under Not-ECT outer
        vxlan.check_ecn_decap(eth + bytes(ip), eth + bytes(ce), 0)


def test_udp_walk_is_independent():
    pkt, v6, l4 = vxlan.outer(vxlan.Reader(bytes([0, 1, 1, 3])), b"\x02" * 14, 5)
    assert v6 and vxlan.udp_at(pkt) == l4 == 48     # IPv6 + hop-by-hop
