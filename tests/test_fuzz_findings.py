"""Reproducers of findings, one per finding, each run in a child process (an
out-of-bounds access may crash it). All three came from one root cause, Batch.count
writable from Python past the batch's size; Batch now refuses such a count.

Seen while writing the batch harness and confirmed with the AddressSanitizer build
(scripts/fuzz.sh builds it; run the snippet below in build/fuzz-asan):
  ERROR: AddressSanitizer: heap-buffer-overflow ... in _segment_batch softnic/_tso.c
  (address just past the Batch's sn_pkt array, allocated in Batch.__cinit__)
"""

import subprocess
import sys


def child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_segment_batch_never_reads_past_the_batch():
    r = child(
        "from softnic._batch import Batch\n"
        "from softnic._tso import segment_batch\n"
        "b = Batch(2, slot_size=512, headroom=64)\n"
        "try:\n"
        "    b.count = 3\n"
        "except ValueError:\n"
        "    b.count = 2\n"
        "n, drops = segment_batch(b, Batch(4))\n"
        "print(n + sum(drops.values()))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) <= 2, "verdicts for slots the batch does not have"


def test_batch_get_never_reads_past_the_batch():
    r = child(
        "from softnic._batch import Batch\n"
        "b = Batch(2)\n"
        "try:\n"
        "    b.count = 3\n"
        "except ValueError:\n"
        "    b.count = 2\n"
        "try:\n"
        "    b.get(2)\n"
        "except IndexError:\n"
        "    print('refused')\n")
    assert r.returncode == 0 and r.stdout.strip() == "refused", (r.stdout, r.stderr[-500:])


def test_vxlan_batches_never_touch_slots_past_the_batch():
    r = child(
        "from softnic._batch import Batch\n"
        "from softnic._vxlan import decap_batch\n"
        "b = Batch(2, slot_size=512, headroom=64)\n"
        "try:\n"
        "    b.count = 3\n"
        "except ValueError:\n"
        "    b.count = 2\n"
        "n, vnis = decap_batch(b)\n"
        "print(len(vnis))\n")
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) <= 2, "verdicts for slots the batch does not have"
