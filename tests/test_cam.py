"""Grad-CAM maths: hand computation, batching, hook hygiene, randomisation and pointing game."""

import numpy as np
import pytest
import torch
from torch import nn

from medres.cam import compute_cam, find_layer


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.features(x))).flatten(1))


class Relu(nn.Module):
    def forward(self, x):
        return torch.relu(x)


class TinyNamed(Tiny):
    def __init__(self):
        super().__init__()
        self.act = Relu()

    def forward(self, x):
        return self.fc(self.pool(self.act(self.features(x))).flatten(1))


def test_gradcam_equals_hand_computation():
    torch.manual_seed(0)
    m = TinyNamed().eval()
    x = torch.randn(3, 1, 6, 6)
    targets = torch.tensor([[1], [0], [1]])
    res = compute_cam(m, x, targets, layer="act")
    a = torch.relu(m.features(x)).detach()  # (B, 4, 6, 6)
    for b in range(3):
        c = targets[b, 0]
        alpha = m.fc.weight[c].detach() / 36.0  # d score / d A = w_c / (h w), averaged over pixels
        hand = torch.relu((alpha[:, None, None] * a[b]).sum(0))
        assert torch.allclose(res.maps[b, 0], hand, atol=1e-6)


def test_gradcampp_runs_and_is_finite():
    m = TinyNamed().eval()
    res = compute_cam(m, torch.randn(2, 1, 6, 6), torch.tensor([[0], [1]]), layer="act", method="gradcam++")
    assert torch.isfinite(res.maps).all() and (res.maps >= 0).all()


def test_batched_equals_one_by_one():
    from medres.model import ResNet50

    torch.manual_seed(0)
    m = ResNet50(3).eval()
    for p in m.parameters():  # non-zero residual branches
        p.data.add_(0.01 * torch.randn_like(p))
    x = torch.randn(4, 3, 64, 64)
    t = torch.tensor([[0, 2], [1, -1], [2, 0], [0, -1]])
    batched = compute_cam(m, x, t)
    for i in range(4):
        single = compute_cam(m, x[i : i + 1], t[i : i + 1])
        assert torch.allclose(batched.maps[i], single.maps[0], rtol=1e-4, atol=1e-7)
    assert (batched.maps[1, 1] == 0).all()  # unused slot stays empty


def test_hooks_removed_and_grads_restored_after_exception():
    class Boom(TinyNamed):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    m = Boom()
    m.fc.weight.requires_grad_(True)
    with pytest.raises(RuntimeError):
        compute_cam(m, torch.randn(1, 1, 6, 6), torch.tensor([[0]]), layer="act")
    assert not m.act._forward_hooks
    assert all(p.requires_grad for p in m.parameters())
    assert m.training  # mode restored


def test_wrong_layer_lists_valid_names():
    from medres.model import ResNet50

    with pytest.raises(ValueError, match="layer4"):
        find_layer(ResNet50(2), "layer9")


def test_model_randomisation_changes_maps(pointing_model):
    """Adebayo et al.'s sanity check: re-initialising the top layers (layer4, fc) of a trained model
    must change the heatmaps — low rank correlation between the two sets of maps."""
    import copy

    from scipy.stats import spearmanr

    model, x, _, _ = pointing_model
    t = torch.ones(len(x), 1, dtype=torch.long)
    trained = compute_cam(model, x, t, layer="layer3").maps.flatten(1)
    rand = copy.deepcopy(model)
    torch.manual_seed(1)
    for name in ("layer4", "fc"):
        for mod in getattr(rand, name).modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
    randomised = compute_cam(rand, x, t, layer="layer3").maps.flatten(1)
    rho = [spearmanr(a.numpy(), b.numpy())[0] for a, b in zip(trained, randomised)]
    assert len(rho) >= 10 and np.nanmean(np.abs(rho)) < 0.5, rho


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known gap: ResNet50 trained from scratch on CPU-sized phantom sets does not localise "
                   "(peak-to-lesion distance no better than shuffled masks; docs/benchmarks.md). Strict: a pass means the gap closed.")
def test_pointing_game(pointing_model):
    """On phantoms with known lesion masks, the heatmap peak of a trained model falls on (or within
    half a grid cell of) the lesion for most positive cases."""
    from medres.cam import upsample

    model, x, masks, layer = pointing_model
    res = compute_cam(model, x, torch.ones(len(x), 1, dtype=torch.long), layer=layer)
    size = x.shape[-1]
    heat = upsample(res.maps, size)[:, 0].numpy()
    cell = size // res.maps.shape[-1]
    hits = 0
    for h, m in zip(heat, masks):
        y, xx = np.unravel_index(np.argmax(h), h.shape)
        ys, xs = np.nonzero(m)
        d = np.sqrt((ys - y) ** 2 + (xs - xx) ** 2).min()
        hits += d <= cell / 2
    assert hits / len(x) >= 0.6, hits / len(x)
