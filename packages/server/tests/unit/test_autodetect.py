"""Import auto-detection: the table, what is dropped, and the merge rules."""

from __future__ import annotations

import sys

import pytest
from packaging.utils import canonicalize_name
from python_executor_server.errors import InvalidRequirement
from python_executor_server.execution.autodetect import (
    detect_requirements,
    imported_modules,
    local_module_names,
    merge_requirements,
    requirements_for_run,
    stdlib_module_names,
)
from python_executor_server.execution.import_map import IMPORT_TO_PYPI, lookup
from python_executor_server.execution.requirements import normalize_requirement


def detect(code: str, version: str = "3.12", **files: str) -> tuple[str, ...]:
    return detect_requirements({"main.py": code, **files}, python_version=version)


@pytest.mark.parametrize(
    ("statement", "project"),
    [
        ("import yaml", "PyYAML"),
        ("import cv2", "opencv-python-headless"),
        ("from sklearn.linear_model import LinearRegression", "scikit-learn"),
        ("from PIL import Image", "pillow"),
        ("from bs4 import BeautifulSoup", "beautifulsoup4"),
        ("from dateutil import parser", "python-dateutil"),
        ("import dotenv", "python-dotenv"),
        ("import jwt", "PyJWT"),
        ("from Crypto.Cipher import AES", "pycryptodome"),
        ("import serial", "pyserial"),
        ("import git", "GitPython"),
        ("import psycopg2", "psycopg2-binary"),
        ("from google.protobuf import message", "protobuf"),
        ("from google.cloud import storage", "google-cloud-storage"),
        ("import numpy as np", "numpy"),
        ("import skimage.io", "scikit-image"),
        ("import zmq", "pyzmq"),
        ("import fitz", "PyMuPDF"),
    ],
)
def test_the_table_maps_import_names_to_projects(statement: str, project: str) -> None:
    assert detect(statement) == (canonicalize_name(project),)


def test_the_table_is_large_and_names_valid_projects() -> None:
    assert len(IMPORT_TO_PYPI) >= 60
    for module, project in IMPORT_TO_PYPI.items():
        assert normalize_requirement(project) == canonicalize_name(project), module
        assert module.split(".")[0] not in sys.stdlib_module_names, module


def test_lookup_longest_dotted_prefix_wins_and_unknown_is_none() -> None:
    assert lookup("google.cloud.storage.blob") == "google-cloud-storage"
    assert lookup("google.protobuf.json_format") == "protobuf"
    assert lookup("google") is None
    assert lookup("surely_not_a_listed_module") is None


def test_stdlib_is_dropped() -> None:
    code = "import os, sys, json\nfrom collections import abc\nimport xml.etree.ElementTree\n"
    assert detect(code) == ()


def test_stdlib_follows_the_target_version() -> None:
    assert "tomllib" in stdlib_module_names("3.11")
    assert "tomllib" not in stdlib_module_names("3.10")
    assert "distutils" in stdlib_module_names("3.11")
    assert "distutils" not in stdlib_module_names("3.12")
    assert "telnetlib" in stdlib_module_names("3.12")
    assert "telnetlib" not in stdlib_module_names("3.13")
    assert {"os", "sys", "asyncio"} <= stdlib_module_names("3.13")


def test_local_modules_of_the_submission_are_dropped() -> None:
    # the user's own yaml.py and their 'requests' package shadow the real ones
    found = detect(
        "import yaml\nimport requests.sessions\nimport six\n",
        **{"yaml.py": "x = 1", "requests/__init__.py": "", "requests/sessions.py": ""},
    )
    assert found == ("six",)


def test_local_names_include_nested_files_and_their_directories() -> None:
    names = local_module_names({"src/app/main.py": "", "lib/util.py": "", "data/x.csv": ""})
    assert {"src", "app", "main", "lib", "util"} <= names
    assert "x" not in names and "data" not in names


def test_relative_imports_are_dropped() -> None:
    assert detect("from . import yaml\nfrom .bs4 import x\nfrom ..cv2 import y\n") == ()


def test_unknown_imports_are_skipped_not_guessed() -> None:
    assert detect("import totally_private_thing\nimport numpy\n") == ("numpy",)


def test_imports_anywhere_count_including_functions_and_dynamic_ones() -> None:
    code = (
        "def f():\n    import colorama\n"
        "try:\n    import ujson as json\nexcept ImportError:\n    import json\n"
        "import importlib\nm = importlib.import_module('yaml')\n"
        "n = __import__('six')\n"
        "o = importlib.import_module(name)\n"
    )
    assert detect(code) == ("colorama", "pyyaml", "six", "ujson")


def test_a_file_that_does_not_parse_contributes_nothing() -> None:
    found = detect_requirements(
        {"main.py": "import six\n", "broken.py": "import yaml\nthis is not python(\n"},
        python_version="3.12",
    )
    assert found == ("six",)
    assert list(imported_modules("x = '\0'")) == []


def test_only_python_sources_are_read() -> None:
    found = detect_requirements(
        {"main.py": "print(1)", "notes.txt": "import yaml", "tool.pyw": "import six"},
        python_version="3.12",
    )
    assert found == ("six",)


def test_output_is_sorted_normalized_and_deduplicated() -> None:
    assert detect("import yaml\nimport PIL.Image\nfrom PIL import ImageDraw\nimport yaml\n") == (
        "pillow",
        "pyyaml",
    )


def test_merge_explicit_wins_by_normalized_name() -> None:
    merged = merge_requirements(("PyYAML==6.0.2", "six>=1.16"), ("pyyaml", "Six", "colorama"))
    assert merged == ("colorama", "pyyaml==6.0.2", "six>=1.16")


def test_merge_keeps_explicit_extras_and_markers() -> None:
    merged = merge_requirements(("requests[socks]; python_version >= '3.8'",), ("requests",))
    assert merged == ('requests[socks]; python_version >= "3.8"',)


def test_merge_with_nothing_detected_or_nothing_explicit() -> None:
    assert merge_requirements(("six",), ()) == ("six",)
    assert merge_requirements((), ("pyyaml", "six")) == ("pyyaml", "six")
    assert merge_requirements((), ()) == ()


def test_requirements_for_run_combines_or_not() -> None:
    sources = {"main.py": "import yaml\nimport colorama\n"}
    both = requirements_for_run("colorama==0.4.6", sources, python_version="3.12", auto_detect=True)
    assert both == ("colorama==0.4.6", "pyyaml")
    only = requirements_for_run(
        "colorama==0.4.6", sources, python_version="3.12", auto_detect=False
    )
    assert only == ("colorama==0.4.6",)
    assert requirements_for_run(None, sources, python_version="3.12", auto_detect=False) == ()
    with pytest.raises(InvalidRequirement):
        requirements_for_run("-i http://x", sources, python_version="3.12", auto_detect=True)
