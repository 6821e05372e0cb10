"""M = I + W Wᵀ factored positive definite by construction: both paths against float64 and 50-digit references."""

import mpmath
import pytest
import torch

from ntkgp.gp.identity_plus_gram import ACCURACY, identity_plus_factor, log_determinant, psd_root


def reference(w, rhs, digits=50):
    """(log det(I + WWᵀ), (I + WWᵀ)⁻¹ rhs) in ``digits``-digit arithmetic, from W's float64 entries."""
    with mpmath.workdps(digits):
        a = mpmath.matrix(w.tolist())
        m = mpmath.eye(w.shape[0]) + a * a.T
        solved = mpmath.lu_solve(m, mpmath.matrix(rhs.tolist()))
        return float(mpmath.log(mpmath.det(m))), torch.tensor([float(v) for v in solved], dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e9])
def test_factor_against_a_50_digit_reference(scale):
    """Moderate W takes Cholesky, large W the QR of [I; Wᵀ]; log det to 1e-10 relative and 1e-5 absolute (the QR's
    rounding moves M's unit eigenvalues by about ε‖W‖: 6e-7 nats in all at scale 1e9, where the formed M = I + WWᵀ
    is not even positive definite in float64), solves to 1e-9 (1e-6 at scale 1e9: measured 2.8e-7, where M's
    condition number is 1e18)."""
    generator = torch.Generator().manual_seed(0)
    w = scale * torch.randn(12, 5, generator=generator, dtype=torch.float64)
    rhs = torch.randn(12, generator=generator, dtype=torch.float64)
    gram = w @ w.mT
    norm = float(torch.linalg.matrix_norm(gram, 2))
    factor = identity_plus_factor(gram, lambda: w, norm)
    logdet, solved = reference(w, rhs)
    assert float(log_determinant(factor)) == pytest.approx(logdet, rel=1e-10, abs=1e-5)
    ours = torch.cholesky_solve(rhs.unsqueeze(-1), factor)[:, 0]
    assert (ours - solved).norm() <= (1e-9 if scale < 1e6 else 1e-6) * solved.norm()
    if scale == 1e9:
        assert 12 * torch.finfo(torch.float64).eps * norm > ACCURACY  # the QR path was taken
        assert float(torch.linalg.eigvalsh(gram + torch.eye(12, dtype=torch.float64)).min()) < 0.5


def test_both_paths_agree_with_gradients():
    """At a W where Cholesky is accurate, the QR path (forced by understating nothing: a huge ``norm``) gives the same
    log det and the same gradient in W to 1e-12."""
    generator = torch.Generator().manual_seed(1)
    w0 = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    results = []
    for norm in (1.0, 1e30):
        w = w0.clone().requires_grad_(True)
        value = log_determinant(identity_plus_factor(w @ w.mT, lambda w=w: w, norm))
        (grad,) = torch.autograd.grad(value, w)
        results.append((value.detach(), grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_psd_root_drops_the_rounding_noise_of_a_float32_kernel():
    """A float32 J Jᵀ of rank 3 has eigenvalues of about ±1e-7·λ_max beside its 3 real ones: the root keeps the 3."""
    generator = torch.Generator().manual_seed(2)
    jac = torch.randn(20, 3, generator=generator, dtype=torch.float64) * 100
    kernel = jac.float() @ jac.float().mT
    assert float(torch.linalg.eigvalsh(kernel.double()).min()) < 0  # what the old code factored
    part = psd_root(kernel)
    assert part.root.shape == (20, 3)
    assert float(torch.linalg.eigvalsh(part.matrix).min()) > -1e-12 * part.top
    assert torch.allclose(part.matrix, jac @ jac.mT, rtol=0, atol=1e-5 * part.top)
