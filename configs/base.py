"""Every key and its default: see so8t_jax/defaults.py (kept in the package so that config validation works
wherever so8t_jax is installed). Run a recipe, not this file:

    python scripts/train.py --config configs/gkd.py [--config.key=value ...]
"""
from so8t_jax.defaults import get_config

__all__ = ["get_config"]
