"""Test streams for the accuracy benchmark: sample orders and request splits, fixed seeds.

Pure functions of the labels and a seed. A `Stream` says which sample comes when (an
index into its domain's images, or into the open-set pool), from which domain (corruption)
and how the sequence is cut into requests. Every scenario yields each index at most once
per pass over the data.

Per-corruption scenarios (one fresh stream per corruption, and one on clean images):
- `iid`: shuffled, batches of 64.
- `correlated`: class-correlated order of NOTE / UnMix-TNS `sort_by_dirichlet` with
  delta = 0.1: C chunks; each class is split over the chunks with proportions
  ~ Dir(delta), chunks already holding N/C samples get no more; redrawn until every chunk
  has >= 10 samples; each chunk is emitted class by class in a random class order. Batch 64.
- `single`: shuffled, batch 1.
- `longtail_ir10`, `longtail_ir100`: class c (in a random class order) keeps
  n_c = floor(n_max * IR^(-c/(C-1))) samples; shuffled; batch 64.
- `online_label_shift`: SAR's online label shift. The stream moves through the classes
  in a shuffled order, phase j lasting N/C steps; each step draws a class with
  probability IR/(IR+C-1) for phase j's class and 1/(IR+C-1) for every other, then takes
  an unused sample of it (exhausted classes are dropped from the draw). IR = 5000, batch 64.
- `open_set`: an iid stream in which 20% of every batch of 64 (13 images) are unknown
  images from the open-set pool, at random positions.

Across-corruption scenarios (one stream, never reset):
- `continual`: the corruptions in sequence, each shuffled; batch 64 (a request may span
  the change of corruption, as a real stream's would).
- `continual_long`: `continual` repeated 10 times (reshuffled each pass): the collapse test.
- `mixed`: all (corruption, image) pairs shuffled together; batch 64.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

BATCH_SIZE = 64
DIRICHLET_DELTA = 0.1
DIRICHLET_MIN_CHUNK = 10
LABEL_SHIFT_IR = 5000.0
OPEN_SET_FRACTION = 0.2
LONG_PASSES = 10

PER_CORRUPTION_SCENARIOS: tuple[str, ...] = (
    "iid", "correlated", "single", "longtail_ir10", "longtail_ir100",
    "online_label_shift", "open_set",
)  # fmt: skip
ACROSS_CORRUPTION_SCENARIOS: tuple[str, ...] = ("continual", "continual_long", "mixed")
SCENARIOS: tuple[str, ...] = PER_CORRUPTION_SCENARIOS + ACROSS_CORRUPTION_SCENARIOS


@dataclass(frozen=True)
class Stream:
    """A sequence of samples cut into requests of `batch_size` (the last may be smaller)."""

    index: np.ndarray  # (n,) position in the domain's images, or in the open-set pool
    domain: np.ndarray  # (n,) domain number (0 for a per-corruption stream)
    unknown: np.ndarray  # (n,) True where `index` points into the open-set pool
    batch_size: int
    passes: int = 1

    def __len__(self) -> int:
        return len(self.index)

    def requests(self) -> Iterator[slice]:
        """Consecutive request slices of the stream."""
        for start in range(0, len(self.index), self.batch_size):
            yield slice(start, min(start + self.batch_size, len(self.index)))

    @property
    def num_requests(self) -> int:
        return -(-len(self.index) // self.batch_size)


def scenario_rng(seed: int, scenario: str, domain: int = 0) -> np.random.Generator:
    """The generator of one scenario on one domain: independent of every other."""
    return np.random.default_rng([seed, zlib.crc32(scenario.encode()), domain])


def class_indices(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Shuffled positions of each class present in `labels`."""
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def iid_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All positions, shuffled."""
    return rng.permutation(len(labels))


def dirichlet_order(
    labels: np.ndarray,
    rng: np.random.Generator,
    delta: float = DIRICHLET_DELTA,
    min_chunk: int = DIRICHLET_MIN_CHUNK,
    max_tries: int = 10_000,
) -> np.ndarray:
    """NOTE's `sort_by_dirichlet`: class-correlated order of all positions (see module doc)."""
    classes = np.unique(labels)
    n, k = len(labels), len(classes)
    min_chunk = min(min_chunk, n // (2 * k))  # tiny sets cannot have 10 per chunk
    for _ in range(max_tries):
        chunks: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            open_chunks = sizes < n / k  # NOTE's balance: full chunks take no more
            proportions = rng.dirichlet(np.full(k, delta)) * open_chunks
            total = proportions.sum()
            proportions = proportions / total if total > 0 else open_chunks / open_chunks.sum()
            cuts = (np.cumsum(proportions) * len(idx)).astype(int)[:-1]
            for j, part in enumerate(np.split(idx, cuts)):
                chunks[j].append(part)
                sizes[j] += len(part)
        if sizes.min() >= min_chunk:
            break
    else:
        raise ValueError(f"no Dirichlet({delta}) order with chunks of >= {min_chunk} samples")
    order = [chunk[c] for chunk in chunks for c in rng.permutation(k)]
    return np.concatenate(order)


def longtail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Exponential long-tail profile n_c = floor(n_max * IR^(-c/(C-1))), c = 0..C-1."""
    ranks = np.arange(num_classes) / max(num_classes - 1, 1)
    return np.maximum(1, np.floor(n_max * imbalance_ratio ** (-ranks) + 1e-9)).astype(int)


def longtail_order(
    labels: np.ndarray, rng: np.random.Generator, imbalance_ratio: float
) -> np.ndarray:
    """A shuffled long-tailed subset: classes ranked in a random order, then subsampled."""
    by_class = class_indices(labels, rng)
    classes = rng.permutation(list(by_class))
    n_max = min(len(v) for v in by_class.values())
    counts = longtail_counts(n_max, len(classes), imbalance_ratio)
    kept = np.concatenate([by_class[int(c)][:n] for c, n in zip(classes, counts, strict=True)])
    return rng.permutation(kept)


def online_label_shift_order(
    labels: np.ndarray, rng: np.random.Generator, imbalance_ratio: float = LABEL_SHIFT_IR
) -> np.ndarray:
    """SAR's online label shift over all positions (see module doc)."""
    by_class = class_indices(labels, rng)
    classes = np.array(sorted(by_class))
    k, n = len(classes), len(labels)
    phase_of_class = {int(c): j for j, c in enumerate(rng.permutation(classes))}
    major = np.array([phase_of_class[int(c)] for c in classes])  # phase in which c dominates
    remaining = np.array([len(by_class[int(c)]) for c in classes])
    taken = np.zeros(k, dtype=np.int64)
    phase_length = -(-n // k)
    order = np.empty(n, dtype=np.int64)
    for t in range(n):
        weights = np.where(major == t // phase_length, imbalance_ratio, 1.0) * (remaining > 0)
        c = int(np.searchsorted(np.cumsum(weights), rng.random() * weights.sum(), side="right"))
        c = min(c, k - 1)
        order[t] = by_class[int(classes[c])][taken[c]]
        taken[c] += 1
        remaining[c] -= 1
    return order


def per_corruption_order(scenario: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The sample order of a per-corruption scenario (`open_set`: its known part)."""
    if scenario in ("iid", "single", "open_set"):
        return iid_order(labels, rng)
    if scenario == "correlated":
        return dirichlet_order(labels, rng)
    if scenario.startswith("longtail_ir"):
        return longtail_order(labels, rng, float(scenario.removeprefix("longtail_ir")))
    if scenario == "online_label_shift":
        return online_label_shift_order(labels, rng)
    raise ValueError(f"{scenario!r} is not a per-corruption scenario")


def with_open_set(
    known: np.ndarray,
    pool_size: int,
    rng: np.random.Generator,
    fraction: float = OPEN_SET_FRACTION,
    batch_size: int = BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Interleave pool samples so that `fraction` of each batch is unknown; (index, unknown)."""
    if pool_size < 1:
        raise ValueError("the open-set scenario needs a non-empty open-set pool")
    n_unknown = round(batch_size * fraction)
    n_known = batch_size - n_unknown
    pool = np.concatenate([rng.permutation(pool_size) for _ in range(1 + len(known) // pool_size)])  # fmt: skip
    index, unknown, used = [], [], 0
    for start in range(0, len(known), n_known):
        part = known[start : start + n_known]
        extra = round(len(part) * n_unknown / n_known)
        batch_index = np.concatenate([part, pool[used : used + extra]])
        batch_unknown = np.arange(len(batch_index)) >= len(part)
        used += extra
        perm = rng.permutation(len(batch_index))
        index.append(batch_index[perm])
        unknown.append(batch_unknown[perm])
    return np.concatenate(index), np.concatenate(unknown)


def per_corruption_stream(
    scenario: str, labels: np.ndarray, seed: int, domain: int = 0, open_set_pool: int = 0
) -> Stream:
    """The stream of a per-corruption scenario over images with `labels`."""
    rng = scenario_rng(seed, scenario, domain)
    order = per_corruption_order(scenario, labels, rng)
    unknown = np.zeros(len(order), dtype=bool)
    if scenario == "open_set":
        order, unknown = with_open_set(order, open_set_pool, rng)
    batch = 1 if scenario == "single" else BATCH_SIZE
    return Stream(order, np.zeros(len(order), dtype=np.int64), unknown, batch)


def across_corruption_stream(
    scenario: str, labels: np.ndarray, num_domains: int, seed: int
) -> Stream:
    """The stream of `continual`, `continual_long` or `mixed` over `num_domains` domains.

    Every domain holds the same images (with `labels`) under a different corruption. In the
    continual streams each domain contributes whole batches (its first n - n % 64 images of
    a fresh permutation when n >= 64), so that no batch straddles two corruptions, as in the
    published protocols (10,000 images per corruption in batches that divide it); otherwise
    the boundary batches differ from pass to pass and drift measures them, not the policy.
    """
    rng = scenario_rng(seed, scenario)
    n = len(labels)
    if scenario == "mixed":
        pairs = rng.permutation(n * num_domains)
        index, domain = pairs % n, pairs // n
        return Stream(index, domain, np.zeros(len(pairs), dtype=bool), BATCH_SIZE)
    if scenario not in ("continual", "continual_long"):
        raise ValueError(f"{scenario!r} is not an across-corruption scenario")
    passes = LONG_PASSES if scenario == "continual_long" else 1
    per_domain = n - n % BATCH_SIZE if n >= BATCH_SIZE else n
    index = np.concatenate([rng.permutation(n)[:per_domain] for _ in range(passes * num_domains)])  # fmt: skip
    domain = np.tile(np.repeat(np.arange(num_domains), per_domain), passes)
    return Stream(index, domain, np.zeros(len(index), dtype=bool), BATCH_SIZE, passes)
