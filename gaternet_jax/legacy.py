"""Configs saved by older versions: read with today's names, computing what they computed.

A run's config.json is its record. When a field is added, renamed or gets a new default, a run
saved before must still evaluate, analyse, export and resume exactly as it trained, so
`workdir.load_config` reads every stored config through `read_stored`, and code that may see an
old config asks `field` for a value it could lack.
"""

from __future__ import annotations

from typing import Any

from gaternet_jax import configs

# Fields added after runs were saved without them, with the value those runs used: a stored
# config.json that lacks one is read with this value, so a run saved by an older version keeps
# computing what it computed, and a resume of it keeps that value.
LEGACY_VALUES = {
  'model.strided_padding': 'same',
  'gating.batch_shaping_reduction': 'mean',
  'gating.module_weight_decay': True,
}
# Fields that fix how a run trains from its start (its recipe's version): a resume keeps the
# stored run's value (checkpoints.keep_stored_recipe), so a run saved before a default changed
# (or before the field existed) goes on as it began instead of being refused as another config.
RECIPE_FIELDS = (*LEGACY_VALUES, 'gating.module_init_bias')
# Old dotted name -> new (2026-12-05: lambda beside the other gate-loss weights). A stored config
# is read with the new name; an override or sweep naming the old one is told the new one.
RENAMED_FIELDS = {'gater.l1_weight': 'gating.l1_weight'}
# Fields runs before 2026-12-05 stored that are now derived (`variant`: configs.variant_of, from
# model.gated and gating): dropped when a stored config is read. They never changed what a run
# computed (model.gated did).
DROPPED_FIELDS = ('variant',)


def field(config, name: str) -> Any:
  """The dotted field `name` of `config` (a ConfigDict), or the value runs saved before it
  existed used (LEGACY_VALUES). `gating.*` reads `configs.gating_of(config)`."""
  section, leaf = name.split('.')
  node = configs.gating_of(config) if section == 'gating' else config[section]
  return node.get(leaf, LEGACY_VALUES[name])


def renamed_hint(name: str) -> str:
  """' (renamed NEW)' when `name` (dotted, without 'config.') is an old field name, else ''."""
  new = RENAMED_FIELDS.get(name)
  return f' (renamed {new})' if new else ''


def read_stored(config: dict[str, Any]) -> dict[str, Any]:
  """A stored config (nested dicts, as in config.json) as this version names and fills it: every
  RENAMED_FIELDS field moved to its new name, every DROPPED_FIELDS one removed, every
  LEGACY_VALUES field it lacks filled in."""
  for name in DROPPED_FIELDS:
    config.pop(name, None)
  for old, new in RENAMED_FIELDS.items():
    (old_parent, old_leaf), (new_parent, new_leaf) = old.split('.'), new.split('.')
    section = config.get(old_parent)
    if isinstance(section, dict) and old_leaf in section:
      value = section.pop(old_leaf)
      if not isinstance(config.get(new_parent), dict):
        # Saved before `gating` existed: what `configs.gating_of` has always read such a run as.
        config[new_parent] = configs.gating_config('gated').to_dict()
      config[new_parent][new_leaf] = value
  for name, value in LEGACY_VALUES.items():
    *parents, leaf = name.split('.')
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf not in node:
      node[leaf] = value
  return config
