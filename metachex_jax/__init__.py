"""metachex-jax: MetaChexNet (Gozes & Greenspan, EMBC 2019) in JAX / Flax NNX."""

__version__ = "0.1.0"
