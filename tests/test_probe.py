"""The linear probe's fit (tuning.lib.probe): chosen on val NLL among raw and standardised
features, a standardised fit folded back into weights for the raw features the network gives."""
from __future__ import annotations

import torch

from tuning.lib.probe import fit_head, fit_probe, folded, standardizer


def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart only by feature 0, at a scale of 1e-3; 20 noise features at scale 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 21, generator=g)
    x[:, 0] = (y * 2.0 - 1.0 + 0.3 * torch.randn(n, generator=g)) * 1e-3
    return x, y


def test_a_standardised_fit_folds_into_raw_weights_exactly():
    x, y = features(80, 0)
    mean, spread = standardizer(x)
    head = fit_head((x - mean) / spread, y, 2, 1e-2)
    weight, bias = folded(head, mean, spread)
    with torch.no_grad():
        assert torch.allclose(x @ weight.T + bias, head((x - mean) / spread), atol=1e-5)


def test_a_feature_too_small_for_the_raw_fit_is_found_by_the_standardised_one():
    """Raw, the one informative feature needs a weight ~1e3 that any L2 in the grid forbids;
    standardised, it is an ordinary feature. Val NLL chooses the standardised fit, and its folded
    head classifies the raw val features."""
    (tx, ty), (vx, vy) = features(120, 1), features(60, 2)
    probe = fit_probe(tx, ty, vx, vy, 2)
    assert probe.standardized
    assert probe.val_acc >= 0.95 and probe.val_loss < 0.3
    with torch.no_grad():
        assert ((vx @ probe.weight.T + probe.bias).argmax(1) == vy).float().mean() == probe.val_acc


def test_the_raw_fit_is_kept_where_standardising_only_amplifies_noise():
    """Informative features at scale 1, noise features at 1e-4: standardised, the noise is as loud
    as the signal and 40 training images overfit it; raw, it is ignored."""
    g = torch.Generator().manual_seed(3)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        signal = (y * 2.0 - 1.0)[:, None] + 0.8 * torch.randn(n, 2, generator=g)
        return torch.cat([signal, 1e-4 * torch.randn(n, 200, generator=g)], 1), y

    (tx, ty), (vx, vy) = make(40), make(200)
    assert not fit_probe(tx, ty, vx, vy, 2).standardized
