"""BEC: a batch engine running line detection over a scanned-book archive."""

__version__ = "0.1.0"
