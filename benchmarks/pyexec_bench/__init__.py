"""The pieces of `benchmarks/run.py` (`make bench`): statistics, the server under test,
baselines, scenarios and the report. See docs/benchmarks.md."""
