"""Benchmarks of starlette-concurrency against its peers; each module with a `main()` is a script."""
