"""Guest memory of one vhost-user device (QEMU docs/interop/vhost-user.rst, "Memory
region description", SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, GET_MAX_MEM_SLOTS).

Regions arrive with an fd each; they are validated as a whole (sizes, wrap-around,
overlap in guest-physical and in frontend-virtual space, slot count, the device's cap
on mapped bytes, what kind of file backs each) before anything is mapped, then mapped
MAP_SHARED by the compiled MemTable, which also translates addresses for the data
path. The fds are only borrowed: a mapping keeps the memory alive, and the caller (the
message that carried them) closes them. `mapped` and `live` let tests prove nothing
leaks.

What may back guest memory. A shared mapping of a file faults (SIGBUS) wherever the file
no longer reaches, so the file must not be able to shrink under us, and its pages must
not be a disk's:
- a memfd (QEMU's memory-backend-memfd) must carry F_SEAL_SHRINK, which QEMU sets unless
  told seal=off: then nobody, the frontend included, can truncate it;
- other files must be on tmpfs or hugetlbfs (memory-backend-file with share=on and a
  mem-path on /dev/shm or a hugetlbfs mount, memfds with MFD_HUGETLB): those cannot be
  sealed, and a frontend that truncates one is caught by the data path's guard
  (vhost._virtq), which breaks that device's rings and nothing else;
- anything else (a file on a disk, a device, a pipe, a socket) is refused.

QEMU runs one vhost device per queue pair over the one connection, and each sends the
whole memory table (SET_MEM_TABLE, or ADD_MEM_REG per region). So the same region (same
addresses, offset and backing file) added again is one more reference, not an overlap,
and the table identical to the one mapped is not mapped again; REM_MEM_REG drops one
reference and unmaps with the last.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterable

from vhost._virtq import MemTable, fs_magic
from vhost.protocol import Region, VhostMemoryError

MAX_SLOTS = 32  # our GET_MAX_MEM_SLOTS answer; matches VH_MAX_REGIONS in _virtq.pxd
# Bytes one device maps at most unless told otherwise: a few times a large guest. The cap
# bounds the address space a frontend can make us reserve (regions may be up to 2^48
# bytes, 32 slots); it is not memory we use, the frontend's pages are its own.
DEFAULT_MAX_MEMORY = 64 << 30
_LIMIT = 1 << 64
TMPFS_MAGIC = 0x01021994      # linux/magic.h; memfds live on an internal tmpfs mount
HUGETLBFS_MAGIC = 0x958458F6
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


def _check_region(r: Region) -> None:
    if r.size == 0:
        raise VhostMemoryError("memory region of size 0")
    for name, base in (("guest address", r.gpa), ("user address", r.uva),
                       ("mmap offset", r.mmap_offset)):
        if base < 0 or base + r.size > _LIMIT:
            raise VhostMemoryError(f"memory region {name} range wraps")


def _overlaps(a: Region, b: Region) -> bool:
    return (a.gpa < b.gpa + b.size and b.gpa < a.gpa + a.size) or (
        a.uva < b.uva + b.size and b.uva < a.uva + a.size)


def check_backing(fd: int) -> None:
    """Raises VhostMemoryError (saying why) unless fd is memory that may back a region:
    a memfd sealed against shrinking, or a regular file on tmpfs or hugetlbfs."""
    try:
        st = os.fstat(fd)
        kind = fs_magic(fd)
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise VhostMemoryError(f"memory region fd: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VhostMemoryError("memory region fd is not a regular file (guest RAM comes "
                               "from a memfd, tmpfs or hugetlbfs)")
    if kind not in (TMPFS_MAGIC, HUGETLBFS_MAGIC):
        raise VhostMemoryError(
            f"memory region fd is a file on a file system of type {kind:#x}, not tmpfs or "
            "hugetlbfs: its pages could be written back to a disk or vanish")
    if name.startswith("/memfd:"):
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError as e:
            raise VhostMemoryError(f"memory region memfd: F_GET_SEALS: {e}") from None
        if not seals & F_SEAL_SHRINK:
            raise VhostMemoryError(
                "memory region memfd is not sealed with F_SEAL_SHRINK: it could be "
                "truncated under the device (QEMU's memory-backend-memfd seals it unless "
                "seal=off)")


class GuestMemory:
    """The memory table of one device. Not thread-safe: the backend's control thread
    calls it while the device's queues are stopped. max_bytes caps the bytes mapped at
    once (None: no cap)."""

    live = 0  # regions mapped by every GuestMemory of the process (leak checks)

    def __init__(self, max_bytes: int | None = DEFAULT_MAX_MEMORY) -> None:
        self.table = MemTable()
        self.max_bytes = max_bytes
        # (gpa, size, uva, mmap_offset) -> (references, (st_dev, st_ino) of its file)
        self._refs: dict[_Key, tuple[int, _FileId]] = {}

    @property
    def regions(self) -> list[Region]:
        return [Region(*t) for t in self.table.regions()]

    @property
    def mapped(self) -> int:
        return len(self.table)

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def _check_cap(self, total: int) -> None:
        if self.max_bytes is not None and total > self.max_bytes:
            raise VhostMemoryError(
                f"memory regions of {total:#x} bytes exceed this device's cap of "
                f"{self.max_bytes:#x}")

    @staticmethod
    def _check_file(r: Region, fd: int) -> None:
        check_backing(fd)
        # beyond the end of the file a mapping faults with SIGBUS on access
        try:
            fsize = os.fstat(fd).st_size
        except OSError as e:
            raise VhostMemoryError(f"memory region fd: {e}") from None
        if r.mmap_offset + r.size > fsize:
            raise VhostMemoryError(
                f"memory region at {r.gpa:#x} ends beyond its fd ({fsize:#x} bytes)")

    def _map(self, regions: list[Region], fds: list[int]) -> None:
        """Maps regions already checked (check_table / check_add)."""
        done = 0
        try:
            for r, fd in zip(regions, fds, strict=True):
                try:
                    self.table.add(fd, r.gpa, r.size, r.uva, r.mmap_offset)
                except (OSError, ValueError, OverflowError) as e:
                    raise VhostMemoryError(f"cannot map region at {r.gpa:#x}: {e}") from None
                done += 1
        finally:
            GuestMemory.live += done

    def same_table(self, regions: list[Region], fds: list[int]) -> bool:
        """True if SET_MEM_TABLE would map exactly what is mapped (then it need not be
        mapped again, nor the rings stopped)."""
        try:
            files = [_file_id(fd) for fd in fds]
        except OSError:
            return False
        if len(regions) != len(fds) or len(regions) != len(self._refs):
            return False
        return all(_key(r) in self._refs and self._refs[_key(r)][1] == f
                   for r, f in zip(regions, files, strict=True))

    def check_table(self, regions: list[Region], fds: list[int]) -> None:
        """Everything set_table checks before it unmaps anything: a table refused here
        leaves the one mapped (and the running rings) as they are."""
        if len(regions) != len(fds):
            raise VhostMemoryError(f"{len(regions)} memory regions with {len(fds)} fds")
        self._validate(regions, [])
        self._check_cap(sum(r.size for r in regions))
        for r, fd in zip(regions, fds, strict=True):
            self._check_file(r, fd)

    def set_table(self, regions: list[Region], fds: list[int]) -> None:
        """SET_MEM_TABLE: replaces every region. Borrows fds (the caller closes them)."""
        try:
            self.check_table(regions, fds)
            files = [_file_id(fd) for fd in fds]
            self.reset()
            self._map(regions, fds)
            self._refs = {_key(r): (1, f) for r, f in zip(regions, files, strict=True)}
        except OSError as e:
            raise VhostMemoryError(f"memory region fd: {e}") from None

    def add_reference(self, region: Region, fd: int) -> bool:
        """ADD_MEM_REG of a region mapped already, from the same file: counted; True.
        Anything else: False. Borrows fd."""
        entry = self._refs.get(_key(region))
        try:
            if entry is None or entry[1] != _file_id(fd):
                return False
        except OSError:
            return False
        self._refs[_key(region)] = (entry[0] + 1, entry[1])
        return True

    def references(self, region: Region) -> int:
        """How many times the region with this guest address and size was added."""
        return sum(e[0] for k, e in self._refs.items()
                   if k[0] == region.gpa and k[1] == region.size)

    def check_add(self, region: Region, fd: int) -> None:
        """What add checks before anything changes."""
        if self.mapped >= MAX_SLOTS:
            raise VhostMemoryError(f"all {MAX_SLOTS} memory slots in use")
        self._validate([region], self.regions)
        self._check_cap(self.mapped_bytes + region.size)
        self._check_file(region, fd)

    def add(self, region: Region, fd: int) -> None:
        """ADD_MEM_REG. Borrows fd."""
        self.check_add(region, fd)
        try:
            file = _file_id(fd)
        except OSError as e:
            raise VhostMemoryError(f"memory region fd: {e}") from None
        self._map([region], [fd])
        self._refs[_key(region)] = (1, file)

    def drop_reference(self, region: Region) -> bool:
        """REM_MEM_REG of a region added more than once: one reference less; True.
        False when the next removal unmaps it."""
        for k, (n, file) in self._refs.items():
            if k[0] == region.gpa and k[1] == region.size and n > 1:
                self._refs[k] = (n - 1, file)
                return True
        return False

    def remove(self, region: Region) -> None:
        """REM_MEM_REG: the region with this guest address and size."""
        if not self.table.remove(region.gpa, region.size):
            raise VhostMemoryError(f"no memory region at {region.gpa:#x} of {region.size:#x}")
        for k in [k for k in self._refs if k[0] == region.gpa and k[1] == region.size]:
            del self._refs[k]
        GuestMemory.live -= 1

    def reset(self) -> None:
        """Unmaps everything (RESET_OWNER, disconnect)."""
        GuestMemory.live -= self.mapped
        self.table.clear()
        self._refs.clear()

    @staticmethod
    def _validate(new: list[Region], existing: Iterable[Region]) -> None:
        old = list(existing)
        for i, r in enumerate(new):
            _check_region(r)
            for o in old + new[:i]:
                if _overlaps(r, o):
                    raise VhostMemoryError(f"memory region at {r.gpa:#x} overlaps another")


_Key = tuple[int, int, int, int]
_FileId = tuple[int, int]


def _key(r: Region) -> _Key:
    return (r.gpa, r.size, r.uva, r.mmap_offset)


def _file_id(fd: int) -> _FileId:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)
