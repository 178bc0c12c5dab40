"""Benchmarks, run from the repository root as a package: ``make bench`` runs ``python -m bench.run_all``;
each benchmark also runs on its own (``python -m bench.<name> --help``)."""
