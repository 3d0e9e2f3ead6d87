"""The C++ loader says, on one line, when a first use compiles the backend and where the build is cached."""

from __future__ import annotations

import os
import time

import pytest
from torch.utils import cpp_extension

from kernels import cpp_backend


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """A JIT build into an empty extensions cache, with the compiler call replaced by a stub."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    # _jit_build records what the stub returns as the loaded library: restore the real one after.
    monkeypatch.setattr(cpp_backend, "_library_file", cpp_backend._library_file)
    monkeypatch.setattr(cpp_backend.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs["name"]))
    return calls


def test_first_build_prints_one_line_naming_the_cache(fake_build, capsys):
    where = cpp_backend._jit_build()
    lines = capsys.readouterr().err.splitlines()
    build_directory = cpp_extension._get_build_directory(cpp_backend.JIT_NAME, verbose=False)
    assert fake_build == [cpp_backend.JIT_NAME] and build_directory in where
    assert len(lines) == 1 and "building the C++ backend" in lines[0] and build_directory in lines[0]


def test_cached_library_loads_quietly(fake_build, capsys):
    build_directory = cpp_extension._get_build_directory(cpp_backend.JIT_NAME, verbose=False)
    library = os.path.join(build_directory, f"{cpp_backend.JIT_NAME}.so")
    open(library, "wb").close()
    newer = time.time() + 60
    os.utime(library, (newer, newer))
    cpp_backend._jit_build()
    assert capsys.readouterr().err == ""
    old = min(p.stat().st_mtime for p in cpp_backend.source_files()) - 60
    os.utime(library, (old, old))  # sources edited since that build: ninja recompiles, and the line says so
    cpp_backend._jit_build()
    assert "building the C++ backend" in capsys.readouterr().err
