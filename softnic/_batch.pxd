from libc.stdint cimport uint8_t

from softnic._pkt cimport sn_pkt


cdef class Batch:
    cdef uint8_t *arena
    cdef sn_pkt *pkts
    cdef readonly int size
    cdef readonly int slot_size
    cdef readonly int headroom
    cdef int count
    cpdef clear(self)
