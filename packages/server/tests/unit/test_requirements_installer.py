"""The installer's command line and the translation of pip.conf into uv options."""

from __future__ import annotations

import itertools
from pathlib import Path

from python_executor_server.execution.installer import (
    IndexOptions,
    index_options,
    install_argv,
    pip_index_options,
    read_pip_config,
)
from python_executor_server.sandbox.base import Interpreter
from python_executor_server.settings import Settings

INTERP = Interpreter("3.12", Path("/opt/py/bin/python3.12"), Path("/opt/py"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_later_files_and_install_section_win(tmp_path: Path) -> None:
    first = write(tmp_path / "etc/pip.conf", "[global]\nindex-url = https://a/simple\ntimeout=5\n")
    second = write(
        tmp_path / "home/pip.conf",
        "[global]\nindex_url = https://b/simple\n[install]\nfind-links = /x\n",
    )
    merged = read_pip_config([first, tmp_path / "missing.conf", second])
    assert merged == {"index-url": "https://b/simple", "timeout": "5", "find-links": "/x"}


def test_broken_config_files_are_skipped(tmp_path: Path) -> None:
    broken = write(tmp_path / "pip.conf", "not an ini file [[[\n")
    assert read_pip_config([broken]) == {}


def test_pip_sources_translate_and_missing_local_ones_are_dropped(tmp_path: Path) -> None:
    index = tmp_path / "simple"
    index.mkdir()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    constraints = write(tmp_path / "constraints.txt", "six<2\n")
    options = pip_index_options(
        {
            "index-url": "https://mirror.example/simple",
            "extra-index-url": f"file://{index} file://{tmp_path}/absent https://extra/simple",
            "find-links": f"{wheels} {tmp_path}/absent-too",
            "constraint": f"{constraints} {tmp_path}/no-such.txt",
        }
    )
    assert options.args == (
        "--index-url",
        "https://mirror.example/simple",
        "--extra-index-url",
        f"file://{index}",
        "--extra-index-url",
        "https://extra/simple",
        "--find-links",
        str(wheels),
        "--constraint",
        str(constraints),
        "--index-strategy",
        "unsafe-best-match",
    )
    assert set(options.readable) == {tmp_path, wheels, constraints}  # an index root: simple/../


def test_no_index_and_a_lone_index_keep_uvs_strategy() -> None:
    options = pip_index_options({"no-index": "true", "index-url": "https://m/simple"})
    assert options.args == ("--no-index", "--index-url", "https://m/simple")


def test_settings_indexes_replace_pip_sources_but_keep_its_cert(tmp_path: Path) -> None:
    cert = write(tmp_path / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    conf = write(
        tmp_path / "pip.conf", f"[global]\ncert = {cert}\nextra-index-url = https://p/simple\n"
    )
    settings = Settings(index_url="https://own/simple", extra_index_url="https://x/s https://y/s")
    options = index_options(settings, [conf])
    assert options.args == (
        "--index-url",
        "https://own/simple",
        "--extra-index-url",
        "https://x/s",
        "--extra-index-url",
        "https://y/s",
    )
    assert options.env == {"SSL_CERT_FILE": str(cert)}
    assert cert in options.readable


def test_pip_config_is_used_only_when_no_index_is_set_and_it_is_respected(tmp_path: Path) -> None:
    conf = write(tmp_path / "pip.conf", "[global]\nindex-url = https://p/simple\n")
    assert index_options(Settings(), [conf]).args == ("--index-url", "https://p/simple")
    assert index_options(Settings(respect_pip_config=False), [conf]) == IndexOptions()


def test_fingerprint_follows_sources_and_constraint_contents(tmp_path: Path) -> None:
    constraints = write(tmp_path / "c.txt", "six<2\n")
    options = IndexOptions(("--constraint", str(constraints)))
    before = options.fingerprint()
    assert before == IndexOptions(("--constraint", str(constraints))).fingerprint()
    constraints.write_text("six<1.16\n")
    assert options.fingerprint() != before
    assert IndexOptions(("--index-url", "https://a")).fingerprint() != IndexOptions().fingerprint()


def test_install_argv() -> None:
    settings = Settings(data_dir=Path("/data"), wheels_only=True, offline_installs=True)
    argv = install_argv(
        settings,
        IndexOptions(("--index-url", "https://m/simple")),
        uv=Path("/bin/uv"),
        interpreter=INTERP,
        target=Path("/data/envs/.staging-x/site-packages"),
        requirements=("pyyaml>=6", "six"),
    )
    assert argv[:3] == ("/bin/uv", "pip", "install")
    assert argv[-3:] == ("--", "pyyaml>=6", "six")
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--python"] == "/opt/py/bin/python3.12"
    assert pairs["--target"] == "/data/envs/.staging-x/site-packages"
    assert pairs["--cache-dir"] == "/data/uv-cache"
    assert pairs["--link-mode"] == "copy"
    assert pairs["--only-binary"] == ":all:"
    assert pairs["--index-url"] == "https://m/simple"
    assert {"--offline", "--compile-bytecode", "--no-config"} <= set(argv)


def test_install_argv_defaults_build_from_source_online() -> None:
    argv = install_argv(
        Settings(),
        IndexOptions(),
        uv=Path("/bin/uv"),
        interpreter=INTERP,
        target=Path("/t"),
        requirements=("six",),
    )
    assert "--only-binary" not in argv and "--offline" not in argv
