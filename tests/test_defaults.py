"""One source of defaults: every config dataclass's field default is so8t_jax/defaults.py's value."""
import dataclasses

import pytest

from so8t_jax import defaults, so8t, stability
from so8t_jax.completions import PolicyConfig
from so8t_jax.objective import LossConfig
from so8t_jax.optim import OptimConfig


@pytest.mark.parametrize("cls,block", [(OptimConfig, "optim"), (LossConfig, "loss"), (PolicyConfig, "policy"),
                                       (stability.StabilityConfig, "stability"), (so8t.GateConfig, "so8t")])
def test_dataclass_defaults_agree_with_defaults_py(cls, block):
    config = defaults.get_config()[block].to_dict()
    instance = cls()
    fields = {f.name for f in dataclasses.fields(cls)}
    shared = fields & set(config)
    assert shared, block
    for key in shared:
        want = config[key]
        got = getattr(instance, key)
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == \
            (tuple(want) if isinstance(want, (list, tuple)) else want), f"{block}.{key}: {got!r} vs {want!r}"
    # every key of the block reaches its dataclass (run configs are built with cls(**block))
    assert set(config) <= fields, f"{block}: keys without a field: {set(config) - fields}"
    assert OptimConfig().total_steps == defaults.get_config().train.steps


def test_defaults_cannot_be_changed_at_run_time():
    with pytest.raises((AttributeError, TypeError, ValueError)):
        defaults.DEFAULTS.optim.learning_rate = 1.0
