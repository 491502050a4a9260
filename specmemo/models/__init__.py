"""Resolve a model argument to its architecture and weight source; load it (torch, lazily)."""
