"""One outbound SA shared by several TX threads (two queues of one VM share its SA).

softnic._esp._encap_hammer protects a batch over and over without the GIL; Python
threads run it at once on one SA. Every sequence number must be used exactly once and
the numbers must be contiguous (RFC 4303 section 3.3.3: a number is never reused), the
counters must add up, the end of the sequence space must stop every thread without a
number past it, and scapy (the oracle of tests/test_esp.py) must decrypt what came out.
"""

from __future__ import annotations

import os
import threading

import pytest
from scapy.layers import ipsec as sipsec
from scapy.layers.inet import IP, UDP

from softnic import _crypto
from softnic._batch import Batch
from softnic._esp import SecurityAssociation, _encap_hammer

SRC, DST = "192.0.2.1", "198.51.100.2"
THREADS = 4

ENGINES = [e for e in ("ipsec-mb", "openssl") if e in _crypto.engines()]
CASES = [("aes-gcm", "AES-GCM", 20, e) for e in ENGINES] + [
    ("aes-cbc-hmac-sha256", "AES-CBC", 16, "openssl"),
    ("chacha20-poly1305", "CHACHA20-POLY1305", 36, "auto"),
]


def _inner(i: int) -> bytes:
    return bytes(IP(src="10.0.0.1", dst="10.0.0.2", id=i) / UDP(sport=1000 + i, dport=53)
                 / os.urandom(20 + i))


def _run(sa: SecurityAssociation, per_batch: int, rounds: int):
    batches = []
    for _ in range(THREADS):
        b = Batch(per_batch)
        for i in range(per_batch):
            b.push(_inner(i))
        batches.append(b)
    results: list = [None] * THREADS
    start = threading.Barrier(THREADS)

    def work(k: int) -> None:
        start.wait()
        results[k] = _encap_hammer(sa, batches[k], rounds, 0, 20)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return batches, results


@pytest.mark.parametrize("alg,scapy_alg,keylen,engine", CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_shared_outbound_sa_sequence_numbers_unique_and_contiguous(alg, scapy_alg, keylen,
                                                                  engine):
    key = os.urandom(keylen)
    akey = os.urandom(32) if "cbc" in alg else None
    sa = SecurityAssociation(7, "tunnel", SRC, DST, alg, key, auth_key=akey, engine=engine)
    per_batch, rounds = 64, 1000
    batches, results = _run(sa, per_batch, rounds)
    seqs = [s for r in results for s in r[0]]
    assert all(not r[1] for r in results)                # no drops
    # The threads really ran at once: some thread's numbers are not one block.
    assert any(any(b != a + 1 for a, b in zip(r[0], r[0][1:], strict=False)) for r in results)
    total = THREADS * per_batch * rounds
    assert len(seqs) == total
    assert sorted(seqs) == list(range(1, total + 1))     # unique and contiguous
    st = sa.stats()
    assert st["packets"] == total and sa.seq == total
    assert st["bytes"] == THREADS * rounds * sum(len(_inner(i)) for i in range(per_batch))
    # scapy decrypts each thread's last round.
    scapy_sa = sipsec.SecurityAssociation(
        sipsec.ESP, spi=7, crypt_algo=scapy_alg, crypt_key=key,
        auth_algo="SHA2-256-128" if akey else "NULL", auth_key=akey,
        tunnel_header=IP(src=SRC, dst=DST))
    for b in batches:
        for i in range(0, per_batch, 9):
            pkt = IP(b.get(i))
            assert pkt.proto == 50
            plain = scapy_sa.decrypt(pkt)
            assert plain[UDP].sport == 1000 + i


@pytest.mark.parametrize("esn", [False, True])
def test_shared_outbound_sa_stops_at_the_end_of_the_sequence_space(esn):
    last = (1 << 64) - 1 if esn else (1 << 32) - 1
    left = 1000
    sa = SecurityAssociation(9, "tunnel", SRC, DST, "aes-gcm", os.urandom(20), esn=esn,
                             seq=last - left)
    batches, results = _run(sa, 32, 20)                  # 2560 packets for 1000 numbers
    seqs = [s for r in results for s in r[0]]
    assert len(seqs) == left
    assert sorted(seqs) == [(last - left + 1 + i) & 0xFFFFFFFF for i in range(left)]
    refused = sum(r[1].get("seq_exhausted", 0) for r in results)
    assert refused == THREADS * 32 * 20 - left
    assert sa.seq == last                                # never past the end, never wrapped
    st = sa.stats()
    assert st["packets"] == left and st["drops"] == {"seq_exhausted": refused}
    assert "seq_exhausted" in sa.pop_events()
