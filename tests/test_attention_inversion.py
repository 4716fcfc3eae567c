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


def gaussian_flow_denoise(x: torch.Tensor, sigma: float, s2: float = 4.0) -> torch.Tensor:
    """The exact x0 prediction of a flow (x = (1 - sigma) x0 + sigma noise) for data N(0, s2):
    E[x0 | x] = (1 - sigma) s2 / ((1 - sigma)^2 s2 + sigma^2) x."""
    return (1 - sigma) * s2 / ((1 - sigma) ** 2 * s2 + sigma**2) * x


def test_midpoint_inversion_is_second_order():
    """On a flow whose ODE is known (Gaussian data), the endpoint error of the midpoint inversion
    falls about 4x per halving of the step, Euler's about 2x; and at equal model evaluations
    (midpoint: half the steps) midpoint's error is the smaller."""
    x0 = torch.tensor([[1.0]])

    def error(solver: str, n: int) -> float:
        sigmas = torch.linspace(1.0, 0.0, n + 1)
        exact = torch.linspace(1.0, 0.0, 4097)  # midpoint at 4096 steps as the reference
        ref = invert(gaussian_flow_denoise, x0, exact, solver="midpoint")[0]
        return float((invert(gaussian_flow_denoise, x0, sigmas, solver=solver)[0] - ref).abs())

    euler = [error("euler", n) for n in (16, 32, 64)]
    mid = [error("midpoint", n) for n in (16, 32, 64)]
    assert all(1.6 < a / b < 2.6 for a, b in zip(euler, euler[1:])), euler
    assert all(a / b > 3.2 for a, b in zip(mid, mid[1:])), mid
    assert error("midpoint", 16) < error("euler", 32) / 2  # measured 2.6x smaller (0.0031 vs 0.0082)


def test_midpoint_inversion_never_evaluates_at_sigma_zero():
    calls = []

    def denoise(x, sigma):
        calls.append(round(sigma, 6))
        return 0.5 * x

    invert(denoise, torch.tensor([[1.0]]), SIGMAS, solver="midpoint")
    # from 0: one Euler evaluation at the target sigma; then sigma and the geometric midpoint (dpm_2's)
    assert calls == [1.0, 1.0, round(2 ** 0.5, 6), 2.0, round(8 ** 0.5, 6)]
    with pytest.raises(InversionError, match="unknown inversion solver"):
        invert(denoise, torch.tensor([[1.0]]), SIGMAS, solver="rk4")
