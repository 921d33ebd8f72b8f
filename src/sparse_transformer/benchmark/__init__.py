"""Benchmarks that need the library's internals (attention kernels against dense and FlexAttention)."""
