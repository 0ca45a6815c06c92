"""dstackctl: dstack services with probes on one machine's Docker engine."""

__version__ = "0.1.0"
