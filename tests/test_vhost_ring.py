"""Split-ring device side (vhost._virtq) against the driver side (vhost._frontend) on one
memfd, no socket: every hostile-guest check of libvhost-user gives its own counted reason,
and random descriptor tables match an independent Python model of virtio 1.1 §2.6."""

import os
import signal
import struct
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vhost._virtq import FATAL_ERRORS, VQ_ERRORS, FrameBuffers, echo_burst
from vhost.testing import VNET_HDR, RingHarness

NEXT, WRITE, INDIRECT = 1, 2, 4


def post_chain(h, descs):
    """Writes descs [(addr, len, flags, next)] at fresh ids (next given as a position
    in descs, or an absolute index via ('abs', n)); posts the head."""
    ids = [h.driver.take_free() for _ in descs]
    for i, (addr, ln, fl, nx) in enumerate(descs):
        n = ids[nx] if isinstance(nx, int) and nx < len(ids) else (nx[1] if isinstance(nx, tuple) else 0)
        h.driver.write_desc(ids[i], addr, ln, fl, n)
    h.driver.post(ids[0])
    return ids


def scratch(h, data: bytes) -> int:
    """Puts data in free guest RAM, returns its guest address."""
    off = h.free_off
    h.ram.write(off, data)
    h.free_off += (len(data) + 63) & ~63
    return h.gpa_base + off


def good_frame(h, payload=b"hello-virtio") -> bytes:
    frame = VNET_HDR + payload
    post_chain(h, [(scratch(h, frame), len(frame), 0, 0)])
    return frame


def test_tx_chain_and_used_ring():
    with RingHarness() as h:
        a = scratch(h, VNET_HDR[:5])
        b = scratch(h, VNET_HDR[5:] + b"0123456789")
        ids = post_chain(h, [(a, 5, NEXT, 1), (b, 17, 0, 0)])
        assert h.vq.pop() == [VNET_HDR + b"0123456789"]
        assert h.driver.used_idx == 1 and h.driver.used_elem(0) == (ids[0], 0)
        assert h.vq.counters()["frames"] == 1 and h.vq.broken is None


def test_indirect_chain():
    with RingHarness() as h:
        frame = VNET_HDR + bytes(range(100))
        a = scratch(h, frame)
        table = struct.pack("<QIHH", a, 30, NEXT, 1) + struct.pack("<QIHH", a + 30, 82, 0, 0)
        t = scratch(h, table)
        post_chain(h, [(t, len(table), INDIRECT, 0)])
        assert h.vq.pop() == [frame]


def test_legacy_10_byte_header_is_widened_and_narrowed():
    with RingHarness(hdr_len=10) as h:
        hdr10 = bytes(range(1, 11))
        post_chain(h, [(scratch(h, hdr10 + b"payload"), 17, 0, 0)])
        assert h.vq.pop() == [hdr10 + b"\0\0" + b"payload"]


FATAL_CASES = {
    "bad_head": lambda h: h.driver.post(h.driver.num + 3),
    "avail_idx_jump": lambda h: h.driver.set_avail_idx(h.driver.num + 1),
    "bad_next": lambda h: post_chain(h, [(scratch(h, VNET_HDR), 12, NEXT, ("abs", 999))]),
    "chain_loop": lambda h: post_chain(h, [(scratch(h, VNET_HDR), 12, NEXT, 1),
                                           (scratch(h, VNET_HDR), 12, NEXT, 0)]),
    "indirect_len": lambda h: post_chain(h, [(scratch(h, bytes(32)), 24, INDIRECT, 0)]),
    "indirect_len_over_queue_size": lambda h: post_chain(h, [(scratch(h, bytes(16 * 17)),
                                                              16 * 17, INDIRECT, 0)]),
    "indirect_addr": lambda h: post_chain(h, [(h.gpa_base + h.mem_size - 16, 32, INDIRECT, 0)]),
    "indirect_nested": lambda h: post_chain(h, [(scratch(h, struct.pack(
        "<QIHH", h.gpa_base, 16, INDIRECT, 0)), 16, INDIRECT, 0)]),
    "bad_addr": lambda h: post_chain(h, [(1 << 40, 64, 0, 0)]),
}

DROP_CASES = {
    "zero_len": lambda h: post_chain(h, [(scratch(h, VNET_HDR), 0, 0, 0)]),
    "desc_order": lambda h: post_chain(h, [(scratch(h, VNET_HDR), 12, WRITE, 0)]),
    "tx_too_short": lambda h: post_chain(h, [(scratch(h, VNET_HDR), 7, 0, 0)]),
    "tx_too_long": lambda h: post_chain(h, [(h.gpa_base, 5000, 0, 0)]),
}


@pytest.mark.parametrize("reason", sorted(FATAL_CASES))
def test_hostile_ring_breaks_with_its_reason(reason):
    with RingHarness() as h:
        frame = good_frame(h)
        assert h.vq.pop(cap=2048) == [frame]
        FATAL_CASES[reason](h)
        good_frame(h)  # never reached: the ring is broken
        assert h.vq.pop(cap=2048) == []
        reason = reason.split("_over")[0]
        assert h.vq.broken == reason
        c = h.vq.counters()
        assert c[reason] == 1
        assert sum(c[r] for r in FATAL_ERRORS) == 1
        assert h.vq.pop() == []  # a broken ring stays stopped
        assert h.driver.used_idx == 1  # the good frame was handed back, nothing more


def test_indirect_not_negotiated():
    with RingHarness(indirect=False) as h:
        post_chain(h, [(scratch(h, bytes(32)), 32, INDIRECT, 0)])
        assert h.vq.pop() == [] and h.vq.broken == "indirect_not_negotiated"


def test_bad_addr_partly_outside_memory():
    with RingHarness() as h:
        post_chain(h, [(h.gpa_base + h.mem_size - 8, 64, 0, 0)])
        assert h.vq.pop(cap=2048) == [] and h.vq.broken == "bad_addr"


@pytest.mark.parametrize("reason", sorted(DROP_CASES))
def test_hostile_chain_is_dropped_and_ring_goes_on(reason):
    with RingHarness() as h:
        DROP_CASES[reason](h)
        frame = good_frame(h)
        assert h.vq.pop(cap=2048) == [frame]
        assert h.vq.broken is None
        assert h.vq.counters()[reason] == 1
        assert h.driver.used_idx == 2  # both chains went back to the guest


def test_rx_mergeable_num_buffers_and_order_check():
    with RingHarness(num=16, buf_size=256) as h:
        h.driver.refill()
        # first posted RX buffer (id 0) made device-readable: a hostile RX chain
        h.driver.write_desc(0, h.driver.buf_addr(0), 256, 0, 0)
        frame = VNET_HDR + bytes(range(256)) * 3  # 780 bytes -> 4 buffers of 256
        assert h.vq.push([frame], True) == 1
        assert h.vq.counters()["desc_order"] == 1
        assert h.driver.used_elem(0) == (0, 0)
        got = h.driver.recv(16, True)
        # id 0 came back empty (a 0-byte frame for the driver), then the real frame
        assert got[-1][:10] == frame[:10] and got[-1][12:] == frame[12:]
        assert struct.unpack_from("<H", got[-1], 10)[0] == 4


def test_rx_not_mergeable_too_big_and_runt():
    with RingHarness(num=8, buf_size=256) as h:
        h.driver.refill()
        big = VNET_HDR + bytes(300)
        small = VNET_HDR + b"x" * 50
        assert h.vq.push([big, b"abc", small], False) == 3
        c = h.vq.counters()
        assert c["rx_too_big"] == 1 and c["rx_runt"] == 1 and c["frames"] == 1
        got = h.driver.recv(8, False)
        assert got == [small[:10] + b"\x01\x00" + small[12:]]


def test_rx_ring_full_returns_what_fit():
    with RingHarness(num=4, buf_size=128) as h:
        h.driver.refill()
        frames = [VNET_HDR + bytes([i]) * 100 for i in range(6)]
        assert h.vq.push(frames, True) == 4
        assert len(h.driver.recv(8, True)) == 4


def test_echo_burst_event_idx_suppresses_interrupts():
    with RingHarness(num=32, event_idx=True) as tx, RingHarness(num=32, event_idx=True) as rx:
        rx.driver.refill()
        fb = FrameBuffers(32, 2048)
        for _ in range(3):
            good_frame(tx)
        tx.driver.set_used_event(1000)  # guest: "do not interrupt me yet"
        assert echo_burst(tx.vq, rx.vq, fb, True) == (3, 3)
        assert len(rx.driver.recv(32, True)) == 3
        assert tx.vq.counters()["notifies"] == 1  # first notification is unconditional
        good_frame(tx)
        echo_burst(tx.vq, rx.vq, fb, True)
        assert tx.vq.counters()["notifies"] == 1


def test_a_call_eventfd_the_guest_left_full_is_a_counted_failure():
    """vq_notify never waits on the guest's eventfd: a counter at its maximum makes the
    write fail at once (O_NONBLOCK, as vhost.backend leaves every call fd), counted."""
    with RingHarness(num=8, buf_size=128) as h:
        full = os.eventfd(0, os.EFD_NONBLOCK)
        os.write(full, (0xFFFF_FFFF_FFFF_FFFE).to_bytes(8, "little"))
        h.vq.set_call_fd(full)             # the Virtq owns it now
        h.driver.refill()
        assert h.vq.push([VNET_HDR + b"x" * 60]) == 1
        c = h.vq.counters()
        assert c["notifies"] == 1 and c["notify_failed"] == 1 and c["frames"] == 1
        assert len(h.driver.recv(8, True)) == 1       # delivered all the same


# --- guest memory that goes away --------------------------------------------------------

GUARDED = {
    "pop": lambda vq: vq.pop(),
    "push": lambda vq: vq.push([VNET_HDR + b"y" * 60]),
    "avail_count": lambda vq: vq.avail_count(),
    "enable_kicks": lambda vq: vq.enable_kicks(True),
}


@pytest.mark.parametrize("entry", sorted(GUARDED))
def test_each_entry_point_survives_guest_memory_that_vanished(entry):
    """The guest's RAM file shrinks to nothing under a running ring: the next call of any
    data-path entry point faults (SIGBUS) inside the guard, which breaks the ring with
    guest_memory_fault and returns; the ring stays quiet afterwards."""
    from vhost._virtq import guard_installed, guard_recovered

    assert guard_installed()
    with RingHarness(num=8, buf_size=128) as h:
        good_frame(h)
        assert h.vq.avail_count() == 1
        recovered = guard_recovered()
        os.ftruncate(h.memfd, 0)           # the frontend truncates its memory file
        GUARDED[entry](h.vq)
        assert h.vq.broken == "guest_memory_fault"
        assert h.vq.counters()["guest_memory_fault"] == 1
        assert guard_recovered() == recovered + 1
        for call in GUARDED.values():      # a broken ring touches guest memory no more
            call(h.vq)
        assert guard_recovered() == recovered + 1
        os.ftruncate(h.memfd, h.mem_size)  # RingHarness.close unmaps the frontend side


FAULT_ELSEWHERE = """
import faulthandler, mmap, os, sys
import vhost._virtq as vq
if sys.argv[1] == "late":
    faulthandler.enable()          # installed after the guard: the guard goes first again
    t = vq.MemTable()
    fd = os.memfd_create("g", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    t.add(fd, 0, 1 << 20, 1 << 40, 0)
else:
    faulthandler.enable()
assert vq.guard_installed() or sys.argv[1] != "late"
what = sys.argv[2]
if what == "segv":
    import ctypes
    ctypes.string_at(16)                       # a bug of ours: nothing to do with guests
elif what == "bus-in-guarded-copy":
    # a guarded copy whose *source* faults: not guest memory, so not the guard's
    t = vq.MemTable()
    g = os.memfd_create("g", 0)
    os.ftruncate(g, 1 << 20)
    t.add(g, 0, 1 << 20, 1 << 40, 0)
    f = os.memfd_create("ours", 0)
    os.ftruncate(f, 1 << 20)
    m = mmap.mmap(f, 1 << 20)
    os.ftruncate(f, 0)
    t.write(0, memoryview(m)[:4096])
print("survived", flush=True)
"""


@pytest.mark.parametrize("order", ["early", "late"])
@pytest.mark.parametrize("what,sig", [("segv", signal.SIGSEGV),
                                      ("bus-in-guarded-copy", signal.SIGBUS)])
def test_faults_that_are_not_guest_memory_still_kill_with_a_traceback(order, what, sig):
    """The guard takes only faults on guest memory inside a guarded call. Any other
    SIGSEGV/SIGBUS, even one inside a guarded copy, goes to the handler that was there
    (Python's faulthandler prints its traceback) and the process dies of that signal,
    whether faulthandler was enabled before or after the guard."""
    p = subprocess.run([sys.executable, "-c", FAULT_ELSEWHERE, order, what],
                       capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "survived" not in p.stdout
    assert p.returncode == -sig, (p.returncode, p.stderr[-2000:])
    assert "Fatal Python error" in p.stderr, p.stderr[-2000:]


# --- model-based fuzzing --------------------------------------------------------------


def model_pop(h, heads, cap, indirect=True):
    """Independent reading of virtio 1.1 §2.6.5/§2.6.5.3 with libvhost-user's checks, in
    the device's check order: [("frame", bytes) | ("drop", reason)], then the fatal
    reason or None."""
    size = h.mem_size
    ram = h.ram.read(0, size)
    num = h.driver.num

    def tr(addr, n):
        off = addr - h.gpa_base
        if n == 0 or off < 0 or off + n > size:
            return None
        return ram[off:off + n]

    base_table = ram[h.driver.desc_off:h.driver.desc_off + 16 * num]
    out = []
    for head in heads:
        if head >= num:
            return out, "bad_head"
        table, ntab, idx, count, nested, data = base_table, num, head, 0, False, b""
        while True:
            count += 1
            if count > ntab:
                return out, "chain_loop"
            addr, ln, fl, nx = struct.unpack_from("<QIHH", table, 16 * idx)
            if fl & INDIRECT:
                if nested or fl & NEXT:
                    return out, "indirect_nested"
                if not indirect:
                    return out, "indirect_not_negotiated"
                if ln == 0 or ln % 16 or ln // 16 > num:
                    return out, "indirect_len"
                t = tr(addr, ln)
                if t is None:
                    return out, "indirect_addr"
                table, ntab, idx, count, nested = t, ln // 16, 0, 1, True
                addr, ln, fl, nx = struct.unpack_from("<QIHH", table, 0)
                if fl & INDIRECT:
                    return out, "indirect_nested"
            verdict = None
            if ln == 0:
                verdict = "zero_len"
            elif fl & WRITE:
                verdict = "desc_order"
            elif len(data) + ln > cap:
                verdict = "tx_too_long"
            if verdict:
                out.append(("drop", verdict))
                break
            chunk = tr(addr, ln)
            if chunk is None:
                return out, "bad_addr"
            data += chunk
            if not fl & NEXT:
                if len(data) < 12:
                    out.append(("drop", "tx_too_short"))
                else:
                    out.append(("frame", data))
                break
            if nx >= ntab:
                return out, "bad_next"
            idx = nx
    return out, None


desc_st = st.tuples(
    st.sampled_from(["buf", "end", "out", "table"]),
    st.one_of(st.integers(0, 40), st.sampled_from([16, 32, 48, 256, 5000])),
    st.sampled_from([0, 0, 0, NEXT, NEXT, NEXT, WRITE, INDIRECT, NEXT | WRITE, 7]),
    st.integers(0, 9),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(desc_st, min_size=8, max_size=8),
       table=st.lists(desc_st, min_size=1, max_size=4),
       heads=st.lists(st.integers(0, 8), min_size=1, max_size=4),
       indirect=st.booleans())
def test_random_descriptors_match_model(descs, table, heads, indirect):
    cap = 512
    with RingHarness(num=8, buf_size=64, indirect=indirect, mem_size=64 << 10) as h:
        h.ram.write(h.free_off, bytes(range(256)) * 8)
        data_gpa = h.gpa_base + h.free_off
        table_off = h.free_off + 4096
        addrs = {"buf": data_gpa, "end": h.gpa_base + h.mem_size - 20, "out": 1 << 33,
                 "table": h.gpa_base + table_off}

        def enc(d):
            kind, ln, fl, nx = d
            return struct.pack("<QIHH", addrs[kind], ln, fl, nx)

        h.ram.write(table_off, b"".join(enc(d) for d in table))
        for i, d in enumerate(descs):
            kind, ln, fl, nx = d
            h.driver.write_desc(i, addrs[kind], ln, fl, nx)
        for hd in heads:
            h.driver.post(hd, kick=False)
        expect, fatal = model_pop(h, heads, cap, indirect)
        event(f"fatal={fatal}")
        event(f"frames={sum(k == 'frame' for k, _ in expect)}")
        got = h.vq.pop(max_chains=8, cap=cap)
        assert got == [d for k, d in expect if k == "frame"]
        assert h.vq.broken == fatal
        c = h.vq.counters()
        for r in VQ_ERRORS[1:]:
            want = sum(1 for k, d in expect if k == "drop" and d == r) + (r == fatal)
            assert c[r] == want, r


rx_desc_st = st.tuples(
    st.sampled_from(["buf", "buf", "end", "out", "table"]),
    st.one_of(st.integers(0, 100), st.sampled_from([16, 32, 64, 5000])),
    st.sampled_from([WRITE, WRITE, WRITE | NEXT, WRITE | NEXT, NEXT, 0, INDIRECT, 7]),
    st.integers(0, 9),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(rx_desc_st, min_size=8, max_size=8),
       table=st.lists(rx_desc_st, min_size=1, max_size=4),
       heads=st.lists(st.integers(0, 8), min_size=1, max_size=6),
       sizes=st.lists(st.integers(0, 400), min_size=1, max_size=4),
       mergeable=st.booleans())
def test_rx_writes_only_into_writable_buffers(descs, table, heads, sizes, mergeable):
    """Whatever the guest posts, RX writes land only in buffers it marked writable (or
    the used ring), and the used ring only names chains the guest posted."""
    with RingHarness(num=8, buf_size=64, mem_size=64 << 10) as h:
        size = h.mem_size
        h.ram.write(h.free_off, bytes(range(256)) * 32)
        data_gpa = h.gpa_base + h.free_off
        table_off = h.free_off + 8192
        addrs = {"buf": data_gpa, "end": h.gpa_base + size - 20, "out": 1 << 33,
                 "table": h.gpa_base + table_off}
        h.ram.write(table_off, b"".join(
            struct.pack("<QIHH", addrs[k], ln, fl, nx) for k, ln, fl, nx in table))
        for i, (kind, ln, fl, nx) in enumerate(descs):
            h.driver.write_desc(i, addrs[kind], ln, fl, nx)
        for hd in heads:
            h.driver.post(hd, kick=False)
        before = h.ram.read(0, size)
        frames = [VNET_HDR + bytes([0xA5]) * n for n in sizes]
        done = h.vq.push(frames, mergeable)
        after = h.ram.read(0, size)
        allowed = bytearray(size)
        used = h.driver.used_off
        allowed[used:used + 6 + 8 * 8] = b"\x01" * (6 + 8 * 8)
        for kind, ln, fl, _ in list(descs) + list(table):
            off = addrs[kind] - h.gpa_base
            if fl & WRITE and 0 <= off < size:
                allowed[off:min(size, off + ln)] = b"\x01" * (min(size, off + ln) - off)
        bad = [i for i in range(size) if before[i] != after[i] and not allowed[i]]
        assert not bad, f"RX wrote outside writable buffers at {bad[:4]}"
        assert 0 <= done <= len(frames)
        event(f"delivered={h.vq.counters()['frames'] > 0}")
        n_used = h.driver.used_idx
        assert n_used <= len(heads)
        for slot in range(n_used):
            head, ln = h.driver.used_elem(slot)
            assert head == heads[slot] and head < 8
