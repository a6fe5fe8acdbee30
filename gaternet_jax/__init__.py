"""gaternet_jax: GaterNet (Chen et al., CVPR 2019) dynamic filter selection in JAX/Flax.

Importing the package imports nothing heavy. The library's entry points:

  gaternet_jax.load_run(workdir)                         a trained run, for a notebook
  gaternet_jax.training.procedure.train_and_evaluate(config, workdir)   train what a config describes
  gaternet_jax.models.create_model(config, ...)          the Flax module a config describes

See README.md for the `gaternet` command.
"""

__version__ = '0.1.0'
__all__ = ['load_run']


def __getattr__(name: str):
  # Lazy, so that `import gaternet_jax` starts no JAX (the CLI sets XLA flags first).
  if name == 'load_run':
    from gaternet_jax.training.restore import load_run  # noqa: PLC0415

    return load_run
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
