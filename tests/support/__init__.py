"""Test machinery the tests, the demo and the benchmarks share: a throwaway PostgreSQL
cluster with PgQ and a real pgqd. Not part of the package: nothing here ships in the wheel."""
