"""Baton benchmark harness: contenders as subprocesses, an open-loop load generator, a report.

Entry point: ``python -m bench.run`` (see ``bench/run.py``).
"""
