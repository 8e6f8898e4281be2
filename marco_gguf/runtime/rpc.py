"""More than one machine: llama.cpp's own RPC backend (ggml-rpc), started and joined from Python.

A worker (`marco-gguf rpc-server`) offers its CPU to other machines over TCP; a client registers
workers with `add_workers` before it loads a model, and llama.cpp then splits the offloaded layers
across them as it does across GPUs. Nothing here is our own protocol: the worker is
`ggml_backend_rpc_start_server`, the client `ggml_backend_rpc_add_server`, both reached through the
backend registry as llama.cpp's rpc-server and `--rpc` do.

The protocol has no authentication or encryption: a worker listens on loopback unless told otherwise.
A worker that goes away mid-generation makes ggml abort the client process; `install_abort_message`
turns that into one line on stderr and exit code 1 instead of a core dump.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

from marco_gguf.errors import MarcoError

DEFAULT_PORT = 50052
_added: list[str] = []
_abort_callback = None  # kept alive for as long as ggml may call it


def parse_endpoint(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [::1]:PORT) -> (host, port); a MarcoError for anything else."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MarcoError(f"an RPC worker is HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT}), got {text!r}")
    return host, int(port)


def parse_endpoints(text: str | None) -> list[str]:
    """'--rpc' value: comma-separated HOST:PORT list, normalised."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        host, port = parse_endpoint(part)
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return out


def _lib() -> ctypes.CDLL:
    from marco_gguf.runtime.placement import _ggml

    lib = _ggml()
    for name, restype, argtypes in (
        ("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _rpc_function(name: str, restype, argtypes):
    """A function of the RPC backend, through the registry (works whether ggml-rpc is linked or loaded)."""
    lib = _lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise MarcoError("this llama.cpp build has no RPC backend; reinstall with the README's command "
                         "(cmake/portable.cmake sets GGML_RPC=ON) or add -D GGML_RPC=ON to build-runtime")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise MarcoError(f"the RPC backend of this llama.cpp has no {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Connect once before llama.cpp does: ggml aborts the whole process on a worker it cannot reach."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise MarcoError(f"cannot reach the RPC worker at {endpoint}: {exc.strerror or exc} "
                         "(is `marco-gguf rpc-server` running there?)") from None


def add_workers(endpoints: list[str]) -> list[str]:
    """Register RPC workers as llama.cpp devices (once each per process); returns all registered so far.

    Models loaded afterwards offload their layers (n_gpu_layers) across these workers and any GPU.
    """
    if not endpoints:
        return list(_added)
    add = _rpc_function("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    lib = _lib()
    lib.ggml_backend_register.restype, lib.ggml_backend_register.argtypes = None, [ctypes.c_void_p]
    install_abort_message()
    for endpoint in endpoints:
        if endpoint in _added:
            continue
        check_reachable(endpoint)
        reg = add(endpoint.encode())
        if not reg:
            raise MarcoError(f"the RPC worker at {endpoint} offers no device")
        lib.ggml_backend_register(reg)  # its devices join the registry that llama.cpp's device selection reads
        _added.append(endpoint)
    return list(_added)


def model_devices() -> ctypes.Array | None:
    """The NULL-terminated device list for llama_model_params.devices once workers are added, else None.

    RPC workers first, then GPUs, as llama.cpp's own default order. Given explicitly because llama.cpp's
    default selection, reached through llama-cpp-python, did not see devices registered after start-up
    (measured: every layer stayed on the CPU); an explicit list is what llama.cpp then uses.
    """
    if not _added:
        return None
    from marco_gguf.runtime.placement import _ggml

    lib = _ggml()
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    rpc, gpus = [], []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) != 1:  # GGML_BACKEND_DEVICE_TYPE_GPU (RPC workers count as GPUs)
            continue
        is_rpc = lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)) == b"RPC"
        (rpc if is_rpc else gpus).append(dev)
    devices = rpc + gpus
    return (ctypes.c_void_p * (len(devices) + 1))(*devices, None)


def install_abort_message() -> None:
    """Make a ggml abort (GGML_ABORT: a lost RPC worker, a failed assertion) one line and exit code 1."""
    global _abort_callback
    if _abort_callback is not None:
        return
    from marco_gguf.ggml_library import ggml_base

    proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

    def on_abort(message: bytes | None) -> None:
        text = (message or b"").decode(errors="replace").strip().splitlines()
        line = text[-1] if text else "llama.cpp aborted"
        hint = f" (RPC workers: {', '.join(_added)}; one of them stopped answering?)" if _added else ""
        try:
            sys.stderr.write(f"error: llama.cpp stopped: {line}{hint}\n")
            sys.stderr.flush()
        finally:
            os._exit(1)

    _abort_callback = proto(on_abort)
    base = ggml_base()
    base.ggml_set_abort_callback.restype = ctypes.c_void_p
    base.ggml_set_abort_callback.argtypes = [proto]
    base.ggml_set_abort_callback(_abort_callback)


def is_loopback_host(host: str) -> bool:
    """localhost or an address in 127.0.0.0/8 or ::1: reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int) -> None:
    """Bind once to say 'port in use' clearly; ggml's server only prints that it failed."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise MarcoError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve_worker(host: str, port: int, threads: int, cache_dir: str | None = None) -> None:
    """Run an RPC worker on this machine's CPU until the process ends (blocks; call it from a thread).

    cache_dir lets the worker keep tensors it was sent, so a client that loads the same model again
    sends hashes instead of weights (llama.cpp's rpc-server -c).
    """
    if threads < 1:
        raise MarcoError(f"--threads must be at least 1, got {threads}")
    check_listen(host, port)
    lib = _lib()
    lib.ggml_backend_dev_by_type.restype, lib.ggml_backend_dev_by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
    cpu = lib.ggml_backend_dev_by_type(0)
    if not cpu:
        raise MarcoError("llama.cpp has no CPU device")
    start = _rpc_function("ggml_backend_rpc_start_server", None,
                          [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.POINTER(ctypes.c_void_p)])
    devices = (ctypes.c_void_p * 1)(cpu)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devices)
    raise MarcoError(f"the RPC worker on {endpoint} stopped (llama.cpp printed why above)")
