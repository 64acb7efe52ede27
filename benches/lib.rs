//! Benchmarks only: see `benches/` (criterion) and `e2e/` (scripts against the kernel and peers).
#![forbid(unsafe_code)]
