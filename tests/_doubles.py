"""Test doubles shared by several test files (not conftest.py: test_cli_fast.py writes this file's
source into a fake installed plugin run in fresh processes, so it stays standalone: it imports only
the standard library and metabench, neither torch nor pytest nor other test modules)."""
from dataclasses import dataclass

from metabench import Learner


class ZeroLogits(Learner):
    """Trains nothing, then predicts zero logits for two classes (the wrong shape on more ways)."""

    reference = "test double"

    @dataclass
    class Config:
        steps: int = 1

    budgets = {"smoke": {}, "quick": {}, "paper": {}}

    def meta_train(self, ctx):
        pass

    def predict(self, support_x, support_y, query_x):
        return query_x.new_zeros(len(query_x), 2)
