import torch

from ttaserve.adapters.moments import (
    Segments,
    mix_moments,
    pooled_moments,
    sample_moments,
    segment_moments,
)


def test_segment_moments_equal_direct_statistics_of_each_segment():
    torch.manual_seed(0)
    x = torch.randn(7, 4, 5, 5) * 3 + 1
    segments = Segments.from_sizes([3, 1, 3])
    mean, var = sample_moments(x)
    seg_mean, seg_var = segment_moments(mean, var, segments)
    for r, (lo, hi) in enumerate([(0, 3), (3, 4), (4, 7)]):
        chunk = x[lo:hi].transpose(0, 1).reshape(4, -1)
        torch.testing.assert_close(seg_mean[r], chunk.mean(1))
        torch.testing.assert_close(seg_var[r], chunk.var(1, unbiased=False))


def test_pooled_moments_of_single_image_are_its_instance_statistics():
    x = torch.randn(1, 3, 8, 8)
    mean, var = sample_moments(x)
    pm, pv = pooled_moments(mean, var)
    torch.testing.assert_close(pm, mean[0])
    torch.testing.assert_close(pv, var[0])


def test_mix_with_weight_zero_is_bit_exact_and_mixture_matches_pooled_data():
    a, b = torch.randn(100, 3) + 2, torch.randn(50, 3) * 2 - 1
    ma, va = a.mean(0), a.var(0, unbiased=False)
    mb, vb = b.mean(0), b.var(0, unbiased=False)
    m0, v0 = mix_moments(ma, va, mb, vb, 0.0)
    assert torch.equal(m0, ma) and torch.equal(v0, va)
    both = torch.cat([a, b])
    m, v = mix_moments(ma, va, mb, vb, 50 / 150)
    torch.testing.assert_close(m, both.mean(0))
    torch.testing.assert_close(v, both.var(0, unbiased=False))


def test_fast_paths_equal_the_general_arithmetic_bit_for_bit():
    torch.manual_seed(1)
    mean, var = torch.randn(4, 6), torch.rand(4, 6)
    ones = Segments.from_sizes([1, 1, 1, 1])
    shuffled = Segments(index=torch.tensor([1, 0, 2, 3]), sizes=torch.ones(4))
    assert ones.singletons and not shuffled.singletons
    assert not Segments.from_sizes([2, 1, 1]).singletons
    general = Segments(index=ones.index, sizes=ones.sizes.clone())
    object.__setattr__(general, "singletons", False)  # force the general path
    for got, want in zip(segment_moments(mean, var, ones), segment_moments(mean, var, general), strict=True):  # fmt: skip
        assert torch.equal(got, want)
    pm, pv = pooled_moments(mean[:1], var[:1])
    assert torch.equal(pm, mean[:1].mean(0)) and torch.equal(pv, (var[:1] + 0.0).mean(0))
    a_mean, a_var = torch.randn(1, 6), torch.rand(1, 6)
    for w in (0.0, 1.0):
        m, v = mix_moments(a_mean, a_var, mean, var, w)
        assert m.shape == v.shape == (4, 6)
        assert torch.equal(m, (1 - w) * a_mean + w * mean)
        assert torch.equal(v, (1 - w) * a_var + w * var + w * (1 - w) * (a_mean - mean).square())


def test_sample_moments_match_torch_var_mean():
    x = torch.randn(3, 5, 7, 9) * 4 + 2
    mean, var = sample_moments(x)
    want_var, want_mean = torch.var_mean(x, dim=(2, 3), correction=0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, want_var, rtol=1e-5, atol=1e-6)


def test_sample_moments_of_a_large_batch_equal_those_of_each_sample_alone():
    x = torch.randn(40, 16, 32, 32) * 3 + 1  # more elements than one chunk of deviations
    mean, var = sample_moments(x)
    for i in (0, 17, 39):
        alone_mean, alone_var = sample_moments(x[i : i + 1])
        assert torch.equal(mean[i], alone_mean[0]) and torch.equal(var[i], alone_var[0])
    torch.testing.assert_close(var, x.flatten(2).var(2, correction=0))


def test_sample_moments_in_chunks_and_with_gradients_give_the_same_values(monkeypatch):
    import ttaserve.adapters.moments as moments

    torch.manual_seed(3)
    x = torch.randn(9, 4, 6, 6) * 2 + 1
    whole = sample_moments(x)
    monkeypatch.setattr(moments, "_CHUNK_ELEMENTS", 4 * 36 * 2)  # two samples at a time
    chunked = sample_moments(x)
    leaf = x.clone().requires_grad_(True)
    graded = sample_moments(leaf)
    for a, b, c in zip(whole, chunked, graded, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c.detach())
    graded[1].sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    direct = x.flatten(2).var(2, unbiased=False)
    torch.testing.assert_close(whole[1], direct)
