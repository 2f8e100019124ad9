import sys

import pytest

from ttaserve.server.allocator import tune_glibc_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_glibc_accepts_the_malloc_tuning():
    assert tune_glibc_malloc() is True
