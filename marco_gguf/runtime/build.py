"""Build profiles for llama.cpp (marco_gguf/cmake/*.cmake, shipped in the wheel) and the pip command that
rebuilds llama-cpp-python with one."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from marco_gguf.errors import MarcoError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "cmake"  # package data: works from a wheel too
CROSS_PROFILES = {"android-arm64"}  # built with cmake for another device, never pip-installed here

# cmake -P evaluates a profile like `cmake -C` does and lists the cache entries it set
_DUMP_SCRIPT = """
cmake_minimum_required(VERSION 3.16)
include("${MARCO_PROFILE}")
get_cmake_property(_names CACHE_VARIABLES)
foreach(_name IN LISTS _names)
  get_property(_type CACHE "${_name}" PROPERTY TYPE)
  if(NOT _type STREQUAL "INTERNAL" AND NOT _name STREQUAL "MARCO_PROFILE")
    message("${_name}\\t${_type}\\t${${_name}}")
  endif()
endforeach()
"""


def profiles() -> list[str]:
    """The profile names: cmake/NAME.cmake."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.cmake"))


def profile_path(name: str) -> Path:
    path = PROFILES_DIR / f"{name}.cmake"
    if not PROFILES_DIR.is_dir():
        raise MarcoError(f"build profiles not found in {PROFILES_DIR} (they ship inside the marco-gguf package; "
                         "reinstall it)")
    if not path.is_file():
        raise MarcoError(f"unknown build profile {name!r}; choose from {', '.join(profiles())}")
    return path


def profile_cache(name: str, env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """The cache entries {name: (type, value)} the profile sets, evaluated by cmake itself.

    Raises MarcoError with cmake's message when the profile stops (for example a missing ANDROID_NDK).
    """
    cmake = shutil.which("cmake")
    if cmake is None:
        raise MarcoError("cmake not found on PATH")
    with tempfile.TemporaryDirectory(prefix="marco-profile-") as tmp:
        script = Path(tmp) / "dump.cmake"
        script.write_text(_DUMP_SCRIPT)
        proc = subprocess.run([cmake, f"-DMARCO_PROFILE={profile_path(name)}", "-P", str(script)],
                              capture_output=True, text=True, env=env, cwd=tmp)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("CMake Error")]
        raise MarcoError(f"profile {name}: {lines[0] if lines else 'cmake failed'}")
    entries = {}
    for line in proc.stderr.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            entries[parts[0]] = (parts[1], parts[2])
    return entries


@dataclass
class BuildCommand:
    """`CMAKE_ARGS=... python -m pip install ...` for one profile."""

    profile: str
    cmake_args: str
    argv: list[str]

    def shell(self) -> str:
        return f"CMAKE_ARGS={shlex.quote(self.cmake_args)} {shlex.join(self.argv)}"


def build_command(profile: str, defines: list[str] | None = None, python: str = sys.executable) -> BuildCommand:
    """The pip command that rebuilds llama-cpp-python with `profile` plus `-D NAME=VALUE` overrides.

    The installed llama-cpp-python version is kept; pip's wheel cache is bypassed, since pip would
    otherwise reuse a wheel built with other flags (BRIEF fact 2).
    """
    for d in defines or []:
        if "=" not in d or not d.split("=", 1)[0]:
            raise MarcoError(f"-D takes NAME=VALUE, got {d!r}")
    path = profile_path(profile)
    check_host(profile)
    cmake_args = shlex.join(["-C", str(path), *(f"-D{d}" for d in defines or [])])
    try:  # rebuild the installed version, its dependencies left alone
        spec = ["--force-reinstall", "--no-deps", f"llama-cpp-python=={importlib.metadata.version('llama-cpp-python')}"]
    except importlib.metadata.PackageNotFoundError:
        spec = ["llama-cpp-python"]
    argv = [python, "-m", "pip", "install", "--no-cache-dir", "--verbose", *spec]
    return BuildCommand(profile, cmake_args, argv)


def check_host(profile: str) -> None:
    """Refuse a profile that cannot produce a Python module for this machine."""
    system, machine = platform.system(), platform.machine().lower()
    if profile in CROSS_PROFILES:
        raise MarcoError(f"{profile} cross-compiles llama.cpp for a phone: cmake -C {profile_path(profile)} "
                         "-S llama.cpp -B build-android (see the README); pip cannot install it here")
    if profile == "metal" and system != "Darwin":
        raise MarcoError("the metal profile is for macOS on Apple silicon")
    if profile == "linux-arm64" and machine not in ("aarch64", "arm64"):
        raise MarcoError(f"linux-arm64 builds for 64-bit ARM; this machine is {machine} (the profile "
                         f"cross-compiles llama.cpp itself with cmake -C {profile_path(profile)})")
    if profile.startswith("cpu") and machine not in ("x86_64", "amd64"):
        raise MarcoError(f"the {profile} profile is for x86-64 CPUs; this machine is {machine}")


def run_build(command: BuildCommand) -> int:
    """Run pip with the profile's CMAKE_ARGS; returns pip's exit code."""
    env = dict(os.environ, CMAKE_ARGS=command.cmake_args)
    return subprocess.run(command.argv, env=env).returncode


def installed_build(python: str = sys.executable) -> str:
    """llama_print_system_info() of the llama-cpp-python that `python` imports (a fresh process)."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MarcoError(f"llama_cpp does not import after the build: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip()


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """'CPU : AVX2 = 1 | FMA = 1 | CUDA : ARCHS = 890 |' -> {'CPU': {'AVX2': '1', ...}, 'CUDA': {...}}."""
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for item in text.split("|"):
        if " : " in item:
            name, item = item.split(" : ", 1)
            current = sections.setdefault(name.strip(), {})
        if "=" in item:
            key, value = item.split("=", 1)
            current[key.strip()] = value.strip()
    sections.pop("", None)
    return sections
