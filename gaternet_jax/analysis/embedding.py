"""The PCA + t-SNE embedding of gate vectors coloured by label (the paper's Figure 5).

scikit-learn is imported inside `embed_gates` only, because its manifold module is slow to import.
"""

from __future__ import annotations

import logging

import numpy as np

from gaternet_jax import errors
from gaternet_jax.analysis import stats

_LOG = logging.getLogger(__name__)

# The paper reduces the 7,200-d gate vectors to 400 dimensions with PCA before t-SNE.
PCA_DIMS = 400
MAX_PERPLEXITY = 30.0


def embedding_subset(n: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
  """Indices (sorted) of the examples `embed_gates` embeds: all, or a seeded random subset."""
  if max_examples is not None and max_examples < 1:
    raise errors.UserError(f'max_examples must be at least 1 or None, got {max_examples}')
  if max_examples is None or max_examples >= n:
    return np.arange(n)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n, size=max_examples, replace=False))


def embedding_skip_reason(gates: np.ndarray) -> str | None:
  """Why t-SNE cannot embed these gate vectors, or None if it can."""
  gates = np.asarray(gates)
  if gates.shape[0] < 3:
    return f'fewer than 3 examples ({gates.shape[0]}); t-SNE needs at least 3'
  if not np.any(gates != gates[0]):
    return 'all gate vectors are identical (zero variance); there is nothing to embed'
  return None


def embedding_params(m: int, c: int) -> dict[str, float | int]:
  """PCA dimensions and t-SNE perplexity used for m examples with c gates.

  The paper uses PCA to 400 dimensions; with few examples or gates that is capped at what PCA can
  return (at most m - 1 informative components). t-SNE requires perplexity < m; the usual 30 is
  kept when possible and shrunk to (m - 1) / 3 (but not below 1) so that tiny inputs still work.
  """
  return {
    'pca_dims': int(max(1, min(PCA_DIMS, c, m - 1))),
    'perplexity': float(max(1.0, min(MAX_PERPLEXITY, (m - 1) / 3.0))),
  }


def embed_gates(
  gates: np.ndarray, seed: int = 0, max_examples: int | None = None
) -> np.ndarray | None:
  """Embeds gate vectors in 2-D with PCA then t-SNE, as for the paper's Figure 5.

  Deterministic for a given seed (it seeds the subset, PCA and t-SNE).

  Args:
    gates: (n, c) binary gates.
    seed: random seed.
    max_examples: embed at most this many examples, a random subset chosen by
      ``embedding_subset(n, max_examples, seed)`` (use it to find which rows, e.g. for labels).
      t-SNE's cost grows faster than linearly in the number of points, so analyses cap it.

  Returns:
    (m, 2) float64 coordinates of the embedded examples in the order of
    ``embedding_subset(...)``, or None when the input is degenerate (fewer than 3 examples or all
    gate vectors identical); `embedding_skip_reason` says why, and it is logged.
  """
  # Imported here because scikit-learn's manifold module is slow to import and most callers of
  # this module (e.g. census only) never need it.
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

  gates = stats._as_bool_gates(gates)
  subset = gates[embedding_subset(gates.shape[0], max_examples, seed)]
  reason = embedding_skip_reason(subset)
  if reason is not None:
    _LOG.warning('Skipping the gate embedding: %s', reason)
    return None
  m, c = subset.shape
  params = embedding_params(m, c)
  # float32 halves the memory of the dense copy; precision is irrelevant for a 2-D picture.
  x = subset.astype(np.float32)
  x = PCA(n_components=params['pca_dims'], random_state=seed).fit_transform(x)
  # t-SNE's PCA initialisation needs at least two input dimensions.
  init = 'pca' if x.shape[1] >= 2 else 'random'
  tsne = TSNE(
    n_components=2,
    perplexity=params['perplexity'],
    init=init,
    learning_rate='auto',
    random_state=seed,
  )
  return tsne.fit_transform(x).astype(np.float64)
