"""End-to-end tests run the command line in a subprocess (see tests/subprocesses.py)."""
