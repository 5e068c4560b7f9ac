"""Benchmarks (``make bench``), compared with BuildGrid in the same run. See README.md here."""
