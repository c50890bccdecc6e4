"""lra-bench: a Long-Range-Arena harness for efficient Transformers in JAX/Flax."""
