"""Registers the search's Optuna ask/tell sweeper with Hydra.

Hydra instantiates sweepers only from classes defined in modules of the `hydra_plugins` namespace package, so the
class lives in `search.sweeper` and is declared here (search/hydra_plugins/, installed as the namespace
`hydra_plugins` by pyproject.toml) under the name the config's `_target_` uses
(conf/hydra/sweeper/optuna_asktell.yaml). This directory has no `__init__.py`: it is a namespace package that
merges with any installed Hydra plugins.
"""
from search.sweeper import OptunaAskTellSweeper as _OptunaAskTellSweeper


class OptunaAskTellSweeper(_OptunaAskTellSweeper):
    """`search.sweeper.OptunaAskTellSweeper`, registered as a Hydra plugin."""
