"""Benchmarks: ``make bench`` runs ``bench/run_all.py``; each script also runs on its own (``--help``)."""
