"""Developer tools: benchmarks and training diagnostics, outside the library's core.

Each module is a command (`python -m smallssd_jax.tools.<name> --help`); none
is imported by the library itself.
"""
