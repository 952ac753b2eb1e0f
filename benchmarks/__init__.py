"""Benchmarks of bigload against the tools users would pick instead; see README.md."""
