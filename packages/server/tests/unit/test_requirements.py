"""Requirement validation, normalization and the environment key."""

from __future__ import annotations

import pytest
from python_executor_server.errors import BadRequest, InvalidRequirement
from python_executor_server.execution.requirements import (
    MAX_REQUIREMENTS,
    environment_key,
    normalize_requirement,
    parse_requirements,
    requirement_name,
)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("-i https://evil.example/simple", "option lines"),
        ("--index-url https://evil.example/simple", "option lines"),
        ("--extra-index-url https://evil.example/simple", "option lines"),
        ("-e git+https://github.com/x/y.git#egg=y", "option lines"),
        ("-r other.txt", "option lines"),
        ("-c constraints.txt", "option lines"),
        ("-f /opt/wheels", "option lines"),
        ("--find-links /opt/wheels", "option lines"),
        ("--trusted-host evil.example", "option lines"),
        ("--pre", "option lines"),
        ("six==1.17.0 --hash=sha256:abc", "per-requirement options"),
        ("https://evil.example/six-1.17.0-py3-none-any.whl", "URLs"),
        ("http://10.0.0.1/pkg.tar.gz", "URLs"),
        ("git+https://github.com/x/y.git", "VCS"),
        ("hg+http://hg.example/repo", "VCS"),
        ("six @ https://evil.example/six.whl", "URLs"),
        ("six @ file:///etc/passwd", "URLs"),
        ("six @ file:/etc/passwd", "direct references"),
        ("./local_pkg", "local paths"),
        ("../up", "local paths"),
        ("/etc/passwd", "local paths"),
        ("~/pkg", "local paths"),
        ("dir/pkg", "local paths"),
        ("six-1.17.0-py3-none-any.whl", "local paths"),
        ("pkg.tar.gz", "local paths"),
        ("C:\\pkg", "local paths"),
        ("six===", "PEP 508"),
        ("six >= 1 <", "PEP 508"),
        ("not a requirement!", "PEP 508"),
    ],
)
def test_each_rejected_kind_names_the_line(line: str, reason: str) -> None:
    with pytest.raises(InvalidRequirement) as caught:
        parse_requirements(f"colorama\n{line}\nsix\n")
    assert caught.value.line == line
    assert repr(line) in caught.value.message
    assert reason in caught.value.message
    assert isinstance(caught.value, BadRequest)  # -> 400


def test_names_versions_extras_markers_are_accepted_and_normalized() -> None:
    text = """
        # a comment line
        PyYAML[B,a] <7, >=5 ; python_version>'3.8'   # trailing comment
        Six==1.17.0
        colorama_Extra.Thing~=0.4
        requests[socks,SECURITY]
        tomli; python_version < "3.11"
    """
    assert parse_requirements(text) == (
        "colorama-extra-thing~=0.4",
        'pyyaml[a,b]<7,>=5; python_version > "3.8"',
        "requests[security,socks]",
        "six==1.17.0",
        'tomli; python_version < "3.11"',
    )


def test_sorted_and_deduplicated_across_spellings() -> None:
    assert parse_requirements("six\nSIX\nSix \n\ncolorama\n") == ("colorama", "six")


def test_backslash_continuation_and_blank_input() -> None:
    assert parse_requirements("six\\\n==1.17.0\n") == ("six==1.17.0",)
    assert parse_requirements("") == ()
    assert parse_requirements("\n  # only comments\n") == ()


def test_a_comment_needs_whitespace_before_the_hash() -> None:
    assert parse_requirements("six  # pinned later") == ("six",)
    with pytest.raises(InvalidRequirement, match="PEP 508"):
        parse_requirements("six#frag")


def test_too_many_requirements_and_too_long_lines() -> None:
    text = "\n".join(f"pkg{i}" for i in range(MAX_REQUIREMENTS + 1))
    with pytest.raises(InvalidRequirement, match="at most"):
        parse_requirements(text)
    with pytest.raises(InvalidRequirement, match="longer than"):
        parse_requirements("a" * 2000)


def test_requirement_name_is_the_pep503_name() -> None:
    assert requirement_name("PyYAML[x]>=6; python_version>'3'") == "pyyaml"
    assert normalize_requirement("  Foo.Bar_baz  ") == "foo-bar-baz"


def test_environment_key_is_stable_across_spelling_order_and_duplicates() -> None:
    a = environment_key("3.12", ["six==1.17.0", "PyYAML>=6"])
    b = environment_key("3.12", ["pyyaml >= 6", "Six==1.17.0", "six==1.17.0"])
    assert a == b
    assert len(a) == 64 and int(a, 16) >= 0


def test_environment_key_changes_with_version_requirements_and_salt() -> None:
    base = environment_key("3.12", ["six"])
    assert environment_key("3.11", ["six"]) != base
    assert environment_key("3.12", ["six==1.17.0"]) != base
    assert environment_key("3.12", ["six", "colorama"]) != base
    assert environment_key("3.12", ["six"], salt="wheels_only") != base
    # the key names directories on disk: it must not drift silently between releases
    assert base == "b6fb95dae743b1ae8a740e0eecd349a139c0ef31cf948973de27e82821cebbf6"
