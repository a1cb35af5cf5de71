"""JAX/Flax vision research library: one package per network plus shared infrastructure."""
