"End-to-end runs of the installed `aksis` console script, as a user would type them."

import subprocess
import sys

import aksis


def aksis_cli(*args: str) -> subprocess.CompletedProcess:
    "Run the installed `aksis` script with `args`, capturing its output"
    return subprocess.run(["aksis", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    result = aksis_cli("--help")
    assert result.returncode == 0
    assert "usage: aksis" in result.stdout
    assert "info" in result.stdout


def test_version():
    result = aksis_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"aksis {aksis.__version__}")


def test_module_entry_point_matches_the_script():
    result = subprocess.run(
        [sys.executable, "-m", "aksis.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout == aksis_cli("--help").stdout


def test_unknown_command_is_a_one_line_error():
    result = aksis_cli("fly-to-the-moon")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid choice: 'fly-to-the-moon'" in lines[0]


def test_no_command_prints_help_and_fails():
    result = aksis_cli()
    assert result.returncode == 2
    assert "usage: aksis" in result.stdout


def test_info_reports_the_default_device():
    result = aksis_cli("info")
    assert result.returncode == 0, result.stderr
    assert "default device: cpu" in result.stdout or "default device: cuda" in result.stdout


def test_help_does_not_import_heavy_packages():
    "`aksis --help` stays fast because building the parser imports no torch, datasets or transformers"
    code = (
        "import sys, contextlib, io, aksis.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: aksis.cli.main(['--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = {'torch', 'datasets', 'transformers', 'tokenizers', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
