"""GPU kernels for MoC, each beside a pure-jnp reference in `reference.py`.

This package imports only jax: `moc_jax` builds on it, never the other way round.
"""
