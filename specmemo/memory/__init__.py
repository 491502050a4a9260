"""The allocator (KV stores, buffers), memory measurement, and the one transformers adapter."""
