"""The memory-footprint model: plain integer arithmetic, no torch, so `specmemo plan` answers instantly."""
