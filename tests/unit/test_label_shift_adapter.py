"""Unit tests of the label shift adapter: its math, its file, its training and its policy."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import make_random_package
from ttaserve.adapters.label_shift_adapter import (
    LabelShiftAdapter,
    LabelShiftCorrection,
    adapter_from_tensors,
    adapter_to_tensors,
)
from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchView, SourceModel
from ttaserve.adapters.prior_correction import PRIOR_KEY, PriorCorrection
from ttaserve.adapters.registry import build_policy
from ttaserve.label_adapter_training import (
    ClassSampler,
    LabelAdapterConfig,
    SourceLogits,
    sample_tasks,
    task_loss,
    train_label_adapter,
)
from ttaserve.server.model_package import LABEL_ADAPTER_FILE, load_package
from ttaserve.server.model_runner import ModelRunner

K = 4


def _perturbed(adapter: LabelShiftAdapter, seed: int = 0) -> LabelShiftAdapter:
    """The adapter with a random (non-identity) last layer."""
    torch.manual_seed(seed)
    with torch.no_grad():
        adapter.net[2].weight.normal_(0, 0.5)
        adapter.net[2].bias.normal_(0, 0.5)
    return adapter


def _view(logits: torch.Tensor, sizes: list[int], priors: torch.Tensor, source: SourceModel) -> BatchView:  # fmt: skip
    return BatchView(logits, None, {PRIOR_KEY: priors}, Segments.from_sizes(sizes), source)


def _synthetic_logits(n: int, scale: float, seed: int = 0) -> SourceLogits:
    """Balanced 1-D Gaussian classes; `scale` < 1 makes the posteriors underconfident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K
    centres = torch.arange(K, dtype=torch.float32) * 1.5
    x = centres[labels] + torch.randn(n, generator=g)
    return SourceLogits(-0.5 * scale * (x.unsqueeze(1) - centres).square(), labels)


def test_untrained_adapter_is_exactly_the_training_free_correction():
    uniform = torch.full((K,), 1 / K)
    priors = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.05, 0.05, 0.1, 0.8]])  # fmt: skip
    logits = torch.randn(9, K)
    plain = SourceModel([], uniform, K)
    with_adapter = SourceModel([], uniform, K, label_adapter=LabelShiftAdapter(K))
    for batch_em in (False, True):
        expected = PriorCorrection(batch_em=batch_em).correct(_view(logits, [2, 3, 4], priors, plain), logits)  # fmt: skip
        got = LabelShiftCorrection(batch_em=batch_em).correct(_view(logits, [2, 3, 4], priors, with_adapter), logits)  # fmt: skip
        assert torch.equal(got, expected)


def test_without_an_adapter_the_piece_is_prior_correction():
    uniform = torch.full((K,), 1 / K)
    source = SourceModel([], uniform, K)
    logits, priors = torch.randn(5, K), torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    piece, reference = LabelShiftCorrection(), PriorCorrection()
    assert piece.init_state(source).keys() == reference.init_state(source).keys()
    view = _view(logits, [5], priors, source)
    assert torch.equal(piece.correct(view, logits), reference.correct(view, logits))


def test_per_sample_priors_give_each_sample_its_own_request_correction():
    uniform = torch.full((K,), 1 / K)
    adapter = _perturbed(LabelShiftAdapter(K))
    priors = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4])
    index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    logits = torch.randn(7, K)
    out = adapter(logits, priors[index], uniform)
    assert out.shape == (7, K)
    for i in range(7):  # the same as applying the adapter to each sample alone
        torch.testing.assert_close(out[i : i + 1], adapter(logits[i : i + 1], priors[index[i]].unsqueeze(0), uniform))  # fmt: skip
    assert torch.equal(adapter(logits, priors[:1], uniform), adapter(logits, priors[:1].expand(7, K), uniform))  # fmt: skip
    torch.testing.assert_close(out[3:6], logits[3:6])  # no shift: the frozen model's logits
    gamma = adapter.strength(priors, uniform).detach()
    assert gamma.shape == (3,)
    torch.testing.assert_close(gamma[2], torch.tensor(1.0))
    assert abs(float(gamma[0]) - 1) > 1e-3


def test_weights_round_trip_through_safetensors(tmp_path):
    adapter = _perturbed(LabelShiftAdapter(K, hidden=16))
    tensors, metadata = adapter_to_tensors(adapter)
    save_file(tensors, tmp_path / "a.safetensors", metadata=metadata)
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        loaded = adapter_from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118
    assert loaded.config() == {"num_classes": K, "hidden": 16}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapter.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters())


def test_package_loads_its_adapter_and_checks_its_model(tmp_path):
    package = make_random_package(tmp_path / "pkg")
    assert load_package(package).label_adapter is None
    adapter = _perturbed(LabelShiftAdapter(10))
    tensors, metadata = adapter_to_tensors(adapter)
    fingerprint = load_package(package).card.fingerprint
    save_file(tensors, package / LABEL_ADAPTER_FILE, metadata=metadata | {"model_fingerprint": fingerprint})  # fmt: skip
    model = load_package(package)
    assert model.label_adapter is not None
    assert ModelRunner(model).source.label_adapter is model.label_adapter
    assert torch.equal(model.label_adapter.net[2].weight, adapter.net[2].weight)
    save_file(tensors, package / LABEL_ADAPTER_FILE, metadata=metadata | {"model_fingerprint": "other"})  # fmt: skip
    with pytest.raises(ValueError, match="trained for other weights"):
        load_package(package)


def test_default_lsa_without_an_adapter_matches_default(random_model):
    runner = ModelRunner(random_model)
    assert runner.source.label_adapter is None
    x, segments = torch.randn(10, 3, 32, 32), Segments.from_sizes([4, 6])
    results = []
    for name in ("default", "default_lsa"):
        policy = build_policy(name)
        state = policy.init_state(runner.source)
        results.append(runner.forward(x, segments, policy, [state, state]))
    assert torch.equal(results[0].logits, results[1].logits)


def test_default_lsa_uses_the_package_adapter(tmp_path):
    package = make_random_package(tmp_path / "pkg")
    fingerprint = load_package(package).card.fingerprint
    tensors, metadata = adapter_to_tensors(_perturbed(LabelShiftAdapter(10)))
    save_file(tensors, package / LABEL_ADAPTER_FILE, metadata=metadata | {"model_fingerprint": fingerprint})  # fmt: skip
    runner = ModelRunner(load_package(package))
    policy = build_policy("default_lsa")
    state = policy.init_state(runner.source)
    state[PRIOR_KEY] = torch.tensor([0.5] + [0.5 / 9] * 9)
    x = torch.randn(3, 3, 32, 32)
    adapted = runner.forward(x, Segments.from_sizes([3]), policy, [state])
    plain = runner.forward(x, Segments.from_sizes([3]), build_policy("default"), [state])
    assert torch.isfinite(adapted.logits).all()
    assert not torch.allclose(adapted.logits, plain.logits)


def test_a_short_training_run_lowers_the_loss():
    torch.set_num_threads(1)
    uniform = torch.full((K,), 1 / K)
    data = _synthetic_logits(4000, scale=0.4)  # underconfident: the full correction is too strong
    cfg = LabelAdapterConfig(steps=40, tasks_per_step=8, min_batch=32, max_batch=256, hidden=16, lr=3e-2)  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    held_out = sample_tasks(_synthetic_logits(4000, 0.4, seed=1), ClassSampler(data.labels, K), uniform, 1.0, cfg, 64, gen)  # fmt: skip
    before, _ = task_loss(LabelShiftAdapter(K, hidden=16), held_out, uniform, cfg.loss_clip)
    adapter = train_label_adapter(data, uniform, 1.0, cfg, progress=False)
    after, _ = task_loss(adapter, held_out, uniform, cfg.loss_clip)
    assert after < before - 1e-3
    assert not any(p.requires_grad for p in adapter.parameters())
