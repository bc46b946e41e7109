# cython: language_level=3
"""softnic's data plane: batches of packets through TSO, ESP and VXLAN.

Pipeline order (DESIGN.md): TX host-terminated = policy -> TSO/csum -> ESP -> VXLAN;
TX device-terminated = TSO/csum -> VXLAN -> ESP; RX is the reverse. Every entry point
works on a batch and returns counts; drops are counted by reason (softnic/_pkt.pxd).
"""

from softnic._batch import DROP_REASONS, Batch

__all__ = ["Batch", "DROP_REASONS"]
