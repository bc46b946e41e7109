"""Guest rings (virtio 1.1 §2.6 split virtqueues, device side): vhost._virtq.Virtq.pop
(TX) and .push (RX, mergeable or not) under hostile descriptor tables, through
vhost.testing.RingHarness (device and driver sides over one memfd, no socket).

Descriptors take fuzz-chosen ids, addresses (inside, straddling the region end, before
it, far outside, wrapping 2^64, the ring itself), lengths (0, tiny, huge, 2^32-1), flags
(NEXT/WRITE/INDIRECT in any order), next indexes (in range, out of range, loops), and
indirect tables with bad lengths or nested indirection; heads may be out of range and the
avail index may jump.

Oracle (the device is allowed to touch guest memory only as the spec says):
- the whole guest RAM is compared before and after: TX may write nothing but the used
  ring; RX nothing but the used ring and buffers of descriptors marked WRITE;
- a ring is either working or broken with a reason from FATAL_ERRORS, and a broken ring
  stays quiet (no frames, no used entries);
- used.idx moves by at most the number of chains made available;
- TX of chains that are all well formed returns exactly the bytes the guest wrote;
- guest RAM cut short under the ring (its file truncated) faults only into a broken ring
  (guest_memory_fault), never out of the process.
"""

from __future__ import annotations

import os
import struct

from vhost._virtq import FATAL_ERRORS, VQ_ERRORS
from vhost.testing import RingHarness

from .common import Reader, expect

NEXT, WRITE, INDIRECT = 1, 2, 4
MEM = 64 << 10
HDR = 12
PAGE = 4096
PATTERN = bytes((i * 13 + 5) & 0xFF for i in range(4096))   # guest data, recognisable


def one(data: bytes) -> str:
    r = Reader(data)
    num = r.choice((8, 16, 4))
    rx = r.flag()
    with RingHarness(num=num, buf_size=64, indirect=r.u8() % 4 != 3, event_idx=r.flag(),
                     mem_size=MEM) as h:
        if r.u8() % 8 == 7:
            return _rings_misplaced(r, h)
        return _run(r, h, num, rx)


def _rings_misplaced(r: Reader, h: RingHarness) -> str:
    """A second queue whose rings the guest placed badly: sizes that are not powers of
    two or are huge, rings straddling the region end, overlapping each other or the
    data, unmapped or wrapping addresses. start() must refuse (ring_addr) or the queue
    must work within what it was given, writing nothing but its used ring and WRITE
    buffers."""
    from vhost._virtq import Virtq

    uva = h.UVA - h.gpa_base                 # guest address -> our mapping's address
    num = r.choice((8, 3, 12, 0, 1, 256, 32768, 65535, 1 << 20))
    spots = (h.gpa_base + h.free_off, h.gpa_base, h.gpa_base + MEM - 8 - r.u8(),
             h.gpa_base + h.driver.used_off, h.gpa_base + 1 + r.below(MEM), 0, 1 << 40,
             (1 << 64) - 16)
    desc, used, avail = (r.choice(spots) for _ in range(3))
    h.ram.write(h.free_off, r.take(r.below(512)))      # whatever the rings then contain
    vq = Virtq(2, h.mem)
    try:
        vq.set_num(num)
        vq.set_addr((desc + uva) & (1 << 64) - 1, (used + uva) & (1 << 64) - 1,
                    (avail + uva) & (1 << 64) - 1)
        vq.set_base(r.uint(2))
        before = h.ram.read(0, MEM)
        if not vq.start(r.flag(), r.flag(), 12):
            expect(vq.broken == "ring_addr", f"refused start broke with {vq.broken}")
            expect(h.ram.read(0, MEM) == before, "a refused queue wrote guest memory")
            return "rings:ring_addr"
        if r.flag():
            vq.pop(max_chains=8, cap=4096)
        else:
            vq.push([bytes(HDR) + r.take(r.u8())], r.flag())
        after = h.ram.read(0, MEM)
        # what the queue may write: its used ring, and WRITE buffers the (guest-written,
        # possibly overwritten) descriptor table names, directly or through one table
        writable = [(used, 6 + 8 * num + 2)]
        for img in (before, after):
            for e in range(min(num, MEM // 16)):
                off = desc - h.gpa_base + 16 * e
                if not 0 <= off <= MEM - 16:
                    break
                a, ln, fl, _ = struct.unpack_from("<QIHH", img, off)
                if fl & WRITE:
                    writable.append((a, ln))
                if fl & INDIRECT and 0 <= a - h.gpa_base <= MEM - ln and ln <= 4096:
                    for t in range(ln // 16):
                        ta, tl, tf, _ = struct.unpack_from("<QIHH", img, a - h.gpa_base + 16 * t)
                        if tf & WRITE:
                            writable.append((ta, tl))
        _check_writes(h, before, after, writable, used_ring=False)
        return "rings:" + (vq.broken or "ok")
    finally:
        vq.reset()


def _run(r: Reader, h: RingHarness, num: int, rx: bool) -> str:
    d = h.driver
    base = h.gpa_base
    scratch = h.free_off
    expect(scratch + 4096 + 1024 <= MEM, "harness layout")
    data_off = scratch                       # 4 KB of patterned guest data
    table_off = scratch + 4096               # indirect tables
    h.ram.write(data_off, PATTERN)
    writable: list[tuple[int, int]] = []     # guest ranges the device may write (RX)
    sane = True

    def addr_len(write: bool) -> tuple[int, int]:
        nonlocal sane
        k = r.u8() % 16
        if k < 11:
            a = base + data_off + r.below(3000)
            n = r.choice((HDR, 1 + r.below(200), 64, 300))
        else:
            sane = False
            a = r.choice((base + MEM - r.below(32), base - 8, 0, 1 << 40,
                          (1 << 64) - 8 - r.below(64), base + d.desc_off))
            n = r.choice((0, 1, 7, 5000, 0xFFFFFFFF, 64))
        if write:
            writable.append((a, n))
        return a, n

    ids = list(range(num))
    tables = [(d.desc_off, num)]             # descriptor tables, for _check_writes
    heads = []
    frames_sent: list[bytes] = []
    t_used = 0
    for _ in range(r.u8() % 4):              # 0: a guest that posts no buffers at all
        clen = 1 + r.u8() % 3
        if len(ids) < clen:
            break
        chain = [ids.pop(0) for _ in range(clen)]
        payload = b""
        for j, i in enumerate(chain):
            write = rx
            if r.u8() % 8 == 7:
                write, sane = not write, False
            last = j == clen - 1
            fl = (WRITE if write else 0) | (0 if last else NEXT)
            nxt = 0 if last else chain[j + 1]
            if r.u8() % 10 == 9:
                sane = False
                fl = r.u8() & 7
                nxt = r.choice((r.u8(), chain[0], i, num, 0xFFFF))
            if fl & INDIRECT:
                n_ent = 1 + r.u8() % 3
                ents = b""
                for e in range(n_ent):
                    efl = (WRITE if rx else 0) | (NEXT if e < n_ent - 1 else 0)
                    if r.u8() % 6 == 5:
                        efl = r.u8() & 7
                    a, ln = addr_len(bool(efl & WRITE))
                    ents += struct.pack("<QIHH", a, ln, efl, (e + 1) if e < n_ent - 1 else r.u8() % 8)
                toff = table_off + t_used
                t_used += len(ents)
                tables.append((toff, n_ent))
                h.ram.write(toff, ents)
                tlen = r.choice((len(ents), len(ents), len(ents) - 1, 0, 1 << 20))
                d.write_desc(i, base + toff, tlen, fl, nxt)
                continue
            write = bool(fl & WRITE)
            a, ln = addr_len(write)
            d.write_desc(i, a, ln, fl, nxt)
            if not write and base + data_off <= a and a + ln <= base + MEM:
                o = a - base
                payload += h.ram.read(o, ln)
        heads.append(chain[0])
        frames_sent.append(payload)
    for hd in heads:
        if r.u8() % 10 == 9:
            hd, sane = r.choice((num, num + 3, 0xFFFF, r.uint(2))), False
        d.post(hd, kick=False)
    if r.u8() % 12 == 11:
        jump = r.choice((num + 1, 0xFFFF, r.uint(2)))
        d.set_avail_idx((d.avail_idx + jump) & 0xFFFF)
        sane = False

    if r.u8() % 12 == 11:
        return _vanish(r, h, rx)
    before = h.ram.read(0, MEM)
    used0 = d.used_idx
    if rx:
        frames = [bytes(HDR) + r.take(r.choice((0, 10, 60, 200, 700))) for _ in range(1 + r.u8() % 3)]
        done = h.vq.push(frames, r.flag())
        expect(0 <= done <= len(frames), f"push dealt with {done} of {len(frames)}")
        got = []
    else:
        got = h.vq.pop(max_chains=r.choice((1, 4, 64)), cap=r.choice((2048, 100, 65600)))
        for f in got:
            expect(len(f) >= HDR, "a TX frame without its virtio-net header")
    after = h.ram.read(0, MEM)
    aliased = False
    if rx:
        # A guest may hand out its own descriptor table as a WRITE buffer. What the
        # device writes there then changes later descriptors, even between two frames
        # of one burst (a chain that did not fit stays available and is read again), so
        # the table's final state does not name every buffer written. Then the check is
        # coarser: the tables and the data area may change, the rest of RAM (the avail
        # ring, the driver's own buffers) may not.
        tab_ranges = [(base + off, base + off + 16 * n) for off, n in tables]
        aliased = any(a < hi and lo < a + n for a, n in writable for lo, hi in tab_ranges)
        for off, n in tables:
            for e in range(n):
                a, ln, fl, _ = struct.unpack_from("<QIHH", after, off + 16 * e)
                if fl & WRITE:
                    writable.append((a, ln))
        if aliased:
            writable += [(lo, hi - lo) for lo, hi in tab_ranges]
            writable.append((base + data_off, 4096))
    _check_writes(h, before, after, writable if rx else [])
    moved = (d.used_idx - used0) & 0xFFFF
    offered = (d.avail_idx - used0) & 0xFFFF      # what the guest published, jumps included
    expect(moved <= min(offered, d.num), f"used.idx moved {moved}; {offered} offered")
    broken = h.vq.broken
    counters = h.vq.counters()
    if broken is not None:
        expect(broken in FATAL_ERRORS, f"broken with a non-fatal reason {broken}")
        expect(counters[broken] >= 1, "broken without its counter")
        snap = h.ram.read(0, MEM)
        expect(h.vq.pop() == [] and h.vq.push([bytes(HDR) + b"x"]) in (0, 1), "quiet")
        expect(h.ram.read(0, MEM) == snap, "a broken ring still writes guest memory")
    errs = [k for k in VQ_ERRORS[1:] if counters.get(k)]
    if not rx and sane and not errs:
        expect(got == frames_sent[:len(got)], "TX frames differ from what the guest wrote")
    return (("rx:" if rx else "tx:") + (broken or "ok") + (",aliased" if aliased else "")
            + ("," + ",".join(errs) if errs else ""))


def _vanish(r: Reader, h: RingHarness, rx: bool) -> str:
    """The guest's RAM file shrinks just before the device looks at the ring (a frontend
    truncating its memory-backend-file): every access past the cut faults with SIGBUS.
    The guard (vhost._virtq) must turn a fault into a broken ring, guest_memory_fault,
    and the process must live; a ring that did not fault works on as usual, and a
    broken one stays quiet once the memory is back."""
    cut = r.choice((0, PAGE, r.below(MEM // PAGE) * PAGE, r.below(MEM)))
    frames = [bytes(HDR) + r.take(r.choice((0, 60, 700))) for _ in range(1 + r.u8() % 2)]
    os.ftruncate(h.memfd, cut)
    try:                  # no access to guest RAM from this side while it is cut
        if rx:
            done = h.vq.push(frames, r.flag())
            expect(0 <= done <= len(frames), f"push dealt with {done} of {len(frames)}")
        else:
            h.vq.pop(max_chains=r.choice((1, 64)), cap=2048)
    finally:
        os.ftruncate(h.memfd, MEM)              # pages past the cut come back as zeros
    broken = h.vq.broken
    faults = h.vq.counters()["guest_memory_fault"]
    expect(broken is None or broken in FATAL_ERRORS, f"broken with {broken}")
    expect(faults <= 1, f"{faults} memory faults counted on one ring")
    expect(not faults or broken == "guest_memory_fault",
           f"a memory fault left the ring {broken}")
    expect(cut > 0 or broken == "guest_memory_fault", "no fault with all memory gone")
    if broken is not None:
        snap = h.ram.read(0, MEM)
        expect(h.vq.pop() == [] and h.vq.push([bytes(HDR) + b"x"]) == 0, "broken, not quiet")
        expect(h.ram.read(0, MEM) == snap, "a broken ring still writes guest memory")
    return ("rx:" if rx else "tx:") + "vanish:" + (broken or "ok")


def _check_writes(h: RingHarness, before: bytes, after: bytes,
                  writable: list[tuple[int, int]], used_ring: bool = True) -> None:
    """Every changed byte of guest RAM lies in the used ring or a WRITE buffer."""
    if before == after:
        return
    d = h.driver
    allowed = [(d.used_off, d.used_off + 6 + 8 * d.num + 2)] if used_ring else []
    for a, n in writable:
        lo = a - h.gpa_base
        allowed.append((max(lo, 0), min(lo + n, MEM)))
    for blk in range(0, len(before), 256):      # whole blocks first: most are unchanged
        if before[blk:blk + 256] == after[blk:blk + 256]:
            continue
        for i in range(blk, min(blk + 256, len(before))):
            if before[i] != after[i]:
                ok = any(lo <= i < hi for lo, hi in allowed)
                expect(ok, f"device wrote guest byte {i:#x} outside the used ring and "
                       "WRITE buffers")


SEEDS = [bytes([n, rx, 0, 0, 3, 0, 0, 0]) + bytes(40) for n in range(3) for rx in (0, 1)]
