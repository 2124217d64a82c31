from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.classifier.augment import Augment, cutmix, mixup, random_crop, random_flip


def _batch(n: int = 16, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    x = torch.rand(n, c, 8, 8, generator=gen)
    return x, F.one_hot(torch.arange(n) % 5, 5).float()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop() -> None:
    x, _ = _batch()
    out = random_crop(x, 2, _gen(0))
    assert out.shape == x.shape
    assert torch.equal(out, random_crop(x, 2, _gen(0)))
    assert not torch.equal(out, random_crop(x, 2, _gen(1)))
    assert torch.equal(random_crop(x, 0, _gen(0)), x)
    # every output is a shifted window of the zero-padded input
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_random_flip() -> None:
    x, _ = _batch()
    out = random_flip(x, _gen(0))
    for i in range(len(x)):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    assert torch.equal(out, random_flip(x, _gen(0)))
    assert torch.equal(random_flip(x, _gen(0), p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, _gen(0), p=0.0), x)


@pytest.mark.parametrize("mix", [mixup, cutmix])
def test_mixing_targets_sum_to_one_and_reproduce(mix) -> None:  # type: ignore[no-untyped-def]
    x, y = _batch()
    xm, ym = mix(x, y, 1.0, _gen(5))
    assert xm.shape == x.shape and ym.shape == y.shape
    assert torch.allclose(ym.sum(-1), torch.ones(len(y)))
    assert bool((ym >= 0).all())
    xm2, ym2 = mix(x, y, 1.0, _gen(5))
    assert torch.equal(xm, xm2) and torch.equal(ym, ym2)
    assert not torch.equal(xm, x)
    assert mix(x, y, 0.0, _gen(5))[0] is x


def test_cutmix_target_matches_pasted_area() -> None:
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).contiguous()
    y = F.one_hot(torch.arange(4), 4).float()
    xm, ym = cutmix(x, y, 1.0, _gen(2))
    own = (xm == x).float().mean(dim=(1, 2, 3))  # share of each image still its own pixels
    assert torch.allclose(ym.diagonal(), own)  # (a sample paired with itself keeps weight 1 either way)
    assert bool((own < 1).any())


def test_mixup_works_on_flat_inputs() -> None:
    x = torch.rand(6, 10)
    y = F.one_hot(torch.arange(6) % 3, 3).float()
    xm, ym = mixup(x, y, 0.4, _gen(0))
    assert xm.shape == x.shape and torch.allclose(ym.sum(-1), torch.ones(6))


def test_augment_callable() -> None:
    x, y = _batch()
    aug = Augment(crop_padding=1, flip=True, mixup_alpha=0.2, cutmix_alpha=1.0)
    assert aug.enabled and aug.mixes
    a = aug(x, y, _gen(9))
    b = aug(x, y, _gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.allclose(a[1].sum(-1), torch.ones(len(y)))
    off = Augment()
    assert not off.enabled and off(x, y, _gen(0)) == (x, y)
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Augment(flip=True)(torch.rand(4, 10), y[:4], _gen(0))
