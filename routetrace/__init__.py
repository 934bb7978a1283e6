"""routetrace: see which device the kernel's routing code picks for each local connection."""

__version__ = "0.1.0"
