"""The root command: dispatch to every package, one-line usage errors, the cache root read at the entry point."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mvgen.cli import SUBCOMMAND_MODULES, _user_errors, build_parser, main


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: COMMAND"),
    (["paint"], "invalid choice: 'paint'"),
    (["generate", "--prompt", "x"], "the following arguments are required: --out"),
    (["export"], "the following arguments are required: COMMAND"),
    (["client", "generate", "--prompt", "x"], "the following arguments are required: --out"),
])
def test_usage_errors_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvgen: error: ") and err.count("\n") == 1 and words in err, err


def test_every_package_registers_its_commands():
    listed = build_parser({}).format_help()
    for command in ("generate", "tiny", "demo-inputs", "export", "serve", "repository", "client", "bench"):
        assert f"    {command} " in listed, command


def test_user_errors_cover_every_package():
    from engine.errors import UsageError
    from engine.errors import RequestError
    from engine.errors import CheckpointError
    from engine.errors import AdapterError
    from server.client import ClientError
    from server.launcher import LaunchError

    assert set(_user_errors()) == {UsageError, RequestError, CheckpointError, AdapterError, FileNotFoundError,
                                   ClientError, LaunchError}
    assert len(SUBCOMMAND_MODULES) == 4


def test_the_cache_root_comes_from_the_flag_or_the_environment(tmp_path):
    assert build_parser({"MVGEN_CACHE": str(tmp_path)}).parse_args(["tiny"]).cache_dir == tmp_path
    flag = build_parser({"MVGEN_CACHE": "/elsewhere"}).parse_args(["--cache-dir", str(tmp_path), "tiny"])
    assert flag.cache_dir == tmp_path


def test_tiny_builds_under_the_cache_dir_flag(tiny_cache, capsys):
    assert main(["--cache-dir", str(tiny_cache), "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_cache / "tiny-v2")


def test_python_dash_m_mvgen_is_the_command():
    result = subprocess.run([sys.executable, "-m", "mvgen", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "generate" in result.stdout and "--cache-dir" in result.stdout
