"""The one byte formatter (``cmd info``, reports, error messages)."""

import pytest

from cmdtool.units import human_bytes


@pytest.mark.parametrize("n, shown", [(0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1500, "1.5 KB"),
                                      (123_456, "123 KB"), (999_600, "1 MB"), (4.2e9, "4.2 GB"),
                                      (999.6e9, "1 TB"), (4.2e12, "4.2 TB"), (5e15, "5000 TB")])
def test_human_bytes(n, shown):
    assert human_bytes(n) == shown
