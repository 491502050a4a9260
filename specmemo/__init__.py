"""specmemo: speculative decoding that fits in the memory you have."""

__version__ = "0.1.0"
