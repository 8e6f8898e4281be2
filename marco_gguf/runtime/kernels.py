"""x86-64 CPU kernel variants of ggml, built beside the portable install and picked when a process starts.

The README installs llama.cpp with portable kernels (AVX2, FMA, F16C, BMI2) so that it runs on every x86-64
since 2013; on a CPU that runs AVX-512 that costs 10-17 % of decode (BENCHMARKS.md, "Build profiles").
llama.cpp's own answer is runtime dispatch: the CPU backend compiled once per CPU generation
(`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`) and the best one loaded by `ggml_backend_load_best`.
llama-cpp-python cannot use it as shipped: it installs only the `ggml-cpu` target, never calls
`ggml_backend_load_all`, and pip reuses a wheel it built before whatever `CMAKE_ARGS` say. So this module
does the same thing beside it, with llama.cpp's own pieces:

- `build()` compiles ggml's CPU backend again from the installed version's own source (its sdist), once
  per AVX-512 generation of llama.cpp's variant list, ~20-30 s each, into the user's cache under a key of
  the installed library (a reinstall never mixes two builds), with ggml's feature test
  (`cpu-feats.cpp`, the `ggml_backend_score` that llama.cpp's dispatch calls) compiled beside each.
- `activate()`, run when marco_gguf's runtime is imported (before llama_cpp), picks the best variant
  that ggml's score accepts (CPUID, in this process, so an emulated CPU answers too) and whose
  instructions really execute (isa.py, in a child process: an OS or VM that advertises what it does not
  run is caught), and loads it under the installed soname `libggml-cpu.so.0`; the dynamic linker then
  binds the installed libggml.so to it, as it would to the file it names.

Linux only: soname preloading is the ELF dynamic linker's behaviour (ARM and macOS installs compile for
their own platform already). The AMX variant is left out on purpose (the advertised-but-unusable case).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from marco_gguf.errors import MarcoError
from marco_gguf.runtime import isa

ENV = "MARCO_GGUF_CPU_KERNELS"  # auto (the default), portable, or a variant's name
LIBRARY = "libggml-cpu.so.0"  # the soname the installed libggml.so needs
SCORE = "ggml-cpu-score.so"
MANIFEST = "manifest.json"

# what the portable profile already builds (cmake/cpu-avx2.cmake): every variant adds to it
BASE_OPTIONS = ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")
# every other x86 kernel option, set OFF unless a variant turns it on (one build folder is reconfigured)
OTHER_OPTIONS = ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_TILE", "AMX_INT8",
                 "AMX_BF16")
# the instruction sets isa.py executes for each option (AVX512 means F, CD, VL, DQ and BW in ggml)
EXECUTED = {"AVX512": ("avx512f", "avx512bw"), "AVX512_VBMI": ("avx512_vbmi",), "AVX512_VNNI": ("avx512_vnni",),
            "AVX512_BF16": ("avx512_bf16",)}


@dataclass(frozen=True)
class Variant:
    name: str  # llama.cpp's name for the CPU generation
    options: tuple[str, ...]  # GGML_<option>=ON on top of BASE_OPTIONS

    @property
    def instructions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for o in self.options for i in EXECUTED[o]))


# llama.cpp's x86 variants (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) that go beyond the portable AVX2
# build, best first. Left out: sapphirerapids (AMX: advertised by VMs that cannot run it) and alderlake
# (AVX-VNNI without AVX-512; not measured here, and this CPU cannot run it to test it).
VARIANTS = (
    Variant("zen4", ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")),
    Variant("icelake", ("AVX512", "AVX512_VBMI", "AVX512_VNNI")),
    Variant("cascadelake", ("AVX512", "AVX512_VNNI")),
    Variant("skylakex", ("AVX512",)),
)
BY_NAME = {v.name: v for v in VARIANTS}


@dataclass
class Activation:
    """Which CPU kernels this process uses and why."""

    variant: str | None  # None: the installed (portable) kernels
    reason: str
    path: str | None = None
    skipped: list[str] = field(default_factory=list)  # variants built but not taken here, with the reason


_ACTIVATION: Activation | None = None


def supported() -> bool:
    return sys.platform == "linux" and isa.is_x86()


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "marco-gguf"


def installed_key() -> str | None:
    """llama-cpp-python's version and a hash of its libggml-base: variants are only ever loaded beside the
    library they were compiled against."""
    from marco_gguf.ggml_library import library_dir

    try:
        base = library_dir() / "libggml-base.so"
        digest = hashlib.sha256(base.read_bytes()).hexdigest()[:16]
        version = importlib.metadata.version("llama-cpp-python")
    except (MarcoError, OSError, importlib.metadata.PackageNotFoundError):
        return None
    return f"{version}-{digest}"


def kernels_dir(key: str) -> Path:
    return cache_root() / "cpu-kernels" / key


def built(key: str | None = None) -> list[str]:
    """The variants built for the installed library (empty if none)."""
    key = key or installed_key()
    if key is None:
        return []
    try:
        manifest = json.loads((kernels_dir(key) / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return [name for name in manifest.get("variants", []) if name in BY_NAME]


def _ggml_cpu_loaded() -> bool:
    try:
        return "libggml-cpu" in Path("/proc/self/maps").read_text()
    except OSError:
        return "llama_cpp" in sys.modules


def score(folder: Path) -> int:
    """ggml's own feature test for the variant in `folder` (0: this CPU lacks a feature it was built with)."""
    lib = ctypes.CDLL(str(folder / SCORE))
    lib.ggml_backend_score.restype = ctypes.c_int
    return int(lib.ggml_backend_score())


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def executes(names: tuple[str, ...], folder: Path) -> dict[str, bool | None]:
    """isa.runs for each name, remembered in `folder` for this boot (a child process per set costs ~30 ms)."""
    memo = folder / "executes.json"
    boot = _boot_id()
    try:
        saved = json.loads(memo.read_text())
        known = saved["runs"] if saved.get("boot") == boot and boot else {}
    except (OSError, ValueError, KeyError):
        known = {}
    missing = [n for n in names if n not in known]
    if missing:
        known.update({n: isa.runs(n) for n in missing})
        try:
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(json.dumps({"boot": boot, "runs": known}))
            tmp.replace(memo)
        except OSError:
            pass
    return {n: known[n] for n in names}


def activate() -> Activation:
    """Load the best CPU kernel variant this CPU runs, once per process, before llama.cpp is loaded."""
    global _ACTIVATION
    if _ACTIVATION is None:
        _ACTIVATION = _activate(os.environ.get(ENV, "auto").strip().lower() or "auto")
    return _ACTIVATION


def _activate(choice: str) -> Activation:
    if choice == "portable":
        return Activation(None, f"{ENV}=portable: the installed kernels")
    if not supported():
        return Activation(None, "the installed kernels (variants are built for x86-64 Linux only)")
    if choice != "auto" and choice not in BY_NAME:
        return Activation(None, f"{ENV}={choice} is not a variant ({', '.join(BY_NAME)}, auto or portable): "
                                "the installed kernels")
    if _ggml_cpu_loaded():
        return Activation(None, "llama.cpp was loaded before marco_gguf's runtime: the installed kernels")
    key = installed_key()
    names = built(key)
    if key is None or not names:
        return Activation(None, "no kernel variants built for the installed llama.cpp (marco-gguf build-kernels): "
                                "the installed kernels")
    from marco_gguf.ggml_library import library_dir, load_ggml_base

    if not (library_dir() / LIBRARY).exists():  # e.g. a GGML_BACKEND_DL build: nothing links to that soname
        return Activation(None, f"the installed llama.cpp has no {LIBRARY} for a variant to stand in for: "
                                "the installed kernels")
    folder = kernels_dir(key)
    skipped = []
    for variant in VARIANTS:
        if variant.name not in names or choice not in ("auto", variant.name):
            continue
        try:
            if score(folder / variant.name) == 0:
                skipped.append(f"{variant.name}: this CPU lacks a feature it was built with (CPUID)")
                continue
        except OSError as exc:
            skipped.append(f"{variant.name}: {exc}")
            continue
        runs = executes(variant.instructions, folder)
        if not all(runs.values()):
            failed = ", ".join(n for n, ok in runs.items() if not ok)
            skipped.append(f"{variant.name}: {failed} advertised but not executed here")
            continue
        try:
            load_ggml_base()  # first, so that the variant's libggml-base.so.0 is the installed one
            ctypes.CDLL(str(folder / variant.name / LIBRARY))
        except (OSError, MarcoError) as exc:
            skipped.append(f"{variant.name}: {exc}")
            continue
        return Activation(variant.name, f"ggml's CPU kernels for {variant.name} "
                                        f"({' '.join(variant.options)}): this CPU runs them",
                          str(folder / variant.name / LIBRARY), skipped)
    return Activation(None, "no built variant runs on this CPU: the installed kernels", None, skipped)


# --- building ---------------------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    folder: str
    variants: list[str]
    seconds: float
    runs_here: list[str]  # every variant built for this library that loads and runs here (child processes)
    already: bool = False


def fetch_ggml_source(version: str, dest: Path) -> Path:
    """ggml's source tree from the llama-cpp-python sdist of `version` (the library's own source)."""
    ggml = dest / f"llama-cpp-python-{version}" / "ggml"
    if (ggml / "CMakeLists.txt").is_file():
        return ggml
    with tempfile.TemporaryDirectory(prefix="marco-ggml-src-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               f"llama-cpp-python=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            last = (proc.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise MarcoError(f"could not download the llama-cpp-python {version} source ({last}); "
                             "give a llama.cpp or ggml source folder with --source")
        staging = Path(tmp) / "ggml"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) > 3 and parts[1:4] == ("vendor", "llama.cpp", "ggml"):
                    member.name = str(Path(*parts[4:])) if len(parts) > 4 else "."
                    tar.extract(member, staging, filter="data")
        ggml.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ggml, ignore_errors=True)
        shutil.move(str(staging), ggml)
    return ggml


def _source_dir(source: Path) -> Path:
    """A ggml folder, given either it or a llama.cpp checkout."""
    for candidate in (source, source / "ggml"):
        if (candidate / "src" / "ggml-cpu" / "arch" / "x86" / "cpu-feats.cpp").is_file():
            return candidate
    raise MarcoError(f"{source} is neither a llama.cpp nor a ggml source folder")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
        raise MarcoError(f"{what} failed: {(lines or (proc.stdout + proc.stderr).splitlines() or ['?'])[-1].strip()}")


# ggml as a subproject, as llama.cpp includes it: standalone, it wants files the sdist leaves out (ggml.pc.in)
WRAPPER = """cmake_minimum_required(VERSION 3.14)
project(marco_gguf_cpu_kernels C CXX)
add_subdirectory("{ggml}" ggml)
"""


def installed_options() -> dict[str, str]:
    """The installed CPU backend's non-ISA options (llamafile's sgemm, OpenMP threads), read from the library
    itself in a fresh process, so that a variant differs from it in instruction sets only."""
    from marco_gguf.runtime.build import installed_build, parse_system_info

    cpu = parse_system_info(installed_build()).get("CPU", {})
    return {"LLAMAFILE": "ON" if cpu.get("LLAMAFILE") == "1" else "OFF",
            "OPENMP": "ON" if cpu.get("OPENMP") == "1" else "OFF",
            "CPU_REPACK": "ON" if cpu.get("REPACK") == "1" else "OFF"}


def _configure(ggml: Path, build_dir: Path, variant: Variant, same: dict[str, str]) -> list[str]:
    opts = {**same, **dict.fromkeys(OTHER_OPTIONS, "OFF"), **dict.fromkeys(BASE_OPTIONS + variant.options, "ON")}
    wrapper = build_dir.parent / "project"
    wrapper.mkdir(exist_ok=True)
    (wrapper / "CMakeLists.txt").write_text(WRAPPER.format(ggml=ggml.resolve().as_posix()))
    cmd = ["cmake", "-S", str(wrapper), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
           "-DGGML_NATIVE=OFF", "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF", "-DGGML_CCACHE=OFF",
           *(f"-DGGML_{k}={v}" for k, v in opts.items())]
    if shutil.which("ninja") and not (build_dir / "Makefile").exists():
        cmd += ["-G", "Ninja"]
    return cmd


def _compile_score(ggml: Path, variant: Variant, out: Path) -> None:
    """cpu-feats.cpp with the variant's defines and no architecture flags, as ggml builds it for dispatch."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise MarcoError("no C++ compiler found (install g++ or clang++)")
    defines = [f"-DGGML_{o}" for o in BASE_OPTIONS + variant.options]
    _run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-fno-lto", f"-I{ggml / 'src'}", f"-I{ggml / 'include'}",
          f"-I{ggml / 'src' / 'ggml-cpu'}", "-DGGML_BACKEND_DL", "-DGGML_BACKEND_BUILD", "-DGGML_BACKEND_SHARED",
          *defines, str(ggml / "src" / "ggml-cpu" / "arch" / "x86" / "cpu-feats.cpp"), "-o", str(out)],
         f"compiling ggml's feature test for {variant.name}")


def check_variant(name: str) -> bool:
    """Load the variant in a child process: ggml there must report the variant's AVX-512 kernels."""
    code = ("import sys\nfrom marco_gguf.runtime import kernels\na = kernels.activate()\nimport llama_cpp\n"
            "info = llama_cpp.llama_print_system_info().decode()\n"
            "sys.exit(0 if a.variant == sys.argv[1] and 'AVX512 = 1' in info else 1)")
    env = dict(os.environ, **{ENV: name})
    return subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True).returncode == 0


def build(variants: tuple[Variant, ...] = VARIANTS, source: Path | None = None, force: bool = False,
          jobs: int | None = None, progress: Callable[[str], None] | None = None) -> BuildResult:
    """Compile the CPU kernel variants for the installed llama-cpp-python into the user's cache."""
    say = progress or (lambda _message: None)
    if not supported():
        raise MarcoError("CPU kernel variants are for x86-64 Linux; this install already builds its kernels for "
                         "this platform")
    key = installed_key()
    if key is None:
        raise MarcoError("llama-cpp-python is not installed; see the README for the install command")
    folder = kernels_dir(key)
    names = [v.name for v in variants]
    if not force and set(names) <= set(built(key)):
        return BuildResult(str(folder), names, 0.0, [n for n in built(key) if check_variant(n)], already=True)
    if shutil.which("cmake") is None:
        raise MarcoError("cmake is not installed (pip install cmake, or your system's package)")
    start = time.perf_counter()
    version = key.split("-", 1)[0]
    if source is not None:
        ggml = _source_dir(source)
    else:
        say(f"fetching ggml's source (llama-cpp-python {version} sdist)")
        ggml = fetch_ggml_source(version, cache_root() / "src")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        build_dir = staging / "build"
        same = installed_options()
        for variant in variants:
            say(f"building {variant.name} ({' '.join(variant.options)})")
            _run(_configure(ggml, build_dir, variant, same), f"configuring ggml for {variant.name}")
            _run(["cmake", "--build", str(build_dir), "--target", "ggml-cpu", "-j", str(jobs or os.cpu_count() or 1)],
                 f"building ggml-cpu for {variant.name}")
            out = staging / variant.name
            out.mkdir()
            (lib,) = [p for p in build_dir.rglob("libggml-cpu.so.*.*") if not p.is_symlink()]
            shutil.copy2(lib, out / LIBRARY)
            _compile_score(ggml, variant, out / SCORE)
        shutil.rmtree(build_dir)
        shutil.rmtree(staging / "project")
        kept = [n for n in built(key) if n not in names]  # built before and not asked for now: kept
        for name in kept:
            shutil.copytree(folder / name, staging / name)
        order = [v.name for v in VARIANTS if v.name in names or v.name in kept]
        (staging / MANIFEST).write_text(json.dumps({"llama_cpp_python": version, "key": key, "variants": order,
                                                    "source": str(ggml), "built": time.time()}, indent=1))
        old = folder.with_name(f".{key}.old.{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say("checking which variants this CPU runs")
    return BuildResult(str(folder), names, time.perf_counter() - start, [n for n in built(key) if check_variant(n)])


def describe(activation: Activation) -> dict:
    return {**asdict(activation), "built": built()}
