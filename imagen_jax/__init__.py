"""imagen-jax."""
