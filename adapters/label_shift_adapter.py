"""Label Shift Adapter (Park et al., ICCV 2023, arXiv 2308.08810), rebuilt from the paper.

The paper has no public code. Its idea: a small network g_phi, trained before deployment
on source data under sampled label distributions, maps an estimated target label
distribution pi_hat to the parameters of a small part of the frozen model, through a
scalar "imbalance degree" for stability. Here that part is the classifier's bias: with
r = log(pi_hat / pi_s),

    z' = z + gamma * r,   gamma = exp(g_phi(KL(pi_hat || pi_s), max r, min r)),

so g_phi decides how strongly to trust the estimate, from how far and how it departs
from the source prior. Its last layer starts at zero and its output is centred on pi_s,
so an untrained adapter is exactly the training-free correction z + log pi_hat - log pi_s.

Richer heads were measured on the demo model and dropped (see the training module):
a per-class logit scale and bias from an MLP on pi_hat, and a rank-8 change of the
classifier applied to the penultimate features, fit the model's training images (on
which it is more confident and more accurate than on unseen ones) and lost 0.3 to 2
points to the training-free correction on test data. The head kept learns gamma of
0.83 to 0.93 on the demo model (about its temperature, 0.8, as Bayes prescribes for
posteriors calibrated like clean data): level with the training-free correction on
clean test data, below it under corruptions, where the best multiple of r exceeds 1
(`python -m ttaserve.label_adapter_check`). The paper's gains come from long-tailed
source models, whose classifier carries a class bias the adapter can learn; the demo
model's source is balanced.

`LabelShiftCorrection` is the output piece: `PriorCorrection`'s per-stream estimate,
MAP-EM per request and update, with the adapter in place of the plain logit correction
when the model package has one (`SourceModel.label_adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ttaserve.adapters.policy import BatchView
from ttaserve.adapters.prior_correction import PRIOR_KEY, PriorCorrection

LOG_RATIO_FLOOR = -8.0  # r floored in g_phi's input: absent classes stay finite
SUMMARIES = 3  # g_phi's inputs: KL(pi_hat || pi_s), max r, min r


def log_ratio(prior: torch.Tensor, source_prior: torch.Tensor) -> torch.Tensor:
    """r = log pi_hat - log pi_s per row (N, K), as `PriorCorrection` computes it."""
    return prior.clamp_min(1e-8).log() - source_prior.log()


def shift_summary(prior: torch.Tensor, source_prior: torch.Tensor) -> torch.Tensor:
    """(N, 3) permutation-invariant summary of label distributions `prior` (N, K)."""
    r = log_ratio(prior, source_prior).clamp_min(LOG_RATIO_FLOOR)
    kl = (prior * r).sum(1)
    return torch.stack([kl, r.max(1).values, r.min(1).values], dim=1)


class LabelShiftAdapter(nn.Module):
    """g_phi: label distribution -> strength gamma of its logit correction (1 at start)."""

    def __init__(self, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_classes, self.hidden = num_classes, hidden
        self.net = nn.Sequential(nn.Linear(SUMMARIES, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)  # identity at start: the training-free correction
        nn.init.zeros_(self.net[2].bias)

    def config(self) -> dict[str, int]:
        """The architecture hyper-parameters (stored with the weights)."""
        return {"num_classes": self.num_classes, "hidden": self.hidden}

    def strength(self, prior: torch.Tensor, source_prior: torch.Tensor) -> torch.Tensor:
        """gamma (N,) for label distributions (N, K); exactly 1 at pi_s."""
        shifted = self.net(shift_summary(prior, source_prior))
        unshifted = self.net(shift_summary(source_prior.unsqueeze(0), source_prior))
        return (shifted - unshifted).squeeze(1).exp()

    def forward(self, logits: torch.Tensor, prior: torch.Tensor, source_prior: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Adapted logits (N, K) from frozen logits (N, K) and per-sample priors (N, K), or
        one shared (1, K) row; g_phi runs once per distinct prior (once per request)."""
        distinct, inverse = prior.unique(dim=0, return_inverse=True)
        gamma = self.strength(distinct, source_prior)[inverse].unsqueeze(1)
        r = log_ratio(prior, source_prior)
        # written so that gamma = 1 reproduces PriorCorrection's logits bit for bit
        return logits + prior.clamp_min(1e-8).log() - source_prior.log() + (gamma - 1) * r


def label_shift_correction(
    adapter: LabelShiftAdapter | None,
    logits: torch.Tensor,
    prior: torch.Tensor,
    source_prior: torch.Tensor,
) -> torch.Tensor:
    """The adapter's logits, or the training-free logits + log pi_hat - log pi_s without one."""
    if adapter is None:
        return logits + prior.clamp_min(1e-8).log() - source_prior.log()
    return adapter(logits, prior, source_prior)


def adapter_to_tensors(adapter: LabelShiftAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """Weights and string metadata (architecture hyper-parameters) for a safetensors file."""
    tensors = {k: v.detach().float().contiguous() for k, v in adapter.state_dict().items()}
    return tensors, {k: str(v) for k, v in adapter.config().items()}


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LabelShiftAdapter:  # fmt: skip
    """Rebuild a frozen, eval-mode adapter from `adapter_to_tensors` output."""
    try:
        config = {k: int(metadata[k]) for k in ("num_classes", "hidden")}
    except KeyError as missing:
        raise ValueError(f"label adapter metadata lacks {missing}; retrain it with `ttaserve train-label-adapter`") from None  # fmt: skip
    adapter = LabelShiftAdapter(**config)
    adapter.load_state_dict(tensors)
    return adapter.eval().requires_grad_(False)


@dataclass(frozen=True)
class LabelShiftCorrection(PriorCorrection):
    """`PriorCorrection` whose logit correction is the package's label shift adapter.

    The estimate, its per-request MAP-EM and its update are PriorCorrection's; only
    `correct` differs. Without an adapter in the package it is PriorCorrection exactly.
    """

    def correct(self, view: BatchView, logits: torch.Tensor) -> torch.Tensor:
        prior = view.state[PRIOR_KEY]  # (R, K)
        if self.batch_em:
            prior = self._request_priors(view, logits, prior, view.source)
        adapter = view.source.label_adapter
        return label_shift_correction(adapter, logits, view.segments.per_sample(prior), view.source.prior)  # fmt: skip
