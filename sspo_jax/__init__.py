from sspo_jax.version import __version__
