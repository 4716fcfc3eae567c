"""attention/inversion.py with plain tensors: the step algebra, inversion order, anchoring and the
null-text inner loop, against hand-computed cases."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.inversion import (InversionError, Trajectory, anchored_denoised, cfg_step, euler_step,  # noqa: E402
                                 invert, optimize_null_embedding, psnr)

SIGMAS = torch.tensor([4.0, 2.0, 1.0, 0.0])


def test_euler_step_is_ddim_in_sigma_space():
    x, d = torch.tensor([5.0]), torch.tensor([1.0])
    # x = d + sigma * eps with eps = (5 - 1) / 2 = 2; at sigma 1: 1 + 1 * 2 = 3; at sigma 0: the denoised
    assert euler_step(x, d, 2.0, 1.0).item() == 3.0
    assert euler_step(x, d, 2.0, 0.0).item() == 1.0
    assert euler_step(torch.tensor([3.0]), d, 1.0, 2.0).item() == 5.0  # and back up


def test_invert_walks_the_schedule_backwards_evaluating_at_the_target_sigma():
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return 0.5 * x  # eps = (x - x/2) / sigma

    traj = invert(denoise, torch.tensor([[1.0]]), SIGMAS)
    assert calls == [1.0, 2.0, 4.0]  # never sigma 0
    # x_k-1 = x_k + (s_k-1 - s_k) * x_k / (2 s_k-1): 1 -> 1 + 1 * 1/2 = 1.5 -> 1.5 + 1 * 1.5/4 = 1.875
    # -> 1.875 + 2 * 1.875/8 = 2.34375
    assert traj.flatten().tolist() == [2.34375, 1.875, 1.5, 1.0]


def test_invert_is_exact_for_a_model_that_knows_the_image():
    """A denoiser that always answers x0 makes DDIM exact both ways: invert then sample returns x0."""
    x0 = torch.randn(2, 4, 3, 3)
    traj = invert(lambda x, s: x0, x0, SIGMAS)
    x = traj[0]
    for k in range(len(SIGMAS) - 1):
        x = euler_step(x, x0, float(SIGMAS[k]), float(SIGMAS[k + 1]))
    assert torch.equal(traj[-1], x0)
    torch.testing.assert_close(x, x0)


def test_anchored_denoised_lands_on_the_target():
    x, target = torch.randn(3, 4), torch.randn(3, 4)
    for s, s_next in ((4.0, 2.0), (1.0, 0.0)):
        torch.testing.assert_close(euler_step(x, anchored_denoised(x, s, s_next, target), s, s_next), target)


def test_cfg_step_guides_like_comfyui():
    x, c, u = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.0])
    # denoised = u + 3 (c - u) = 3; euler from sigma 2 to 1: 3 + (2 - 3) / 2 = 2.5
    assert cfg_step(x, 2.0, 1.0, c, u, 3.0).item() == 2.5


def test_null_embedding_optimisation_reaches_the_target_and_stops_early():
    w = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    target = torch.tensor([1.0, 3.0])
    calls = []

    def step(e):
        calls.append(1)
        return w @ e

    emb, out, used = optimize_null_embedding(step, torch.zeros(2), target, 500, 0.05, 1e-6)
    torch.testing.assert_close(w @ emb, target, atol=2e-3, rtol=0)
    assert torch.equal(out, w @ emb)  # the output returned is that of the embedding returned
    assert used < 500 and len(calls) == used  # and no evaluation beyond those used
    emb1, _, used_once = optimize_null_embedding(step, torch.zeros(2), target, 1, 0.05, 1e-6)
    assert used_once == 1 and torch.equal(emb1, torch.zeros(2))  # one evaluation: no update


def test_trajectory_index_by_sigma():
    traj = Trajectory(SIGMAS, torch.zeros(4, 1, 1), torch.zeros(1), "m")
    assert traj.at(2.0) == 1 and traj.num_steps == 3
    with pytest.raises(InversionError):
        traj.at(3.0)


def test_psnr():
    a = torch.zeros(4)
    assert psnr(a, a) == float("inf")
    assert psnr(a, torch.full((4,), 0.1)) == pytest.approx(20.0)
