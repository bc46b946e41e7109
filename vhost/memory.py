"""Guest memory of one vhost-user device (QEMU docs/interop/vhost-user.rst, "Memory
region description", SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, GET_MAX_MEM_SLOTS).

Regions arrive with an fd each; they are validated as a whole (sizes, wrap-around,
overlap in guest-physical and in frontend-virtual space, slot count) before anything is
mapped, then mapped MAP_SHARED by the compiled MemTable, which also translates addresses
for the data path. The fds are closed once mapped: a mapping keeps the memory alive, and
the frontend owns the memory. `mapped` and `live` let tests prove nothing leaks.
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

    def set_table(self, regions: list[Region], fds: list[int]) -> None:
        """SET_MEM_TABLE: replaces every region. Takes ownership of fds (closes them)."""
        try:
            self._validate(regions, [])
            self.reset()
            self._map(regions, fds)
        finally:
            _close(fds)

    def add(self, region: Region, fd: int) -> None:
        """ADD_MEM_REG. Takes ownership of fd."""
        try:
            if self.mapped >= MAX_SLOTS:
                raise VhostMemoryError(f"all {MAX_SLOTS} memory slots in use")
            self._validate([region], self.regions)
            self._map([region], [fd])
        finally:
            _close([fd])

    def remove(self, region: Region) -> None:
        """REM_MEM_REG: the region with this guest address and size."""
        if not self.table.remove(region.gpa, region.size):
            raise VhostMemoryError(f"no memory region at {region.gpa:#x} of {region.size:#x}")
        GuestMemory.live -= 1

    def reset(self) -> None:
        """Unmaps everything (RESET_OWNER, disconnect)."""
        GuestMemory.live -= self.mapped
        self.table.clear()

    @staticmethod
    def _validate(new: list[Region], existing: Iterable[Region]) -> None:
        old = list(existing)
        for i, r in enumerate(new):
            _check_region(r)
            for o in old + new[:i]:
                if _overlaps(r, o):
                    raise VhostMemoryError(f"memory region at {r.gpa:#x} overlaps another")


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
