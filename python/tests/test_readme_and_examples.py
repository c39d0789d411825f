"""What the README shows about the package works as shown: installed with
pip into a virtual environment (the pytest plugin found by its entry point),
the README's example prints what the README says, its fixture test passes,
and the iotest-style example passes."""

import os
import shutil
import sys

import pytest

import nbdfault
from support import REPO, require, run


def readme_section():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    start = text.index("### From Python\n")
    return text[start : text.index("\n## ", start)]


def blocks(section, lang):
    """The bodies of the fenced blocks tagged ``lang`` ("" for none)."""
    found, body, tag = [], None, None
    for line in section.splitlines(keepends=True):
        if line.startswith("```"):
            if body is None:
                body, tag = [], line[3:].strip()
            else:
                if tag == lang:
                    found.append("".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return found


def env_with_binary():
    return dict(os.environ, NBDFAULT=nbdfault.find_binary())


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A virtual environment seeing the system's packages (nbd, pytest,
    pip), with the package pip-installed from a copy of python/ (offline:
    the system's setuptools builds it)."""
    d = tmp_path_factory.mktemp("venv")
    src = d / "src"
    shutil.copytree(
        os.path.join(REPO, "python"),
        src,
        ignore=shutil.ignore_patterns("tests", "examples", "__pycache__", "build", "*.egg-info"),
    )
    env = d / "env"
    out = run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env)])
    assert out.returncode == 0, out.stderr
    python = env / "bin" / "python"
    out = run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-build-isolation", "--no-index", "--no-deps", str(src)]
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return python


def test_the_readme_example_prints_what_the_readme_says(venv, tmp_path):
    section = readme_section()
    example = blocks(section, "python")[0]
    expected = blocks(section, "")[0]
    script = tmp_path / "example.py"
    script.write_text(example)
    # From the installed copy, not the source tree.
    out = run([str(venv), str(script)], cwd=tmp_path, env=env_with_binary())
    assert (out.stdout, out.stderr, out.returncode) == (expected, "", 0)


def test_the_readme_fixture_test_passes_with_the_installed_plugin(venv, tmp_path):
    (tmp_path / "test_fixture.py").write_text(blocks(readme_section(), "python")[1])
    out = run(
        [str(venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fixture.py"],
        cwd=tmp_path,
        env=env_with_binary(),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout


def test_the_iotest_example_passes():
    for tool in ("qemu-img", "qemu-io", "qemu-nbd"):
        require(tool)
    env = dict(env_with_binary(), PYTHONPATH=os.path.join(REPO, "python"))
    out = run([sys.executable, os.path.join(REPO, "python", "examples", "iotest_nbd_errors.py")], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.endswith("\nOK\n"), out.stderr
    assert "Ran 2 tests" in out.stderr
