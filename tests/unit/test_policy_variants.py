import pytest

from ttaserve.adapters.registry import POLICIES, build_policy, parse_variant, register_variant


def test_variant_specs_parse_python_literals():
    assert parse_variant(
        "a25=default:class_specific_alpha=0.25;shift_gate=(0.1, 0.2);switch_gate=None"
    ) == (  # fmt: skip
        "a25",
        "default",
        {"class_specific_alpha": 0.25, "shift_gate": (0.1, 0.2), "switch_gate": None},
    )
    assert parse_variant("same=bn:") == ("same", "bn", {})
    for bad in ("no-base", "x=:a=1", "x=bn:a", "x=bn:a=os.system('true')"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)


def test_a_variant_is_its_base_with_statistics_fields_replaced():
    try:
        register_variant("test_a25", "default", {"class_specific_alpha": 0.25})
        variant, base = build_policy("test_a25"), build_policy("default")
        assert variant.name == "test_a25" and variant.statistics.class_specific_alpha == 0.25
        assert variant.outputs == base.outputs and variant.gates == base.gates
        assert variant.statistics.shift_gate == base.statistics.shift_gate
        assert (
            variant.params()["EmaStatistics"]["class_specific_alpha"] == 0.25
        )  # in the state's header
        register_variant("test_a25", "default", {"class_specific_alpha": 0.25})  # again: a no-op
        with pytest.raises(ValueError, match="already exists"):
            register_variant("test_a25", "default", {"class_specific_alpha": 0.5})
        with pytest.raises(ValueError, match="already exists"):
            register_variant("bn", "default", {})
        with pytest.raises(ValueError, match="no_such_field"):
            register_variant("test_bad", "default", {"no_such_field": 1})
    finally:
        POLICIES.pop("test_a25", None)
    assert "test_bad" not in POLICIES
