"""softnic: a userspace software NIC with inline TSO, IPsec ESP and VXLAN."""

__version__ = "0.1.0"

from .client import Client  # noqa: E402  (the admin-socket client; pure Python)

__all__ = ["Client", "__version__"]
