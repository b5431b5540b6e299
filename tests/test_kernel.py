"""I-AMFS math against float64 references (docs/algorithm.md)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from amfs_dist.algorithms import kernel


def _problem(n=6, d=5, ways=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    y = (torch.arange(n) % ways)
    Y = (y[:, None] == torch.arange(ways)).to(dtype)
    return z, Y


def _reference_alpha(K, Y, lam, mu):
    n = K.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    M = eye + 4 * mu * K
    return torch.linalg.solve(M @ K + lam * eye, M @ Y)


def test_rbf_kernel_matches_definition():
    z, _ = _problem()
    log_bw = torch.tensor(math.log(0.7), dtype=torch.float64)
    K = kernel.rbf_kernel(z, z, log_bw)
    ref = torch.exp(-torch.cdist(z, z) ** 2 / (2 * 0.7 ** 2))
    torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-12)
    assert torch.all(K <= 1.0) and torch.allclose(K.diagonal(), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("mu", [0.0, 0.05, 1.0])
def test_float32_solve_matches_float64_reference(mu):
    z, Y = _problem(n=10, d=8, ways=5)
    K64 = kernel.rbf_kernel(z, z, torch.tensor(0.0, dtype=torch.float64))
    ref = _reference_alpha(K64, Y, 0.1, mu)
    alpha32 = kernel.solve_coefficients(K64.float(), Y.float(), 0.1, mu)
    torch.testing.assert_close(alpha32.double(), ref, rtol=2e-3, atol=2e-4)


def test_batched_solve_equals_per_task_solves():
    zs = torch.stack([_problem(seed=s)[0] for s in range(4)])
    Y = _problem()[1]
    K = kernel.rbf_kernel(zs, zs, torch.tensor(0.0, dtype=torch.float64))
    batched = kernel.solve_coefficients(K, Y.expand(4, -1, -1), 0.2, 0.3)
    for t in range(4):
        torch.testing.assert_close(batched[t], _reference_alpha(K[t], Y, 0.2, 0.3))


def test_mu_zero_is_kernel_ridge_regression():
    z, Y = _problem()
    K = kernel.rbf_kernel(z, z, torch.tensor(0.0, dtype=torch.float64))
    krr = torch.linalg.solve(K + 0.3 * torch.eye(6, dtype=torch.float64), Y)
    torch.testing.assert_close(kernel.solve_coefficients(K, Y, 0.3, 0.0), krr)


def test_solution_minimises_the_inner_objective():
    z, Y = _problem(n=8, d=4)
    K = kernel.rbf_kernel(z, z, torch.tensor(math.log(0.5), dtype=torch.float64))
    lam, mu = 0.1, 0.5
    alpha = kernel.solve_coefficients(K, Y, lam, mu)
    J = lambda a: kernel.inner_objective(a, K, Y, lam, mu)
    # central finite differences of J at alpha vanish in every coordinate
    eps = 1e-5
    for i in range(alpha.shape[0]):
        for j in range(alpha.shape[1]):
            e = torch.zeros_like(alpha)
            e[i, j] = eps
            assert abs(float(J(alpha + e) - J(alpha - e)) / (2 * eps)) < 1e-6
    # and it is a minimum: any perturbation raises J
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        d = torch.randn(alpha.shape, generator=g, dtype=torch.float64) * 1e-2
        assert J(alpha + d) > J(alpha)


def test_gradcheck_through_the_solve():
    z, Y = _problem(n=5, d=3)
    z = z.clone().requires_grad_(True)
    log_bw = torch.tensor(math.log(0.8), dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64)

    def f(z, log_bw, lam):
        K = kernel.rbf_kernel(z, z, log_bw)
        return (w * kernel.solve_coefficients(K, Y, lam, 0.3)).sum()

    assert gradcheck(f, (z, log_bw, lam), eps=1e-6, atol=1e-6)


def test_information_term_is_half_logdet():
    z, _ = _problem(n=7)
    K = kernel.rbf_kernel(z, z, torch.tensor(0.0, dtype=torch.float64))
    lam = 0.25
    ref = 0.5 * torch.logdet(torch.eye(7, dtype=torch.float64) + K / lam)
    torch.testing.assert_close(kernel.information_term(K, lam), ref)
    lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda l: kernel.information_term(K, l), (lam_t,))
