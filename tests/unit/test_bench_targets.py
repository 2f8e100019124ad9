from ttaserve.bench.targets import clean_within, every_corruption


def _figures(clean: float, **corrupted: float) -> dict:
    domains = {"clean": {"accuracy": clean, "images": 100}}
    domains |= {name: {"accuracy": acc, "images": 72} for name, acc in corrupted.items()}
    return {"domains": domains, "clean": clean}


def test_corruption_target_names_the_worst_gap_and_the_images_it_stands_on():
    source = _figures(90.0, fog=40.0, jpeg_compression=60.0)
    check = every_corruption(_figures(90.0, fog=55.0, jpeg_compression=58.6), source)
    assert not check["met"]
    assert check["detail"] == "worst jpeg_compression -1.4 (72 images); below on jpeg_compression"  # fmt: skip
    assert every_corruption(_figures(90.0, fog=55.0, jpeg_compression=61.0), source)["met"]


def test_clean_target_allows_half_a_point_and_says_on_how_many_images():
    source = _figures(90.0)
    assert clean_within(_figures(89.5), source) == {"met": True, "detail": "clean -0.5 vs source (100 images)"}  # fmt: skip
    assert not clean_within(_figures(89.0), source)["met"]
