"""gaternet_jax: GaterNet (Chen et al., CVPR 2019) dynamic filter selection in JAX/Flax.

Importing the package imports nothing heavy; see README.md for the `gaternet` command and
`gaternet_jax.models.create_model`, `gaternet_jax.train.train_and_evaluate` for the library.
"""

__version__ = '0.1.0'
