"""Guest memory regions (vhost.memory over vhost._virtq.MemTable): MAP_SHARED mappings of
memfds at any mmap_offset, translation bounds (one region, no wrap, clamped), region
validation, and mapping counts back to zero."""

import os

import pytest

from vhost.memory import MAX_SLOTS, GuestMemory
from vhost.protocol import Region, VhostMemoryError

MB = 1 << 20


@pytest.fixture
def memfd():
    fd = os.memfd_create("vhost-guest-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * MB)
    os.pwrite(fd, bytes(i & 0xFF for i in range(4 * MB)), 0)
    yield fd
    os.close(fd)


def maps_of(name="vhost-guest-test"):
    return open("/proc/self/maps").read().count(name)


def test_offsets_map_the_right_bytes(memfd):
    m = GuestMemory()
    live = GuestMemory.live
    # an unaligned mmap_offset as well as a page-aligned one
    m.set_table([Region(0x1000, MB, 0x7000_0000, 0),
                 Region(1 << 32, MB, 0x9000_0000, 2 * MB + 123)], [os.dup(memfd), os.dup(memfd)])
    assert m.mapped == 2 and GuestMemory.live == live + 2 and maps_of() == 2
    t = m.table
    assert t.read(0x1000, 4) == bytes([0, 1, 2, 3])
    off = 2 * MB + 123
    assert t.read(1 << 32, 3) == bytes([off & 0xFF, (off + 1) & 0xFF, (off + 2) & 0xFF])
    # writes land in the shared file (MAP_SHARED)
    t.write((1 << 32) + 5, b"\xee\xff")
    assert os.pread(memfd, 2, off + 5) == b"\xee\xff"
    m.reset()
    assert m.mapped == 0 and GuestMemory.live == live and maps_of() == 0


def test_translation_bounds(memfd):
    m = GuestMemory()
    m.set_table([Region(0x10000, MB, 0x7000_0000, 0)], [os.dup(memfd)])
    t = m.table
    end = 0x10000 + MB
    assert t.gpa_ok(0x10000, MB) and t.gpa_ok(end - 1, 1)
    assert not t.gpa_ok(end - 1, 2)  # straddles the end
    assert not t.gpa_ok(end, 1) and not t.gpa_ok(0xFFFF, 1)  # just outside either side
    assert not t.gpa_ok(0x10000, 0)  # empty ranges translate to nothing
    assert not t.gpa_ok(2**64 - 1, 2) and not t.gpa_ok(0x10000, 2**64 - 1)  # wrap
    assert t.uva_ok(0x7000_0000, MB) and not t.uva_ok(0x7000_0000 + MB - 4, 8)
    assert not t.uva_ok(0x10000, 4)  # a gpa is not a uva
    with pytest.raises(ValueError):
        t.read(end - 2, 4)
    m.reset()


def test_regions_do_not_join_for_one_range(memfd):
    # two regions adjacent in guest-physical space are still two: a ring must fit in one
    m = GuestMemory()
    m.set_table([Region(0, MB, 1 << 40, 0), Region(MB, MB, 1 << 41, MB)],
                [os.dup(memfd), os.dup(memfd)])
    assert m.table.gpa_ok(MB - 8, 8) and m.table.gpa_ok(MB, 8)
    assert not m.table.gpa_ok(MB - 8, 16)
    m.reset()


@pytest.mark.parametrize("regions,why", [
    ([Region(0, 0, 0, 0)], "size 0"),
    ([Region(2**64 - MB, 2 * MB, 0, 0)], "wraps"),
    ([Region(0, MB, 2**64 - 4096, 0)], "wraps"),
    ([Region(0, MB, 0, 2**64 - 4096)], "wraps"),
    ([Region(0, 2 * MB, 0, 0), Region(MB, MB, 1 << 40, 0)], "overlaps"),
    ([Region(0, MB, 1 << 40, 0), Region(1 << 32, MB, (1 << 40) + 4096, 0)], "overlaps"),
    ([Region(0, 8 * MB, 0, 0)], "beyond its fd"),
    ([Region(0, MB, 0, 4 * MB)], "beyond its fd"),
])
def test_invalid_tables_are_refused_whole(memfd, regions, why):
    m = GuestMemory()
    m.set_table([Region(0, MB, 1 << 44, 0)], [os.dup(memfd)])
    nfd = len(os.listdir("/proc/self/fd"))
    fds = [os.dup(memfd) for _ in regions]
    with pytest.raises(VhostMemoryError, match=why):
        m.set_table(regions, fds)
    assert len(os.listdir("/proc/self/fd")) == nfd  # the fds were closed anyway
    m.reset()


def test_add_remove_and_slot_limit(memfd):
    m = GuestMemory()
    for i in range(MAX_SLOTS):
        m.add(Region(i * 4096, 4096, (1 << 40) + i * 4096, i * 4096), os.dup(memfd))
    with pytest.raises(VhostMemoryError, match="slots"):
        m.add(Region(1 << 30, 4096, 1 << 41, 0), os.dup(memfd))
    m.remove(Region(0, 4096, 0, 0))  # a slot is free again, but this gpa is taken
    with pytest.raises(VhostMemoryError, match="overlaps"):
        m.add(Region(4096, 4096, 1 << 42, 0), os.dup(memfd))
    with pytest.raises(VhostMemoryError, match="no memory region"):
        m.remove(Region(123, 4096, 0, 0))
    assert m.mapped == MAX_SLOTS - 1 and maps_of() == MAX_SLOTS - 1
    m.reset()
    assert maps_of() == 0
