"""The llama.cpp build profiles in marco_gguf/cmake/: every setting is one this llama.cpp declares, the
README's install builds the portable profile (AVX2, no AVX-512, RPC on), and the ARM profiles' targets are real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import llama_cpp
import pytest

from marco_gguf.errors import MarcoError
from marco_gguf.runtime.build import PROFILES_DIR, build_command, profile_cache, profiles

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP = REPO / ".cache" / "llama.cpp"
# variables a profile may set that CMake itself or the Android NDK's toolchain file define
TOOLCHAIN_VARS = {"CMAKE_CUDA_ARCHITECTURES", "CMAKE_TOOLCHAIN_FILE", "CMAKE_SYSTEM_NAME", "CMAKE_SYSTEM_PROCESSOR",
                  "CMAKE_C_COMPILER", "CMAKE_CXX_COMPILER", "ANDROID_ABI", "ANDROID_PLATFORM"}
NDK_ENV = dict(os.environ, ANDROID_NDK="/opt/android-ndk")
SMALL = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_CCACHE=OFF"]

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


@pytest.fixture(scope="module")
def declared() -> dict[str, str]:
    """{name: 'option' | 'cache'} for every option() and set(... CACHE ...) in llama.cpp's CMake files."""
    if not (LLAMA_CPP / "ggml" / "CMakeLists.txt").is_file():
        pytest.skip("llama.cpp source not fetched: run python scripts/fetch_llama_cpp.py")
    names: dict[str, str] = {}
    for f in [*LLAMA_CPP.rglob("CMakeLists.txt"), *LLAMA_CPP.rglob("*.cmake")]:
        text = f.read_text(errors="replace")
        names.update((m, "cache") for m in re.findall(r"\bset\s*\(\s*(\w+)\s[^()]*?\bCACHE\b", text))
        names.update((m, "option") for m in re.findall(r"\boption\s*\(\s*(\w+)", text))
    return names


def settings(name: str) -> dict[str, tuple[str, str]]:
    return profile_cache(name, NDK_ENV)


def test_all_profiles_present():
    """The README's table names these; each is a .cmake file in the package."""
    assert profiles() == ["android-arm64", "cpu", "cpu-avx2", "cpu-avx512", "cuda", "linux-arm64", "metal", "portable",
                          "vulkan"]
    assert sorted(f.stem for f in PROFILES_DIR.glob("*.cmake")) == profiles()


@needs_cmake
@pytest.mark.parametrize("name", profiles())
def test_profile_sets_only_declared_options(name, declared):
    entries = settings(name)
    assert entries, f"{name} sets nothing"
    for var, (kind, value) in entries.items():
        if var in TOOLCHAIN_VARS:
            continue
        assert var in declared, f"{name}.cmake sets {var}, which this llama.cpp does not declare (typo?)"
        if declared[var] == "option":
            assert kind == "BOOL" and value in ("ON", "OFF"), f"{name}.cmake: {var} is an option, set it ON or OFF"
    if entries.get("GGML_NATIVE", ("", ""))[1] == "OFF":  # a portable x86 build never carries AMX
        assert all(entries.get(f"GGML_AMX_{k}", ("", "OFF"))[1] == "OFF" for k in ("TILE", "INT8", "BF16"))


@needs_cmake
def test_profiles_differ_where_they_should():
    cpu, avx2, avx512 = settings("cpu"), settings("cpu-avx2"), settings("cpu-avx512")
    assert cpu["GGML_NATIVE"][1] == "OFF" and cpu["GGML_AVX512"][1] == "ON" and avx2["GGML_AVX512"][1] == "OFF"
    assert avx512["GGML_AVX512_VNNI"][1] == "ON" and cpu["GGML_AVX512_VNNI"][1] == "OFF"
    assert settings("cuda")["GGML_CUDA"][1] == "ON" and settings("vulkan")["GGML_VULKAN"][1] == "ON"
    assert settings("metal")["GGML_METAL"][1] == "ON"
    assert profile_cache("cuda", dict(os.environ, CUDAARCHS="86"))["CMAKE_CUDA_ARCHITECTURES"][1] == "86"
    android = settings("android-arm64")
    assert android["CMAKE_TOOLCHAIN_FILE"][1] == "/opt/android-ndk/build/cmake/android.toolchain.cmake"
    assert android["ANDROID_ABI"][1] == "arm64-v8a" and android["GGML_CPU_ARM_ARCH"][1] == "armv8.2-a+dotprod+fp16+i8mm"


@needs_cmake
def test_android_profile_without_ndk_is_one_clear_line():
    env = {k: v for k, v in os.environ.items() if k != "ANDROID_NDK"}
    with pytest.raises(MarcoError, match="set ANDROID_NDK"):
        profile_cache("android-arm64", env)


def cpu_variant(args: list[str], tmp_path: Path, name: str) -> str:
    """Configure llama.cpp and return the flags and definitions its CPU backend is compiled with."""
    proc = subprocess.run(["cmake", *args, "-S", str(LLAMA_CPP), "-B", str(tmp_path / name), *SMALL],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if "Adding CPU backend variant ggml-cpu:" in ln]
    return line.split(":", 1)[1].strip()


def readme_cmake_args() -> list[str]:
    readme = (REPO / "README.md").read_text()
    m = re.search(r'CMAKE_ARGS="([^"]+)" pip install', readme)
    assert m, "README has no CMAKE_ARGS install command"
    return m.group(1).replace("$PWD", str(REPO)).split()


@needs_cmake
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 flags")
def test_readme_install_is_the_portable_x86_build(declared, tmp_path):
    """What the README installs runs on every AVX2 CPU: no AVX-512, AMX or native flags, and RPC is built."""
    assert readme_cmake_args() == ["-C", str(REPO / "cmake" / "portable.cmake")]
    variant = cpu_variant(readme_cmake_args(), tmp_path, "readme")
    assert {"-mavx2", "-mfma", "-mf16c", "-mbmi2"} <= set(re.split(r"[;\s]", variant))
    assert "avx512" not in variant and "amx" not in variant.lower() and "native" not in variant
    assert settings("portable")["GGML_RPC"][1] == "ON"
    fast = cpu_variant(["-C", str(REPO / "cmake" / "cpu-avx512.cmake")], tmp_path, "fast")
    assert {"-mavx512f", "-mavx512vnni", "-mavx512bf16"} <= set(re.split(r"[;\s]", fast)) and "amx" not in fast.lower()


@needs_cmake
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
def test_linux_arm64_profile_cross_configures(declared, tmp_path):
    variant = cpu_variant(["-C", str(REPO / "cmake" / "linux-arm64.cmake")], tmp_path, "arm64")
    assert variant == f"-march={settings('linux-arm64')['GGML_CPU_ARM_ARCH'][1]}"


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler")
@pytest.mark.parametrize("name", ["linux-arm64", "android-arm64"])
def test_arm_profiles_target_real_architectures(name, tmp_path):
    """The compiler accepts -march=GGML_CPU_ARM_ARCH and it enables the dot-product instructions."""
    arch = settings(name)["GGML_CPU_ARM_ARCH"][1]
    proc = subprocess.run(["aarch64-linux-gnu-gcc", f"-march={arch}", "-dM", "-E", "-x", "c", "/dev/null"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "__ARM_FEATURE_DOTPROD 1" in proc.stdout
    assert ("__ARM_FEATURE_MATMUL_INT8 1" in proc.stdout) == ("i8mm" in arch)


def test_build_command_carries_the_profile_and_overrides():
    cmd = build_command("cuda", ["CMAKE_CUDA_ARCHITECTURES=90"])
    assert cmd.cmake_args == f"-C {PROFILES_DIR / 'cuda.cmake'} -DCMAKE_CUDA_ARCHITECTURES=90"
    assert cmd.argv[1:8] == ["-m", "pip", "install", "--no-cache-dir", "--verbose", "--force-reinstall", "--no-deps"]
    assert cmd.argv[8] == f"llama-cpp-python=={llama_cpp.__version__}"
    assert shlex.split(cmd.shell()) == [f"CMAKE_ARGS={cmd.cmake_args}", *cmd.argv]  # as a POSIX shell reads it
    # a value with a space stays one argument for CMake too (scikit-build-core splits CMAKE_ARGS as a shell would)
    env_value = shlex.split(build_command("cpu", ["CMAKE_C_FLAGS=-O2 -g"]).shell())[0].removeprefix("CMAKE_ARGS=")
    assert shlex.split(env_value) == ["-C", str(PROFILES_DIR / "cpu.cmake"), "-DCMAKE_C_FLAGS=-O2 -g"]
    with pytest.raises(MarcoError, match="unknown build profile"):
        build_command("cdua")
    with pytest.raises(MarcoError, match="NAME=VALUE"):
        build_command("cpu", ["GGML_AVX512"])
