"""softnic: a userspace software NIC with inline TSO, IPsec ESP and VXLAN."""

__version__ = "0.1.0"
