"""Guest memory regions (vhost.memory over vhost._virtq.MemTable): MAP_SHARED mappings of
memfds at any mmap_offset, translation bounds (one region, no wrap, clamped), region
validation, what may back guest memory, the cap on mapped bytes, and mapping counts back
to zero."""

import os
import socket
import tempfile

import pytest

from vhost._virtq import MemTable, fs_magic
from vhost.memory import MAX_SLOTS, TMPFS_MAGIC, GuestMemory
from vhost.protocol import Region, VhostMemoryError
from vhost.testing import guest_ram_fd

MB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def memfd():
    fd = guest_ram_fd(4 * MB)      # sealed like QEMU's memory-backend-memfd
    os.pwrite(fd, bytes(i & 0xFF for i in range(4 * MB)), 0)
    yield fd
    os.close(fd)


def maps_of(name="vhost-guest"):
    return open("/proc/self/maps").read().count(name)


def nfds():
    return len(os.listdir("/proc/self/fd"))


def test_offsets_map_the_right_bytes(memfd):
    m = GuestMemory()
    live = GuestMemory.live
    # an unaligned mmap_offset as well as a page-aligned one
    m.set_table([Region(0x1000, MB, 0x7000_0000, 0),
                 Region(1 << 32, MB, 0x9000_0000, 2 * MB + 123)], [memfd, memfd])
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
    m.set_table([Region(0x10000, MB, 0x7000_0000, 0)], [memfd])
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
                [memfd, memfd])
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
    m.set_table([Region(0, MB, 1 << 44, 0)], [memfd])
    before = m.regions
    with pytest.raises(VhostMemoryError, match=why):
        m.set_table(regions, [memfd] * len(regions))
    assert m.regions == before and m.mapped == 1    # refused whole: the old table stays
    m.reset()


def test_add_remove_and_slot_limit(memfd):
    m = GuestMemory()
    for i in range(MAX_SLOTS):
        m.add(Region(i * 4096, 4096, (1 << 40) + i * 4096, i * 4096), memfd)
    with pytest.raises(VhostMemoryError, match="slots"):
        m.add(Region(1 << 30, 4096, 1 << 41, 0), memfd)
    m.remove(Region(0, 4096, 0, 0))  # a slot is free again, but this gpa is taken
    with pytest.raises(VhostMemoryError, match="overlaps"):
        m.add(Region(4096, 4096, 1 << 42, 0), memfd)
    with pytest.raises(VhostMemoryError, match="no memory region"):
        m.remove(Region(123, 4096, 0, 0))
    assert m.mapped == MAX_SLOTS - 1 and maps_of() == MAX_SLOTS - 1
    m.reset()
    assert maps_of() == 0


# ---- what may back guest memory ------------------------------------------------------------

def _disk_file():
    """An unlinked regular file on a disk file system (the checkout's, not tmpfs)."""
    f = tempfile.TemporaryFile(dir=HERE)
    if fs_magic(f.fileno()) == TMPFS_MAGIC:
        f.close()
        pytest.skip("the checkout is on tmpfs: no disk file system to test with")
    f.truncate(4 * MB)
    return f


# A tmpfs mount on purpose (memory-backend-file's mem-path); files there are O_TMPFILE,
# nameless, so nobody else can open them.
SHM = "/dev/shm"  # noqa: S108


def _shm_dir():
    try:
        fd = os.open(SHM, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        pytest.skip(f"no {SHM}")
    try:
        if fs_magic(fd) != TMPFS_MAGIC:
            pytest.skip(f"{SHM} is not a tmpfs")
    finally:
        os.close(fd)
    return SHM


def test_sealed_memfd_and_tmpfs_files_are_accepted():
    """What QEMU 7.2 hands over: memory-backend-memfd (sealed by default) and
    memory-backend-file,share=on with a mem-path on tmpfs (not sealable)."""
    for fd in (guest_ram_fd(4 * MB), guest_ram_fd(4 * MB, ram_path=_shm_dir())):
        m = GuestMemory()
        try:
            m.set_table([Region(0, 4 * MB, 1 << 40, 0)], [fd])
            assert m.mapped == 1
        finally:
            m.reset()
            os.close(fd)


def test_memory_that_can_vanish_is_refused_with_the_reason():
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    ev = os.eventfd(0)
    zero = os.open("/dev/zero", os.O_RDWR)
    unsealed = guest_ram_fd(4 * MB, seal=False)
    disk = _disk_file()
    cases = [(unsealed, "F_SEAL_SHRINK"), (disk.fileno(), "not tmpfs or hugetlbfs"),
             (r, "not a regular file"), (s1.fileno(), "not a regular file"),
             (ev, "not a regular file"), (zero, "not a regular file")]
    base = nfds()
    try:
        for fd, why in cases:
            m = GuestMemory()
            with pytest.raises(VhostMemoryError, match=why):
                m.set_table([Region(0, MB, 1 << 40, 0)], [fd])
            with pytest.raises(VhostMemoryError, match=why):
                m.add(Region(0, MB, 1 << 40, 0), fd)
            assert m.mapped == 0 and maps_of("/dev/zero") == 0
        assert nfds() == base          # the checks borrow fds: nothing opened, nothing lost
    finally:
        for fd in (r, w, ev, zero, unsealed):
            os.close(fd)
        s1.close()
        s2.close()
        disk.close()


def test_a_sealed_memfd_cannot_be_shrunk_by_anyone():
    fd = guest_ram_fd(4 * MB)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, MB)
    finally:
        os.close(fd)


def test_mapped_bytes_are_capped():
    fd = guest_ram_fd(8 * MB)
    m = GuestMemory(max_bytes=4 * MB)
    try:
        with pytest.raises(VhostMemoryError, match="cap"):
            m.set_table([Region(0, 8 * MB, 1 << 40, 0)], [fd])
        with pytest.raises(VhostMemoryError, match="cap"):   # the sum counts, not each
            m.set_table([Region(0, 3 * MB, 1 << 40, 0),
                         Region(1 << 32, 3 * MB, 1 << 41, 3 * MB)], [fd, fd])
        m.set_table([Region(0, 2 * MB, 1 << 40, 0)], [fd])
        m.add(Region(1 << 32, 2 * MB, 1 << 41, 2 * MB), fd)
        with pytest.raises(VhostMemoryError, match="cap"):
            m.add(Region(1 << 33, MB, 1 << 42, 4 * MB), fd)
        assert m.mapped == 2 and m.mapped_bytes == 4 * MB
        # the table refused whole: what was mapped stays mapped
        with pytest.raises(VhostMemoryError, match="cap"):
            m.set_table([Region(0, 8 * MB, 1 << 40, 0)], [fd])
        assert m.mapped_bytes == 4 * MB
    finally:
        m.reset()
        os.close(fd)


def test_truncated_tmpfs_file_faults_are_caught_not_fatal():
    """The residual case: a tmpfs file the frontend truncates after it was mapped. The
    next access faults (SIGBUS); the guard turns it into an error for this table."""
    fd = guest_ram_fd(4 * MB, ram_path=_shm_dir())
    t = MemTable()
    try:
        t.add(fd, 0x1000, 4 * MB, 1 << 40, 0)
        t.write(0x1000 + 3 * MB, b"guest")
        assert t.read(0x1000 + 3 * MB, 5) == b"guest"
        os.ftruncate(fd, MB)
        with pytest.raises(OSError, match="gone"):
            t.read(0x1000 + 3 * MB, 5)
        with pytest.raises(OSError, match="gone"):
            t.write(0x1000 + 2 * MB, b"x")
        assert t.read(0x1000, 4) == bytes(4)       # what is still there still reads
    finally:
        t.clear()
        os.close(fd)
