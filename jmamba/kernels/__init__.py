"""Pallas GPU kernels for jmamba (each with a plain-JAX twin it is tested against)."""
