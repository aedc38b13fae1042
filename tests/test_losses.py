import math

import pytest
import torch
import torch.nn.functional as F

from ssl_toolkit.losses import NTXentLoss, nt_xent


def nt_xent_by_the_paper(z1, z2, t):
    """Eq. 1 of SimCLR written as a loop over the 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sims = torch.stack([z[i] @ z[k] / t for k in range(n2) if k != i])
        pos = z[i] @ z[j] / t
        total = total - (pos - torch.logsumexp(sims, 0))
    return total / n2


def test_identical_pairs_orthogonal_negatives_analytic():
    b, t = 5, 0.5
    z = torch.eye(b, 8)
    out = nt_xent(z, z.clone(), t)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * b - 2)))
    assert out["ntxent_loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["pos_sim"].item() == pytest.approx(1.0)
    assert out["neg_sim"].item() == pytest.approx(0.0, abs=1e-7)


def test_matches_paper_formula_on_random_inputs():
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    for t in (0.1, 0.5, 1.0):
        assert nt_xent(z1, z2, t)["ntxent_loss"].item() == pytest.approx(nt_xent_by_the_paper(z1, z2, t).item(), rel=1e-5)


def test_loss_is_symmetric_in_views_and_invariant_to_scale():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    a = nt_xent(z1, z2, 0.5)["ntxent_loss"]
    assert torch.allclose(a, nt_xent(z2, z1, 0.5)["ntxent_loss"])
    assert torch.allclose(a, nt_xent(3 * z1, 0.2 * z2, 0.5)["ntxent_loss"], atol=1e-6)


def test_gradcheck():
    z1 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.3)["ntxent_loss"], (z1, z2))


def test_aligned_views_give_lower_loss_than_random():
    z = torch.randn(16, 32)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z), 0.5)["ntxent_loss"] < nt_xent(z, torch.randn(16, 32), 0.5)["ntxent_loss"]


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8), 0.5)
