"""Guest memory of one vhost-user device (QEMU docs/interop/vhost-user.rst, "Memory
region description", SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, GET_MAX_MEM_SLOTS).

Regions arrive with an fd each; they are validated as a whole (sizes, wrap-around,
overlap in guest-physical and in frontend-virtual space, slot count) before anything is
mapped, then mapped MAP_SHARED by the compiled MemTable, which also translates addresses
for the data path. The fds are closed once mapped: a mapping keeps the memory alive, and
the frontend owns the memory. `mapped` and `live` let tests prove nothing leaks.

QEMU runs one vhost device per queue pair over the one connection, and each sends the
whole memory table (SET_MEM_TABLE, or ADD_MEM_REG per region). So the same region (same
addresses, offset and backing file) added again is one more reference, not an overlap,
and the table identical to the one mapped is not mapped again; REM_MEM_REG drops one
reference and unmaps with the last.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from vhost._virtq import MemTable
from vhost.protocol import Region, VhostMemoryError

MAX_SLOTS = 32  # our GET_MAX_MEM_SLOTS answer; matches VH_MAX_REGIONS in _virtq.pxd
_LIMIT = 1 << 64


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


class GuestMemory:
    """The memory table of one device. Not thread-safe: the backend's control thread
    calls it while the device's queues are stopped."""

    live = 0  # regions mapped by every GuestMemory of the process (leak checks)

    def __init__(self) -> None:
        self.table = MemTable()
        # (gpa, size, uva, mmap_offset) -> (references, (st_dev, st_ino) of its file)
        self._refs: dict[_Key, tuple[int, _FileId]] = {}

    @property
    def regions(self) -> list[Region]:
        return [Region(*t) for t in self.table.regions()]

    @property
    def mapped(self) -> int:
        return len(self.table)

    def _map(self, regions: list[Region], fds: list[int]) -> None:
        done = 0
        try:
            for r, fd in zip(regions, fds, strict=True):
                # beyond the end of the file a mapping faults with SIGBUS on access: a
                # frontend must not be able to kill the process that way
                try:
                    fsize = os.fstat(fd).st_size
                except OSError as e:
                    raise VhostMemoryError(f"memory region fd: {e}") from None
                if r.mmap_offset + r.size > fsize:
                    raise VhostMemoryError(
                        f"memory region at {r.gpa:#x} ends beyond its fd ({fsize:#x} bytes)")
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

    def set_table(self, regions: list[Region], fds: list[int]) -> None:
        """SET_MEM_TABLE: replaces every region. Takes ownership of fds (closes them)."""
        try:
            self._validate(regions, [])
            files = [_file_id(fd) for fd in fds]
            self.reset()
            self._map(regions, fds)
            self._refs = {_key(r): (1, f) for r, f in zip(regions, files, strict=True)}
        except OSError as e:
            raise VhostMemoryError(f"memory region fd: {e}") from None
        finally:
            _close(fds)

    def add_reference(self, region: Region, fd: int) -> bool:
        """ADD_MEM_REG of a region mapped already, from the same file: counted, and fd
        closed; True. Anything else: False, fd untouched."""
        entry = self._refs.get(_key(region))
        try:
            if entry is None or entry[1] != _file_id(fd):
                return False
        except OSError:
            return False
        self._refs[_key(region)] = (entry[0] + 1, entry[1])
        _close([fd])
        return True

    def references(self, region: Region) -> int:
        """How many times the region with this guest address and size was added."""
        return sum(e[0] for k, e in self._refs.items()
                   if k[0] == region.gpa and k[1] == region.size)

    def add(self, region: Region, fd: int) -> None:
        """ADD_MEM_REG. Takes ownership of fd."""
        try:
            if self.mapped >= MAX_SLOTS:
                raise VhostMemoryError(f"all {MAX_SLOTS} memory slots in use")
            self._validate([region], self.regions)
            try:
                file = _file_id(fd)
            except OSError as e:
                raise VhostMemoryError(f"memory region fd: {e}") from None
            self._map([region], [fd])
            self._refs[_key(region)] = (1, file)
        finally:
            _close([fd])

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


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
