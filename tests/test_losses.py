import math

import pytest
import torch
import torch.nn.functional as F

from ssl_toolkit.losses import NTXentLoss, clip_loss, info_nce, nt_xent


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


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "clip_loss"])
def test_contrastive_losses_compare_in_fp32_under_bf16_autocast(name):
    # Autocast would run their similarity matmuls in bf16 even on fp32 inputs: gradients 0.3-2% off at these
    # settings (cosine 0.9998), logits rounded to steps of 0.004-0.25. Both must match the fp32 loss.
    torch.manual_seed(0)
    z1 = torch.randn(256, 64)
    z2, bank = z1 + 0.3 * torch.randn(256, 64), F.normalize(torch.randn(4096, 64), dim=1)
    loss = {"nt_xent": lambda a, b: nt_xent(a, b, 0.1)["ntxent_loss"],
            "info_nce": lambda a, b: info_nce(a, b, bank, 0.2)["infonce_loss"],
            "clip_loss": lambda a, b: clip_loss(a, b, torch.tensor(50.0))["clip_loss"]}[name]
    results = []
    for autocast in (False, True):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = loss(a, b)
        out.backward()
        assert out.dtype == torch.float32
        results.append((out.detach(), a.grad, b.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    assert torch.allclose(got, ref, rtol=1e-6, atol=0)
    for g, r in zip(got_grads, ref_grads):
        assert ((g - r).norm() / r.norm()).item() < 1e-5


def test_aligned_views_give_lower_loss_than_random():
    z = torch.randn(16, 32)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z), 0.5)["ntxent_loss"] < nt_xent(z, torch.randn(16, 32), 0.5)["ntxent_loss"]


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="one shape"):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8), 0.5)
