"""wgmp: a userspace WireGuard daemon whose data plane is sharded over processes."""

__version__ = "0.1.0"
__all__ = ["__version__"]
