"""Shared pytest fixtures. Helpers that are more than fixtures live in helpers_*.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same global RNG state (torch.manual_seed(0))."""
    torch.manual_seed(0)
    return 0
