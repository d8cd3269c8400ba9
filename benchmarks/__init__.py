"""Benchmarks of duet_p2p against plain aiortc, run with `make bench`."""
