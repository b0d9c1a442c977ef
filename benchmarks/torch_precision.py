"""The precision PyTorch's attention math runs in, for the compute_precision field of torch_bench.py.

The input dtype alone does not say it: bf16 inputs may be upcast to f32, and f32 matrix products
may run on tensor cores (TF32, or CUTLASS's 3xTF32 in the memory-efficient kernel). The strings
follow longtape's: "bf16 tensor cores, f32 accumulation", "f32", "f64", "f32 (bf16 inputs upcast)".
"""
import warnings

_sdpa_kernels = {}  # (device, dtype, head_dim, causal) -> kernel name


def precision_text(dtype, device_type, kernel, allow_tf32=False, capability=(0, 0)):
    """dtype: the inputs' dtype name (f32, f64, bf16, f16); device_type: "cuda" or "cpu"; kernel:
    flash, efficient, flash_cpu or math (matmul and softmax in at least f32, as the reference
    path and PyTorch's math backend compute); allow_tf32: torch.backends.cuda.matmul.allow_tf32;
    capability: the GPU's compute capability."""
    if dtype == "f64":
        return "f64"
    low = dtype in ("bf16", "f16")
    if kernel == "math":
        work = "tf32 tensor cores, f32 accumulation" if device_type == "cuda" and allow_tf32 else "f32"
        return "%s (%s inputs upcast)" % (work, dtype) if low else work
    if device_type == "cuda":
        if low:
            return "%s tensor cores, f32 accumulation" % dtype
        if kernel == "efficient" and tuple(capability) >= (8, 0):
            return "f32 (3xTF32 tensor cores)"  # CUTLASS OpMultiplyAddFastF32: f32-level accuracy
        return "f32"
    return "%s inputs, f32 accumulation" % dtype if low else "f32"


def _only_backend(torch, name):
    """A context manager that lets scaled_dot_product_attention use only `name` (flash, efficient)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION if name == "flash" else SDPBackend.EFFICIENT_ATTENTION])
    except ImportError:  # PyTorch before 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=name == "flash", enable_math=False,
                                              enable_mem_efficient=name == "efficient")


def sdpa_kernel(torch, device, dtype, head_dim, causal):
    """The kernel public scaled_dot_product_attention runs for (B, H, L, head_dim) inputs: flash or
    efficient on CUDA, flash_cpu on the CPU, else math. Found by running a tiny case with one fused
    backend allowed at a time, in PyTorch's order of preference; cached per setting."""
    key = (str(device), dtype, head_dim, causal)
    if key in _sdpa_kernels:
        return _sdpa_kernels[key]
    found = "math"
    sdpa = getattr(torch.nn.functional, "scaled_dot_product_attention", None)
    if sdpa is not None:
        q = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype)
        for name in ("flash", "efficient") if device.type == "cuda" else ("flash",):
            try:
                with _only_backend(torch, name), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PyTorch explains each backend it cannot use
                    sdpa(q, q, q, is_causal=causal)
            except Exception:  # noqa: BLE001 - not eligible (or not built): try the next one
                continue
            found = name if device.type == "cuda" else "flash_cpu"
            break
    _sdpa_kernels[key] = found
    return found


def compute_precision(torch, device, dtype_name, kernel):
    """precision_text for a torch device, reading PyTorch's TF32 switch and the GPU's capability."""
    cuda = device.type == "cuda"
    return precision_text(dtype_name, device.type, kernel,
                          allow_tf32=cuda and bool(torch.backends.cuda.matmul.allow_tf32),
                          capability=torch.cuda.get_device_capability(device) if cuda else (0, 0))
