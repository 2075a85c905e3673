"""Decoding a built model fast: sampling on the device, the one-token step in its forms (eager,
graphed, compiled, compiled ahead of time), the decode loop every reply runs on."""
