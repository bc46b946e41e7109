"""Bounded fuzzing of ESP decapsulation (tests/fuzz/esp.py; long runs: scripts/fuzz.sh).

Every case is judged by an RFC 4303 receiver model and packets sealed with
`cryptography`; here the harness runs for a few seconds and its oracle is shown to
catch what it must.
"""

import struct

from fuzz import esp
from fuzz.common import Reader, run_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SLOW_OK = settings(max_examples=300, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_every_seed_decrypts():
    # Seeds are undamaged packets of every algorithm/mode/family/ESN/encap shape, for
    # decap (sealed here, opened by softnic) and encap (sealed by softnic, opened here).
    labels = {esp.one(s) for s in esp.SEEDS}
    assert all("ok" in label for label in labels), labels


@SLOW_OK
@given(st.binary(max_size=600))
def test_random_input(data):
    esp.one(data)


@SLOW_OK
@given(st.sampled_from(esp.SEEDS), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                           max_size=8))
def test_mutated_seeds(seed, edits):
    b = bytearray(seed)
    for i, v in edits:
        if i < len(b):
            b[i] = v
        else:
            b.append(v)
    esp.one(bytes(b))


def test_bounded_mutation_run_reaches_every_verdict():
    labels = run_for(esp.one, esp.SEEDS, seconds=4)
    assert "encap:ok" in labels and any(k.startswith("encap:malformed") for k in labels)
    seen = {w for label in labels if label.startswith("esp:")
            for w in label.split(":")[1].split(",")}
    # the harness drives decap to each verdict an inbound SA can give
    assert {"ok", "replay", "icv", "bad_trailer", "no_sa", "malformed_esp",
            "malformed_l3"} <= seen, seen


def test_model_window_and_inference():
    # RFC 4303 §3.4.3 and Appendix A, checked on known points so the oracle can fail.
    m = esp.Model(64, esn=False, top=100)
    assert m.fresh(101) and m.fresh(37) and not m.fresh(36) and not m.fresh(0)
    m.accept(90)
    assert not m.fresh(90) and m.fresh(91)
    m = esp.Model(64, esn=True, top=(5 << 32) | 10)
    assert m.infer(20) == (5 << 32) | 20                 # case B: near the window top
    assert m.infer(0xFFFFFFF0) == (4 << 32) | 0xFFFFFFF0  # left of it: previous subspace
    m = esp.Model(64, esn=True, top=(5 << 32) | 1000)
    assert m.infer(10) == (6 << 32) | 10                 # case A: below the window -> next


def test_trailer_oracle_rejects_bad_padding():
    sh = esp.Shape(Reader(bytes(16)))                    # AES-GCM, transport
    assert esp._trailer_ok(sh, b"abcd" + bytes([1, 2, 2, 6]))
    assert not esp._trailer_ok(sh, b"abcd" + bytes([1, 3, 2, 6]))
    assert not esp._trailer_ok(sh, b"abcd" + bytes([1, 2, 2, 59]))
    assert not esp._trailer_ok(sh, struct.pack("BB", 9, 6))
