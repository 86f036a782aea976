"""exchange: the secure gateway for Polri-PDRM intelligence exchange on trafficking in persons."""

__version__ = "0.1.0"
