"""The three files a multi-run command leaves in its workdir: the numbers as JSON, the table as
Markdown and the figure as a PNG (`gaternet sweep`, `gaternet reproduce`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from gaternet_jax.training import workdir as workdir_lib

if TYPE_CHECKING:
  from matplotlib import figure as mpl_figure


class Names(NamedTuple):
  """The three files' names inside the workdir."""

  json: str
  table: str
  figure: str


def write(
  workdir: str, names: Names, summary: dict[str, Any], table: str, figure: mpl_figure.Figure
) -> None:
  """Writes `summary`, `table` and `figure` into `workdir` (the caller is process 0)."""
  workdir_lib.write_json(workdir, names.json, summary)
  workdir_lib.path(workdir, names.table).write_text(table)
  from gaternet_jax.analysis import figures  # noqa: PLC0415 - matplotlib only here

  figures.save_figure(figure, workdir_lib.path(workdir, names.figure))
