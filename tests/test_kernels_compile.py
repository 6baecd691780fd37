"""The Triton kernels compile for real GPUs (sm_80 and sm_90), with no GPU and under the interpreter.

Every other test runs the kernels under the Triton interpreter (TRITON_INTERPRET=1), which never
runs the GPU compiler: a kernel can pass them all and still fail to compile, spill registers or
fall back to 32-bit loads on a GPU. This module compiles each kernel the way a launch would:

1. Kernels: every @triton.jit function found by walking the `dancegrpo_fast.kernels` package. A
   kernel that no op launches in the scenarios below fails the test (so a new kernel cannot be
   missed).
2. Launches: the public ops (`fused_step_loss` + backward, `step_log_prob` + backward, `sde_step`
   with noise, seeds or none) run on CPU tensors with each kernel replaced by a recorder and the
   wrappers' `target_programs` seeing a CUDA device with the GPU's multiprocessor count (108 on an
   A100 for sm_80, 132 on an H100/H200 for sm_90). Model output fp32/bf16/fp16 x latents fp32/bf16,
   with and without a reference output, on- and off-policy, at the tiny (4x16x32x32), FLUX 720px
   (12x16x90x90) and HunyuanVideo 480px 53-frame (2x16x14x60x60) shapes.
3. Specialization: each recorded launch goes through Triton's own JIT binder
   (`create_function_from_signature` + `JITFunction._pack_args`, as `JITFunction.run` does) for
   the target, giving the signature, constexprs and attributes (`tt.divisibility` 16 for 16-byte
   aligned pointers and ints divisible by 16; ints equal to 1 become constexprs) that a launch on
   that GPU gets. Tensors are described by dtype and byte offset into their allocation (CUDA
   allocations are 512-byte aligned), so views such as the wrappers' slices of one small buffer keep
   their real alignment. The test's own copy of those rules must agree with the JIT's; it is used
   alone where a Triton version lacks those internals.
4. Compilation: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` for each
   distinct specialization, in parallel subprocesses with TRITON_INTERPRET=0, a fresh Triton cache
   and TRITON_DUMP_PTXAS_LOG=1 (so ptxas -v reports registers, stack frame and spill bytes), plus
   `cuobjdump -res-usage`. SASS: the wheel's `nvdisasm -b SMxy` reads the concatenated machine code
   of all kernels of an arch in one run (its start-up dominates a per-cubin run); the largest
   specialization of each kernel is also disassembled from its cubin and must read the same.

Checks: every specialization compiles; no spills (ptxas spill stores/loads 0, no local memory; a
stack frame without spills, e.g. libdevice's sin/cos slow path in tl.randn on Triton 3.6, is
reported but allowed); shared memory within the per-block limit of the arch; the main loop (the
longest backward branch) of each streaming kernel issues only 128-bit global loads when all its
tensors are float32, and at least 64-bit ones otherwise (libdevice's constant-table reads aside).

`pytest -s` prints the table; DANCEGRPO_KERNEL_TABLE=path also writes it to a file. With a CUDA
device, `test_real_launch_matches_recorded_specialization` checks the recording against real
launches (benchmarks/gpu_check.sh runs it).
"""
from __future__ import annotations

import bisect
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace

KERNEL_PACKAGE = "dancegrpo_fast.kernels"
# name -> (compute capability, multiprocessors of the GPU it stands for, max shared memory per block
# in bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin, what Triton checks a launch against)
ARCHS = {
    "sm_80": (80, 108, 163 * 1024),   # A100
    "sm_90": (90, 132, 227 * 1024),   # H100 / H200
}
SHAPES = {
    "tiny": (4, 16, 32, 32),
    "flux720": (12, 16, 90, 90),
    "hunyuan480": (2, 16, 14, 60, 60),
}
STREAMING_KERNELS = ("_partials_kernel", "_grad_kernel", "_sde_step_kernel")
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
               "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8",
               "bool": "i1"}
TABLE_ENV = "DANCEGRPO_KERNEL_TABLE"
WORKER_FLAG = "--compile-worker"


# ------------------------------------------------------------------------------------------------
# SASS and resource-usage parsing (used by the compile workers)
# ------------------------------------------------------------------------------------------------

# opcodes whose last operand is a code address (printed as a label from a cubin); the check
# test_batched_disassembly_matches_the_cubin fails if a kernel uses another one
CODE_ADDRESS_OPCODES = ("BRA", "CALL", "JMP", "BSSY", "SSY", "PBK", "PCNT", "BRX", "JMX")
_INSTR = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def access_width(opcode: str) -> int:
    """Bits per thread of an LDG/STG: LDG.E.128 -> 128, LDG.E.64 -> 64, LDG.E.U16 -> 16, LDG.E -> 32."""
    parts = opcode.split(".")[1:]
    for part, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if part in parts:
            return bits
    return 32


def parse_instructions(text: str):
    """nvdisasm output -> [(address, instruction, branch target or None)]. Branch targets are
    labels with `nvdisasm -c` on a cubin and addresses with `nvdisasm -b SMxy` on raw code."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        instrs.append((addr, re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2).strip())))
    out = []
    for addr, body in instrs:
        target = None
        t = _BRANCH_TARGET.search(body)
        if t:  # any instruction with a label operand (a cubin's branches, calls, convergence points)
            target = labels.get(t.group(1))
        elif body.split()[0].startswith(CODE_ADDRESS_OPCODES):  # raw code: the target's address
            t = re.search(r"\b0x([0-9a-fA-F]+)\s*$", body)
            target = int(t.group(1), 16) if t else None
        out.append((addr, body, target))
    return out


def analyze_sass(instrs) -> dict:
    """Global loads/stores (width, in the main loop or not) and local-memory traffic of one kernel.
    The main loop is the backward branch spanning the most code."""
    loops = [(target, addr) for addr, body, target in instrs
             if target is not None and target <= addr and body.split()[0].startswith("BRA")]
    main = max(loops, key=lambda r: r[1] - r[0]) if loops else None
    out = {"main_loop": main, "n_instr": len(instrs), "ldg": [], "stg": [], "local": 0}
    for addr, body, _ in instrs:
        op = body.split()[0]
        in_loop = main is not None and main[0] <= addr <= main[1]
        if op.startswith("LDG"):
            out["ldg"].append({"bits": access_width(op), "loop": in_loop, "constant": ".CONSTANT" in op,
                               "op": op})
        elif op.startswith("STG"):
            out["stg"].append({"bits": access_width(op), "loop": in_loop, "op": op})
        elif op.startswith(("LDL", "STL")):
            out["local"] += 1
    return out


def elf_section(data: bytes, name: str) -> bytes:
    """The bytes of section `name` of a (64-bit little-endian) cubin."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        start = strtab + sh_name
        if data[start:data.index(b"\0", start)].decode() == name:
            return data[offset:offset + size]
    raise KeyError(f"no section {name} in the cubin")


def parse_resource_usage(text: str) -> dict:
    """`cuobjdump -res-usage`: REG, STACK, SHARED, LOCAL of the (single) function."""
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m:
            usage[key.lower()] = int(m.group(1))
    return usage


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found in the Triton wheel ({path}) or on PATH")
    return found


# ------------------------------------------------------------------------------------------------
# Compile worker: runs as `python tests/test_kernels_compile.py --compile-worker DIR` with
# TRITON_INTERPRET=0, claims jobs from DIR/jobs.json one at a time, writes DIR/result.<i>.json
# ------------------------------------------------------------------------------------------------

def _decode_path_dict(items) -> dict:
    return {tuple(k): v for k, v in items}


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(text: str):
    """`ptxas -v` (Triton prints it with TRITON_DUMP_PTXAS_LOG=1): registers, stack, spills."""
    frame, regs = _PTXAS_FRAME.search(text), _PTXAS_REGS.search(text)
    if not frame or not regs:
        return None
    return {"reg": int(regs.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def compile_job(job: dict, scratch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = getattr(importlib.import_module(job["module"]), job["name"])
    target = GPUTarget("cuda", job["capability"], 32)
    backend = make_backend(target)
    options = backend.parse_options(dict(job["options"]))
    src = ASTSource(fn, dict(job["signature"]), _decode_path_dict(job["constexprs"]),
                    _decode_path_dict(job["attrs"]))
    log = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(log):  # the ptxas -v log (fresh cache dir: ptxas always runs)
        kernel = triton.compile(src, target=target, options=options.__dict__)
    compile_seconds = time.perf_counter() - started
    cubin = os.path.join(scratch, f"{job['id']}.cubin")
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True)
    return {"shared": int(kernel.metadata.shared), "usage": parse_resource_usage(res.stdout),
            "ptxas": parse_ptxas_log(log.getvalue()), "cubin": cubin, "name": kernel.metadata.name,
            "compile_seconds": compile_seconds}


def _worker_main(workdir: str) -> int:
    with open(os.path.join(workdir, "jobs.json")) as f:
        jobs = json.load(f)
    scratch = os.path.join(workdir, "cubins")
    os.makedirs(scratch, exist_ok=True)
    for i, job in enumerate(jobs):
        try:  # claim job i (exactly one worker gets it)
            os.close(os.open(os.path.join(workdir, f"claim.{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        started = time.perf_counter()
        try:
            result = {"ok": True, **compile_job(job, scratch)}
        except Exception as exc:  # reported by the test, with the compiler's message
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:],
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = time.perf_counter() - started
        tmp = os.path.join(workdir, f"result.{i}.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, os.path.join(workdir, f"result.{i}.json"))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == [WORKER_FLAG]:
    os.environ["TRITON_INTERPRET"] = "0"
    sys.exit(_worker_main(sys.argv[2]))


# ------------------------------------------------------------------------------------------------
# The test process
# ------------------------------------------------------------------------------------------------

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _is_jit(obj) -> bool:
    if isinstance(obj, JITFunction):
        return True
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(obj, InterpretedFunction)


def discover_kernels() -> dict:
    """'module:name' -> the @triton.jit object, for every one defined in the kernels package."""
    package = importlib.import_module(KERNEL_PACKAGE)
    modules = [package] + [importlib.import_module(info.name) for info in
                           pkgutil.walk_packages(package.__path__, KERNEL_PACKAGE + ".")]
    found = {}
    for module in modules:
        for name, obj in vars(module).items():
            if _is_jit(obj) and getattr(obj.fn, "__module__", None) == module.__name__:
                found[f"{module.__name__}:{name}"] = obj
    return found


_JIT_CACHE: dict = {}


def as_jit_function(obj) -> JITFunction:
    """The JITFunction a launch would use (built from the Python function when interpreted)."""
    if isinstance(obj, JITFunction):
        return obj
    key = id(obj)
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = JITFunction(obj.fn, **getattr(obj, "kwargs", {}))
    return _JIT_CACHE[key]


# --- recording launches ---------------------------------------------------------------------------

CUDA_ALLOCATION_BASE = 1 << 20  # any 512-byte aligned address, as the CUDA caching allocator gives


@dataclass(frozen=True)
class DevicePointer:
    """A tensor argument as the JIT's specialization sees it: dtype and address."""
    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address

    @staticmethod
    def of(t: torch.Tensor) -> "DevicePointer":
        # the allocation's own base is 512-byte aligned on CUDA; the view's offset is what it is
        return DevicePointer(t.dtype, CUDA_ALLOCATION_BASE + t.storage_offset() * t.element_size())


def describe(value):
    return DevicePointer.of(value) if isinstance(value, torch.Tensor) else value


@dataclass
class Launch:
    kernel: str                 # 'module:name'
    args: tuple
    kwargs: dict
    grid: tuple
    labels: set = field(default_factory=set)


class _Recorder:
    def __init__(self, key, sink, real=None):
        self.key, self.sink, self.real = key, sink, real

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = Launch(self.key, tuple(describe(a) for a in args),
                         {k: describe(v) for k, v in kwargs.items()}, tuple(grid))
            if self.real is not None:  # a real launch on a GPU: keep what the JIT compiled
                compiled = self.real[grid](*args, **kwargs)
                rec.compiled = compiled
            self.sink.append(rec)
            return getattr(rec, "compiled", None)
        return launch


@contextlib.contextmanager
def recording(kernels: dict, multiprocessors=None, real=False):
    """Replace every kernel with a recorder; with `multiprocessors`, the wrappers size their grids
    for a CUDA device with that many multiprocessors. Yields the list of launches."""
    from dancegrpo_fast import ops

    sink = []
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        for key, fn in kernels.items():
            module_name, name = key.split(":")
            patch(importlib.import_module(module_name), name, _Recorder(key, sink, fn if real else None))
        if not real:
            patch(ops, "resolve_backend", lambda device, backend=None: "triton")
        if multiprocessors is not None:
            fake_props = SimpleNamespace(multi_processor_count=multiprocessors)
            patch(torch.cuda, "get_device_properties", lambda device=None: fake_props)
            for module in {importlib.import_module(k.split(":")[0]) for k in kernels}:
                original = getattr(module, "target_programs", None)
                if callable(original):
                    patch(module, "target_programs",
                          lambda device, batch, _orig=original: _orig(torch.device("cuda"), batch))
        yield sink
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def run_ops(shape, model_dtype, latent_dtype, device="cpu", label=lambda s: None):
    """Every op the package launches kernels from, once per variant. `label(text)` is called before
    each so that the launches can be attributed."""
    from dancegrpo_fast import dance_coefficients, fused_step_loss, ode_coefficients, sde_step, step_log_prob

    batch = shape[0]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(dtype):  # the values matter only on a GPU, where the kernels really run
        if torch.device(device).type == "cpu":
            return torch.empty(shape, dtype=dtype)
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    sigma = torch.linspace(0.9, 0.3, batch, dtype=torch.float64)
    coeffs = dance_coefficients(sigma, sigma - 0.05, 0.3, batch, device=device)
    v, vref = randn(model_dtype), randn(model_dtype)
    x, xn = randn(latent_dtype), randn(latent_dtype)
    old = torch.zeros(batch, device=device)
    adv = torch.linspace(-1.0, 1.0, batch, device=device)
    for with_ref in (False, True):
        for on_policy in (True, False):
            label(f"loss/{'ref' if with_ref else 'noref'}/{'on' if on_policy else 'off'}")
            v1 = v.clone().requires_grad_()
            out = fused_step_loss(v1, x, xn, coeffs, None if on_policy else old, adv, clip_range=0.01,
                                  ref_model_output=vref if with_ref else None,
                                  kl_beta=0.01 if with_ref else 0.0)
            out.loss.backward()
    label("logprob")
    v1 = v.clone().requires_grad_()
    step_log_prob(v1, x, xn, coeffs).sum().backward()
    label("sde/noise")
    sde_step(v, x, coeffs, noise=randn(latent_dtype))
    label("sde/seeds")
    sde_step(v, x, coeffs, seeds=torch.arange(batch, dtype=torch.int64) + 7, step_index=3)
    label("sde/ode")
    sde_step(v, x, ode_coefficients(sigma, sigma - 0.05, batch, device=device))


def dtype_name(dtype: torch.dtype) -> str:
    return SHORT_DTYPE.get(str(dtype).replace("torch.", ""), str(dtype))


def record_all(kernels: dict) -> dict:
    """arch -> launches over every shape, dtype pair and op variant, for that arch's GPU."""
    per_arch = {}
    for arch, (_, multiprocessors, _) in ARCHS.items():
        launches = []
        for shape_name, shape in SHAPES.items():
            for model_dtype in (torch.float32, torch.bfloat16, torch.float16):
                for latent_dtype in (torch.float32, torch.bfloat16):
                    marks = []
                    with recording(kernels, multiprocessors) as sink:
                        run_ops(shape, model_dtype, latent_dtype, label=lambda text: marks.append((len(sink), text)))
                    bounds = marks + [(len(sink), None)]
                    for (start, text), (end, _) in zip(bounds, bounds[1:]):
                        for rec in sink[start:end]:
                            rec.labels.add((text, f"v={dtype_name(model_dtype)}", f"x={dtype_name(latent_dtype)}",
                                            shape_name))
                    launches.extend(sink)
        per_arch[arch] = launches
    return per_arch


# --- specialization, as Triton's JIT builds it -------------------------------------------------------

def _normalize(signature, constexprs, attrs):
    sig = {k: str(v) for k, v in signature.items()}
    const = {tuple(k): v for k, v in constexprs.items()}
    att = {tuple(k): [list(a) for a in v] for k, v in attrs.items() if v}
    return sig, const, att


def own_specialization(fn, args, kwargs):
    """The JIT's rules (triton/runtime/jit.py + native specialize_impl, Triton 3.6-3.9), restated."""
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(inspect.signature(fn.fn).parameters.items()):
        value = bound.arguments[name]
        kp = fn.params[i]
        specialize = not kp.do_not_specialize
        align = specialize and not getattr(kp, "do_not_specialize_on_alignment", False)
        if "constexpr" in str(param.annotation):
            signature[name], constexprs[(i,)] = "constexpr", value
        elif value is None:
            signature[name], constexprs[(i,)] = "constexpr", None
        elif hasattr(value, "data_ptr"):
            signature[name] = "*" + dtype_name(value.dtype)
            if align and value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if specialize and value == 1:
                signature[name], constexprs[(i,)] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            if align and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: no specialization rule for {type(value).__name__}")
    return signature, constexprs, attrs


def jit_specialization(fn, backend, args, kwargs):
    """What JITFunction.run computes before compiling: (signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs


@dataclass
class Job:
    id: int
    kernel: str
    arch: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    labels: set = field(default_factory=set)
    result: dict = None

    def spec_key(self):
        return (self.kernel, self.arch, json.dumps(self.signature, sort_keys=True),
                repr(sorted(self.constexprs.items())), repr(sorted(self.attrs.items())),
                json.dumps(self.options, sort_keys=True))

    def to_json(self):
        module, name = self.kernel.split(":")
        return {"id": self.id, "module": module, "name": name, "capability": ARCHS[self.arch][0],
                "signature": self.signature, "constexprs": [[list(k), v] for k, v in self.constexprs.items()],
                "attrs": [[list(k), v] for k, v in self.attrs.items()], "options": self.options}


def build_jobs(kernels: dict, launches: dict):
    """Distinct specializations (dedupe) and the disagreements between the JIT and own rules."""
    jobs, by_key, disagreements, mode = [], {}, [], "Triton JIT binder"
    for arch, recs in launches.items():
        backend = make_backend(GPUTarget("cuda", ARCHS[arch][0], 32))
        for rec in recs:
            fn = as_jit_function(kernels[rec.kernel])
            param_names = list(inspect.signature(fn.fn).parameters)
            options = {k: v for k, v in rec.kwargs.items() if k not in param_names}
            own = _normalize(*own_specialization(fn, rec.args, rec.kwargs))
            try:
                jit = _normalize(*jit_specialization(fn, backend, rec.args, rec.kwargs))
            except (ImportError, AttributeError, TypeError) as exc:  # internals moved: own rules alone
                jit, mode = own, f"test's own rules (JIT binder unavailable: {type(exc).__name__})"
            if jit != own:
                disagreements.append((rec.kernel, arch, jit, own))
            signature, constexprs, attrs = jit
            job = Job(len(jobs), rec.kernel, arch, signature, constexprs, attrs, options)
            key = job.spec_key()
            if key not in by_key:
                by_key[key] = job
                jobs.append(job)
            by_key[key].labels |= rec.labels
    return jobs, disagreements, mode


# --- compiling in parallel -----------------------------------------------------------------------

def compile_all(jobs, workers=None):
    workers = workers or max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else os.cpu_count() or 1, 8))
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(importlib.import_module("dancegrpo_fast").__file__)))
    with tempfile.TemporaryDirectory(prefix="kernels_compile") as workdir:
        # A fresh Triton cache: every kernel really goes through ptxas, whose -v log gives spills.
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1",
                   TRITON_CACHE_DIR=os.path.join(workdir, "triton_cache"),
                   PYTHONPATH=os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH")) if p))
        with open(os.path.join(workdir, "jobs.json"), "w") as f:
            json.dump([job.to_json() for job in jobs], f)
        logs = [open(os.path.join(workdir, f"worker{i}.log"), "w+") for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG, workdir],
                                  env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
        for proc in procs:
            proc.wait(timeout=900)
        for job in jobs:
            path = os.path.join(workdir, f"result.{job.id}.json")
            if os.path.exists(path):
                with open(path) as f:
                    job.result = json.load(f)
            else:
                tails = []
                for proc, log in zip(procs, logs):
                    log.seek(0)
                    tails.append(f"worker exit {proc.returncode}: {log.read()[-2000:]}")
                job.result = {"ok": False, "error": "no result (worker died)\n" + "\n".join(tails)}
        for log in logs:
            log.close()
        checks = disassemble(jobs, workdir)
    return workers, checks


def _comparable(instrs, start=0):
    # branch operands print as labels from a cubin and as addresses from raw code: compare targets
    return [(a - start, body.split()[0] if t is not None else body, None if t is None else t - start)
            for a, body, t in instrs]


def disassemble(jobs, workdir):
    """SASS of every compiled kernel: one `nvdisasm -b SMxy` run per arch over the concatenated
    machine code (.text sections) of all its kernels, as nvdisasm's start-up is most of its cost
    per cubin. Returns, per arch, whether one kernel's slice equals `nvdisasm -c` of its cubin."""
    checks = {}
    for arch, (capability, _, _) in ARCHS.items():
        done = [j for j in jobs if j.arch == arch and j.result.get("ok")]
        if not done:
            continue
        blob, spans = bytearray(), []
        for job in done:
            with open(job.result["cubin"], "rb") as f:
                text = elf_section(f.read(), ".text." + job.result["name"])
            spans.append((job, len(blob), len(blob) + len(text)))
            blob += text
        raw = os.path.join(workdir, f"code_{arch}.bin")
        with open(raw, "wb") as f:
            f.write(blob)
        out = subprocess.run([_tool("nvdisasm"), "-b", f"SM{capability}", raw], capture_output=True, text=True)
        instrs = parse_instructions(out.stdout) if out.returncode == 0 else []
        addresses = [a for a, _, _ in instrs]
        for job, start, end in spans:
            if out.returncode == 0:
                lo, hi = bisect.bisect_left(addresses, start), bisect.bisect_left(addresses, end)
                job.result["sass"] = analyze_sass(_comparable(instrs[lo:hi], start))
            else:  # this nvdisasm cannot read raw code: one run per cubin
                one = subprocess.run([_tool("nvdisasm"), "-c", "-ndf", job.result["cubin"]], capture_output=True,
                                     text=True, check=True)
                job.result["sass"] = analyze_sass(_comparable(parse_instructions(one.stdout)))
        checks[arch] = {"raw_returncode": out.returncode, "raw_stderr": out.stderr[-2000:], "kernels": []}
        largest = {}  # the check: each kernel's largest specialization, disassembled from its cubin
        for job, start, end in spans:
            if end - start > largest.get(job.kernel, (None, 0, 0))[2] - largest.get(job.kernel, (None, 0, 0))[1]:
                largest[job.kernel] = (job, start, end)
        for job, start, end in largest.values() if out.returncode == 0 else ():
            direct = subprocess.run([_tool("nvdisasm"), "-c", "-ndf", job.result["cubin"]], capture_output=True,
                                    text=True, check=True)
            lo, hi = bisect.bisect_left(addresses, start), bisect.bisect_left(addresses, end)
            a, b = _comparable(parse_instructions(direct.stdout)), _comparable(instrs[lo:hi], start)
            diff = [(x, y) for x, y in zip(a, b) if x != y][:3]
            if len(a) != len(b):
                diff.append(("instructions", len(a), len(b)))
            checks[arch]["kernels"].append({"kernel": job.kernel, "job": job.id, "n_instr": hi - lo,
                                            "first_differences": diff})
    return checks


# --- checks and the table ------------------------------------------------------------------------

def streamed_loads(job):
    """Bit widths of the global loads in the main loop (libdevice's constant-table reads excluded)."""
    sass = job.result["sass"]
    return sorted({ld["bits"] for ld in sass["ldg"] if ld["loop"] and not ld["constant"]})


def all_fp32(job):
    return all(v == "*fp32" for v in job.signature.values() if v.startswith("*") and not v.startswith("*i"))


def resources(job):
    """Registers, stack frame and spill bytes: from the ptxas -v log, else (a Triton that does not
    print it) from cuobjdump, counting any stack, local memory or LDL/STL as a spill."""
    r = job.result
    if r.get("ptxas"):
        p = r["ptxas"]
        return {"reg": p["reg"], "stack": p["stack"], "spill": p["spill_stores"] + p["spill_loads"],
                "local": r["usage"].get("local", 0), "source": "ptxas"}
    u = r["usage"]
    return {"reg": u.get("reg"), "stack": u.get("stack", 0),
            "spill": u.get("stack", 0) + u.get("local", 0) + r["sass"]["local"], "local": u.get("local", 0),
            "source": "cuobjdump"}


def describe_spec(job, jobs_of_kernel):
    """The parts of the specialization that vary between this kernel's launches."""
    names = list(job.signature)
    varying = lambda get: len({get(j) for j in jobs_of_kernel}) > 1  # noqa: E731
    parts = []
    for i, name in enumerate(names):
        short = name[:-4] if name.endswith("_ptr") else name
        ty = job.signature[name]
        if ty == "constexpr":
            if varying(lambda j: repr(j.constexprs.get((i,)))):
                value = job.constexprs.get((i,))
                parts.append(f"{short}={int(value) if isinstance(value, bool) else value}")
            continue
        if varying(lambda j: j.signature[name]):
            parts.append(f"{short}:{ty.lstrip('*')}")
        if varying(lambda j: (i,) in j.attrs) and (i,) not in job.attrs:
            parts.append(f"{short}%16!=0")
    return " ".join(parts) or "-"


def make_table(jobs, mode, workers, seconds):
    by_kernel = defaultdict(list)
    for job in jobs:
        by_kernel[job.kernel].append(job)
    header = ("kernel", "specialization", "arch", "regs", "spill B", "stack B", "smem B", "LDG loop",
              "LDG max", "STG max", "launched by")
    rows = []
    for kernel in sorted(by_kernel):
        for job in sorted(by_kernel[kernel], key=lambda j: (describe_spec(j, by_kernel[kernel]), j.arch)):
            r = job.result
            ops = sorted({lab[0] for lab in job.labels})
            shapes = [s for s in SHAPES if any(lab[3] == s for lab in job.labels)]
            if not r.get("ok"):
                rows.append((kernel.split(":")[1], describe_spec(job, by_kernel[kernel]), job.arch,
                             "FAILED", "", "", "", "", "", "", ",".join(ops)))
                continue
            loop = "/".join(str(b) for b in streamed_loads(job)) or "-"
            rows.append((kernel.split(":")[1], describe_spec(job, by_kernel[kernel]), job.arch,
                         str(resources(job)["reg"]), str(resources(job)["spill"]), str(resources(job)["stack"]),
                         str(r["shared"]), loop,
                         str(max((x["bits"] for x in r["sass"]["ldg"]), default=0)),
                         str(max((x["bits"] for x in r["sass"]["stg"]), default=0)),
                         f"{','.join(ops)} @ {','.join(shapes)}"))
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [f"Triton {triton.__version__}: {len(jobs)} distinct specializations compiled in {seconds:.1f} s "
             f"({workers} workers); specialization from the {mode}",
             "regs, spill B (spill stores+loads), stack B: ptxas -v; smem B: shared memory; LDG loop: bit widths of "
             "the global loads in the main loop; LDG/STG max: widest global load/store in the kernel",
             fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    kernels: dict
    launches: dict
    jobs: list
    disagreements: list
    mode: str
    table: str
    disassembly_checks: dict


@pytest.fixture(scope="module")
def report():
    kernels = discover_kernels()
    launches = record_all(kernels)
    jobs, disagreements, mode = build_jobs(kernels, launches)
    started = time.perf_counter()
    workers, checks = compile_all(jobs)
    table = make_table(jobs, mode, workers, time.perf_counter() - started)
    print("\n" + table)
    if os.environ.get(TABLE_ENV):
        with open(os.environ[TABLE_ENV], "w") as f:
            f.write(table + "\n")
    return Report(kernels, launches, jobs, disagreements, mode, table, checks)


def _kernel_keys():
    try:
        return sorted(discover_kernels())
    except Exception:  # reported by test_every_kernel_is_launched instead
        return []


KERNELS = _kernel_keys()


def _jobs(report, kernel):
    return [j for j in report.jobs if j.kernel == kernel]


def _label(job):
    return f"{job.kernel.split(':')[1]} [{job.arch}] {sorted(job.labels)[0]}"


def test_every_kernel_is_launched(report):
    assert report.kernels, f"no @triton.jit kernel found in {KERNEL_PACKAGE}"
    for arch, launches in report.launches.items():
        launched = {rec.kernel for rec in launches}
        missing = sorted(set(report.kernels) - launched)
        assert not missing, (f"{arch}: these @triton.jit functions are never launched by the ops in run_ops(), "
                             f"so nothing checks that they compile: {missing}. Add their op to run_ops().")
    for name in STREAMING_KERNELS:
        assert any(k.endswith(":" + name) for k in report.kernels), f"streaming kernel {name} not found"


def test_recorded_specializations_match_triton_jit(report):
    if report.mode != "Triton JIT binder":
        pytest.skip(report.mode)
    assert not report.disagreements, "\n".join(
        f"{k} [{arch}]\n  JIT:  {jit}\n  rules: {own}" for k, arch, jit, own in report.disagreements[:5])


def test_batched_disassembly_matches_the_cubin(report):
    """The SASS read from the concatenated machine code is what nvdisasm reads from the cubin."""
    assert set(report.disassembly_checks) == set(ARCHS)
    for arch, check in report.disassembly_checks.items():
        assert check["raw_returncode"] == 0, f"{arch}: nvdisasm -b failed: {check['raw_stderr']}"
        assert {k["kernel"] for k in check["kernels"]} == set(report.kernels)
        for k in check["kernels"]:
            assert k["n_instr"] > 0 and not k["first_differences"], f"{arch}: raw-code SASS differs from the cubin's: {k}"


def test_shapes_reach_the_specializations(report):
    """The recorded launches are not all alike: chunk counts divisible by 16 and not (HunyuanVideo's
    394), pointers off 16-byte alignment (the small per-row views at B = 2), and the streamed
    tensors always 16-byte aligned with N and CHUNK divisible by 16, as 128-bit loads need."""
    for arch, launches in report.launches.items():
        finish = [rec for rec in launches if rec.kernel.endswith(":_finish_kernel")]
        chunk_counts = {rec.args[14] % 16 == 0 for rec in finish}
        assert chunk_counts == {True, False}, f"{arch}: NUM_CHUNKS % 16 == 0 is always {chunk_counts}"
        assert any(a.data_ptr() % 16 for rec in finish for a in rec.args if isinstance(a, DevicePointer)), \
            f"{arch}: no launch passes a pointer off 16-byte alignment"
        for rec in launches:
            if rec.kernel.endswith(":_partials_kernel") or rec.kernel.endswith(":_grad_kernel"):
                streamed = rec.args[:4] if rec.kernel.endswith("partials_kernel") else rec.args[1:5] + rec.args[9:10]
                n, chunk = (rec.args[8], rec.args[9]) if rec.kernel.endswith("partials_kernel") else rec.args[10:12]
                assert all(p.data_ptr() % 16 == 0 for p in streamed) and n % 16 == 0 and chunk % 16 == 0, rec


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_without_spills(report, kernel):
    jobs = _jobs(report, kernel)
    assert {j.arch for j in jobs} == set(ARCHS), f"{kernel} has no specialization for some arch"
    failed = [j for j in jobs if not j.result.get("ok")]
    assert not failed, f"{len(failed)} of {len(jobs)} specializations do not compile; first: {_label(failed[0])}\n" \
                       f"{failed[0].result.get('error')}\n{failed[0].result.get('traceback', '')}"
    for job in jobs:
        res = resources(job)
        assert res["reg"], f"{_label(job)}: unreadable resource usage {job.result['usage']}"
        assert res["spill"] == 0 and res["local"] == 0, (
            f"{_label(job)}: spills to local memory: {res['spill']} bytes of spill stores+loads "
            f"({res['source']}), {res['local']} bytes local, {res['reg']} registers")
        limit = ARCHS[job.arch][2]
        assert job.result["shared"] <= limit, (
            f"{_label(job)}: {job.result['shared']} bytes of shared memory, over the {limit} of {job.arch}")


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k.split(":")[1] in STREAMING_KERNELS])
def test_streaming_kernels_issue_wide_loads(report, kernel):
    for job in _jobs(report, kernel):
        if not job.result.get("ok"):
            pytest.fail(f"{_label(job)} did not compile (see test_kernel_compiles_without_spills)")
        sass = job.result["sass"]
        assert sass["main_loop"] is not None, f"{_label(job)}: no loop found in the SASS"
        widths = streamed_loads(job)
        assert widths, f"{_label(job)}: no global load in the main loop"
        need = 128 if all_fp32(job) else 64
        assert min(widths) >= need, (
            f"{_label(job)}: main-loop global loads of {widths} bits, want only {need}-bit "
            f"({'all tensors fp32' if need == 128 else '16-bit tensors'}); signature {job.signature}, "
            f"attrs {job.attrs}")


# --- on a GPU: the recording against real launches -------------------------------------------------

@pytest.mark.cuda
def test_real_launch_matches_recorded_specialization(report):
    """Launch the ops for real and compare what the JIT compiled with the CPU-side recording (the
    wrappers' grids and every argument's specialization) for this GPU's multiprocessor count, and
    the loaded kernels' registers and local memory with what the CPU-side compile reported."""
    from dancegrpo_fast import kernels as kernels_pkg

    if kernels_pkg.triton_mode() != "compiled":
        pytest.skip("Triton is interpreted in this process")
    kernels = discover_kernels()
    device = torch.device("cuda")
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major * 10 + minor}"
    backend = make_backend(GPUTarget("cuda", major * 10 + minor, 32))
    compiled_here = {job.spec_key(): job for job in report.jobs}
    mismatches, resources_differ, checked = [], [], 0
    for shape in SHAPES.values():
        for model_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for latent_dtype in (torch.float32, torch.bfloat16):
                with recording(kernels, multiprocessors) as fake:
                    run_ops(shape, model_dtype, latent_dtype)
                with recording(kernels, real=True) as real:
                    run_ops(shape, model_dtype, latent_dtype, device="cuda")
                torch.cuda.synchronize()
                assert len(fake) == len(real)
                for f, r in zip(fake, real):
                    fn = as_jit_function(kernels[f.kernel])
                    derived = _normalize(*jit_specialization(fn, backend, f.args, f.kwargs))
                    src = r.compiled.src
                    launched = _normalize(src.signature, src.constants, src.attrs)
                    checked += 1
                    if (f.kernel, f.grid, derived) != (r.kernel, r.grid, launched):
                        mismatches.append((shape, model_dtype, latent_dtype, f.kernel, f.grid, r.grid, derived, launched))
                        continue
                    job = compiled_here.get(Job(0, f.kernel, arch, *derived, {}).spec_key())
                    if job is None or not job.result.get("ok"):
                        continue  # a GPU other than sm_80 / sm_90
                    res = resources(job)
                    # Triton's n_spills is CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4: stack frame + spills
                    here = (res["reg"], (res["stack"] + res["local"]) // 4)
                    if (r.compiled.n_regs, r.compiled.n_spills) != here:
                        resources_differ.append((f.kernel, shape, model_dtype, latent_dtype,
                                                 (r.compiled.n_regs, r.compiled.n_spills), here))
    assert checked and not mismatches, f"{len(mismatches)} of {checked} launches differ; first: {mismatches[:1]}"
    assert not resources_differ, (f"{len(resources_differ)} loaded kernels differ from the CPU-side compile "
                                  f"(registers, local words): {resources_differ[:3]}")
