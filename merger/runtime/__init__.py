"""Where builds run and who holds them: devices, the cache of built models, ZeroGPU."""
