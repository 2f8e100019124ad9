import json

import pytest
import torch
from safetensors.torch import save as st_save

from ttaserve.server.state import (
    SCHEMA_VERSION,
    StateMismatchError,
    StreamState,
    decode_state,
    encode_state,
    finite_rows,
)


def _state(**kw):
    g = torch.Generator().manual_seed(0)
    tensors = {"bn.0.mean": torch.randn(16, generator=g), "bn.0.var": torch.rand(16, generator=g)}
    return StreamState.of(policy="bn", policy_params={"alpha": 1.0}, model_fingerprint="abc", tensors=tensors, **kw)  # fmt: skip


def test_round_trip_is_bit_exact():
    state = _state(version=3, samples_seen=10, updates=2, resets=1)
    decoded = decode_state(encode_state(state), "abc")
    assert decoded.header() == state.header()
    for key, tensor in state.tensors.items():
        assert torch.equal(decoded.tensors[key], tensor)


def test_other_model_or_schema_or_garbage_is_a_mismatch_not_a_crash():
    blob = encode_state(_state())
    with pytest.raises(StateMismatchError):
        decode_state(blob, "another-model")
    with pytest.raises(StateMismatchError):
        decode_state(blob.replace(b'\\"schema\\": 2', b'\\"schema\\": 9'), "abc")
    for garbage in [b"", b"\x00" * 4, b"\xff" * 64, blob[:40]]:
        with pytest.raises(StateMismatchError):
            decode_state(garbage, "abc")


def test_non_finite_state_is_rejected():
    state = _state()
    state.tensors["bn.0.mean"][0] = float("nan")
    with pytest.raises(StateMismatchError):
        decode_state(encode_state(state), "abc")


def test_round_trip_keeps_order_shapes_and_scalars():
    tensors = {
        "z.matrix": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.scalar": torch.tensor(2.5),
        "m.empty": torch.zeros(0),
        "b.vector": torch.rand(4),
    }
    state = StreamState.of(policy="bn", policy_params={}, model_fingerprint="abc", tensors=tensors)
    decoded = decode_state(encode_state(state), "abc")
    assert list(decoded.tensors) == list(tensors)
    for key, tensor in tensors.items():
        assert decoded.tensors[key].shape == tensor.shape
        assert torch.equal(decoded.tensors[key], tensor)
    empty = StreamState.of(policy="source", policy_params={}, model_fingerprint="abc", tensors={})
    assert decode_state(encode_state(empty), "abc").tensors == {}


def test_schema_1_blob_of_separate_tensors_is_a_mismatch():
    header = _state().header() | {"schema": 1}
    old = st_save(dict(_state().tensors), metadata={"ttaserve": json.dumps(header)})
    assert SCHEMA_VERSION != 1
    with pytest.raises(StateMismatchError):
        decode_state(old, "abc")


def test_layout_that_does_not_match_the_tensor_is_a_mismatch():
    blob = encode_state(_state())
    with pytest.raises(StateMismatchError):
        decode_state(blob.replace(b"[16]", b"[17]", 1), "abc")


def test_finite_rows():
    state = _state()
    assert finite_rows(state.packed.flat.unsqueeze(0)).tolist() == [True]
    assert finite_rows(torch.zeros(2, 0)).tolist() == [True, True]
    rows = torch.stack([state.packed.flat, state.packed.flat.clone()])
    rows[1, 3] = float("inf")
    assert finite_rows(rows).tolist() == [True, False]
