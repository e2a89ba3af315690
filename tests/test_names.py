import pytest

from services.core.names import InvalidName, check_repository, check_upload_id

GOOD = ["a", "library/ubuntu", "a.b_c__d---e/f-g", "x" * 255, "0/1/2", "foo.bar/baz_qux"]
BAD = [
    "",
    "Library/ubuntu",
    "library//ubuntu",
    "/library",
    "library/",
    "../etc",
    "a..b",
    "a___b",
    "-a",
    "a-",
    "with space",
    "unicodé",
    "x" * 256,
    "a/" + "b" * 300,
]


@pytest.mark.parametrize("name", GOOD)
def test_distribution_grammar_accepts(name):
    assert check_repository(name) == name


@pytest.mark.parametrize("name", BAD)
def test_distribution_grammar_rejects(name):
    with pytest.raises(InvalidName):
        check_repository(name)


def test_upload_ids_are_canonical_uuids():
    assert check_upload_id("0f8fad5b-d9cb-469f-a165-70867728950e")
    for bad in (
        "",
        "nope",
        "0F8FAD5B-D9CB-469F-A165-70867728950E",
        "0f8fad5bd9cb469fa16570867728950e",
    ):
        with pytest.raises(InvalidName):
            check_upload_id(bad)
