"""The manifest's shares as every downloader checks them (protocol/shares.py)."""

import pytest

from protocol.shares import SharesError, check_shares


def test_a_manifest_without_shares_means_uniform_shares():
    assert check_shares(None, 3) == {"source": "uniform", "clusters": [1, 1, 1], "classes": None}


def test_well_formed_shares_pass():
    shares = {"source": "clusters", "clusters": [5, 0, 7], "classes": [[2, 3], [0, 0], [7, 0]]}
    assert check_shares(shares, 3) == shares


@pytest.mark.parametrize(
    "shares,words",
    [
        ({"source": "clusters", "clusters": [1, 2]}, "exactly 'source', 'clusters' and 'classes'"),
        ({"source": "oracle", "clusters": [1, 2, 3], "classes": None}, "unknown source"),
        ({"source": "islands", "clusters": [1, 2], "classes": None}, "holds 2 counts, 3 expected"),
        ({"source": "islands", "clusters": [0, 0, 0], "classes": None}, "all zero"),
        ({"source": "islands", "clusters": [1, -2, 3], "classes": None}, "integer in [0,"),
        ({"source": "islands", "clusters": [1, 2.5, 3], "classes": None}, "integer in [0,"),
        ({"source": "islands", "clusters": [1, 2, 3], "classes": [[1], [2]]}, "one list per expert"),
        ({"source": "islands", "clusters": [1, 2, 3], "classes": [[1, 0], [2], [3, 0]]}, "holds 1 counts, 2"),
        ([1, 2, 3], "exactly 'source'"),
    ],
)
def test_malformed_shares_are_refused(shares, words):
    with pytest.raises(SharesError) as err:
        check_shares(shares, 3)
    assert words in str(err.value)
