"""The strategy the trainer gets for each `trainer.strategy` (DDP and FSDP themselves run in the
2-process tests of tests/engine/test_fsdp.py and tests/test_faults.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vfm.engine.strategy import STRATEGIES, SingleProcess, build_strategy


@pytest.mark.parametrize("name", STRATEGIES)
def test_one_process_gets_the_single_process_strategy_whatever_the_name(name):
    strategy = build_strategy(name, torch.device("cpu"))
    assert type(strategy) is SingleProcess and strategy.is_main and (strategy.rank, strategy.world) == (0, 1)


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="trainer.strategy must be one of"):
        build_strategy("zero3", torch.device("cpu"))


def test_single_process_trains_the_method_itself_and_its_collectives_are_local():
    strategy = SingleProcess(torch.device("cpu"))
    method = nn.Linear(2, 2)
    assert strategy.wrap(method) is method and strategy.model is method
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    model_state, optim_state = strategy.full_state(optimizer, step=0)
    assert model_state.keys() == method.state_dict().keys() and optim_state == optimizer.state_dict()
    with strategy.evaluation_method(step=0) as evaluated:
        assert evaluated is method
    assert strategy.all_reduce_max_flag(True) and not strategy.all_reduce_max_flag(False)
    assert strategy.all_reduce_max_int(10) == 10
    strategy.barrier()
    strategy.wait_for_main()
