"""The Brownian tree and the noise conventions (model-formats.md 8.4-8.5)."""
import math

import pytest
import torch

from diffusion.sampling.brownian import BrownianTree, BrownianTreeNoiseSampler
from diffusion.sampling.noise import GaussianNoiseSampler, initial_noise

N = 65536
FOUR_SE_VARIANCE = 4 * math.sqrt(2 / N)  # 4 standard errors of a unit sample variance


def test_tree_starts_at_zero_and_has_variance_equal_to_elapsed_time():
    tree = BrownianTree(0.03, 14.6, (N,), seed=1)
    assert torch.equal(tree(0.03), torch.zeros(N, dtype=torch.float64))
    for t in (0.5, 3.7, 14.6):
        variance = tree(t).var().item() / (t - 0.03)
        assert abs(variance - 1) < FOUR_SE_VARIANCE


def test_disjoint_increments_are_uncorrelated_with_variance_equal_to_their_length():
    tree = BrownianTree(0.0, 1.0, (N,), seed=2)
    first = tree(0.3) - tree(0.1)
    second = tree(0.8) - tree(0.3)
    assert abs(first.var().item() / 0.2 - 1) < FOUR_SE_VARIANCE
    assert abs(second.var().item() / 0.5 - 1) < FOUR_SE_VARIANCE
    correlation = torch.corrcoef(torch.stack([first, second]))[0, 1].item()
    assert abs(correlation) < 4 / math.sqrt(N)


def test_values_do_not_depend_on_query_order():
    times = [0.77, 0.1, 0.55, 0.3, 0.99]
    forward = BrownianTree(0.0, 1.0, (16,), seed=3)
    backward = BrownianTree(0.0, 1.0, (16,), seed=3, cache_size=2)
    values = {t: forward(t) for t in times}
    for t in reversed(times):
        assert torch.equal(backward(t), values[t])


def test_noise_of_a_coarse_step_is_the_sum_of_its_fine_steps():
    like = torch.zeros(1024)
    sampler = BrownianTreeNoiseSampler(like, 0.1, 10.0, seed=4)
    coarse = sampler(8.0, 2.0) * math.sqrt(6.0)
    fine = sampler(8.0, 5.0) * math.sqrt(3.0) + sampler(5.0, 2.0) * math.sqrt(3.0)
    torch.testing.assert_close(coarse, fine, rtol=0, atol=1e-5)


def test_different_seeds_give_different_paths():
    assert not torch.equal(BrownianTree(0.0, 1.0, (8,), seed=5)(0.5), BrownianTree(0.0, 1.0, (8,), seed=6)(0.5))


def test_initial_noise_is_one_cpu_draw_from_the_seeded_generator():
    torch.manual_seed(1234)
    expected = torch.randn(2, 4, 8, 8)
    assert torch.equal(initial_noise((2, 4, 8, 8), 1234), expected)


def test_first_batch_item_noise_does_not_depend_on_batch_size():
    assert torch.equal(initial_noise((1, 4, 8, 8), 99)[0], initial_noise((4, 4, 8, 8), 99)[0])


def test_batch_index_picks_the_noise_an_item_had_in_its_original_batch():
    items = [initial_noise((1, 4, 8, 8), 7)]
    generator = torch.Generator().manual_seed(7)
    draws = [torch.randn(1, 4, 8, 8, generator=generator) for _ in range(4)]
    assert torch.equal(items[0], draws[0])
    picked = initial_noise((2, 4, 8, 8), 7, batch_index=[3, 1])
    assert torch.equal(picked, torch.cat([draws[3], draws[1]]))


def test_ancestral_first_step_noise_on_cpu_equals_the_initial_noise():
    # On the CPU ComfyUI's per-step generator and the initial noise share the seed and shape (8.5).
    like = torch.zeros(1, 4, 8, 8)
    assert torch.equal(GaussianNoiseSampler(like, 42)(14.6, 10.0), initial_noise(like.shape, 42))


def test_step_noise_takes_the_latent_dtype():
    like = torch.zeros(1, 3, dtype=torch.float64)
    noise = GaussianNoiseSampler(like, 1)(1.0, 0.5)
    assert noise.dtype == torch.float64
    assert torch.equal(noise, initial_noise((1, 3), 1).double())


def test_each_batch_position_has_its_own_step_noise_stream():
    batch = GaussianNoiseSampler(torch.zeros(3, 4, 4), 9)
    alone = GaussianNoiseSampler(torch.zeros(1, 4, 4), 9, batch_index=[2])
    first_batch, first_alone = batch(1.0, 0.5), alone(1.0, 0.5)
    assert torch.equal(first_batch[2:], first_alone)
    assert torch.equal(batch(0.5, 0.2)[2:], alone(0.5, 0.2))
    assert not torch.equal(first_batch[0], first_batch[1])


def test_full_seed_range_is_accepted_and_negative_seeds_are_not():
    assert initial_noise((3,), 2**64 - 1).shape == (3,)
    with pytest.raises(ValueError, match="seed must be in 0 .. 2\\*\\*64 - 1, got -1"):
        initial_noise((3,), -1)


def test_tree_noise_of_a_batch_item_does_not_depend_on_the_batch_size():
    small = BrownianTreeNoiseSampler(torch.zeros(1, 4, 8, 8), 0.1, 10.0, seed=8)
    large = BrownianTreeNoiseSampler(torch.zeros(3, 4, 8, 8), 0.1, 10.0, seed=8)
    assert torch.equal(small(9.0, 4.0)[0], large(9.0, 4.0)[0])
