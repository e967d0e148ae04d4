"""Tiny checkpoints in the real formats, written once per test session (per xdist worker).

Stable names for every test under tests/diffusion (and tests elsewhere that import them via pytest_plugins):
  tiny_sd1_checkpoint, tiny_sd2_checkpoint   single `.safetensors` files, fp32, seed 0
  tiny_sd1_folder, tiny_sd2_folder           diffusers folders with the same weights (seed 0)
  tiny_vae_file                              standalone VAE, unprefixed LDM names, seed 0
Treat them as read-only; a test that damages a file copies it into its own tmp_path first.
"""
import pytest

from diffusion.tiny_models import write_tiny_checkpoint, write_tiny_diffusers_folder, write_tiny_vae


@pytest.fixture(scope="session")
def tiny_sd1_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sd1") / "tiny_sd1.safetensors", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("sd2") / "tiny_sd2.safetensors", "sd2")


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory):
    return write_tiny_diffusers_folder(tmp_path_factory.mktemp("sd1_diffusers") / "tiny-sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory):
    return write_tiny_diffusers_folder(tmp_path_factory.mktemp("sd2_diffusers") / "tiny-sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_vae_file(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny_vae.safetensors", "ldm")
