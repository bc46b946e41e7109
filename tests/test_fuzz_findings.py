"""Reproducers of findings, one per finding, each run in a child process (an
out-of-bounds access may crash it). Marked xfail(strict) until the owning module is
fixed: the fix turns the test into an XPASS, which fails the run until the mark goes.

Seen while writing the batch harness and confirmed with the AddressSanitizer build
(scripts/fuzz.sh builds it; run the snippet below in build/fuzz-asan):
  ERROR: AddressSanitizer: heap-buffer-overflow ... in _segment_batch softnic/_tso.c
  (address just past the Batch's sn_pkt array, allocated in Batch.__cinit__)
"""

import subprocess
import sys

import pytest


def child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.xfail(strict=True, reason="softnic._tso.segment_batch trusts Batch.count "
                   "(public, writable from Python) and reads sn_pkt slots past Batch.size; "
                   "softnic._esp clamps it, _tso does not")
def test_segment_batch_never_reads_past_the_batch():
    r = child(
        "from softnic._batch import Batch\n"
        "from softnic._tso import segment_batch\n"
        "b = Batch(2, slot_size=512, headroom=64)\n"
        "b.count = 3\n"
        "n, drops = segment_batch(b, Batch(4))\n"
        "print(n + sum(drops.values()))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) <= 2, "verdicts for slots the batch does not have"


@pytest.mark.xfail(strict=True, reason="softnic._batch.Batch.get/drop_reason/port check "
                   "i < count but not i < size, and count is writable from Python")
def test_batch_get_never_reads_past_the_batch():
    r = child(
        "from softnic._batch import Batch\n"
        "b = Batch(2)\n"
        "b.count = 3\n"
        "try:\n"
        "    b.get(2)\n"
        "except IndexError:\n"
        "    print('refused')\n")
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.stdout, r.stderr[-500:])


@pytest.mark.xfail(strict=True, reason="softnic._vxlan.decap_batch/encap_batch pass Batch.count "
                   "unclamped to sn_vxlan_*_burst, which read past Batch.size and, for a "
                   "refused packet, write its .drop there (an out-of-bounds write)")
def test_vxlan_batches_never_touch_slots_past_the_batch():
    r = child(
        "from softnic._batch import Batch\n"
        "from softnic._vxlan import decap_batch\n"
        "b = Batch(2, slot_size=512, headroom=64)\n"
        "b.count = 3\n"
        "n, vnis = decap_batch(b)\n"
        "print(len(vnis))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) <= 2, "verdicts for slots the batch does not have"
