"""Fixtures for the sampling tests; the oracles themselves live in gaussian_oracle.py."""
import pytest
from gaussian_oracle import GaussianData

from diffusion.sampling.model_sampling import DiscreteModelSampling


@pytest.fixture(scope="session")
def sd_sampling() -> DiscreteModelSampling:
    return DiscreteModelSampling()


@pytest.fixture
def gaussian() -> GaussianData:
    return GaussianData()
