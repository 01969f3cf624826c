"""graphc's version (core: artifacts record the version that wrote them)."""
__version__ = "0.1.0"
