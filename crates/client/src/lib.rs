//! A client of burrow's public HTTP API, used by the CLI and the benchmark.
