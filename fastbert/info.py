"""`python -m fastbert.info`: versions, which backends are built and which are usable here, devices."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

import torch


def package_version(dist: str) -> str:
    """Installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything `main` prints, as a dict (also used by the benchmarks' CSV metadata)."""
    from fastbert import __version__, ops

    info = {
        "fastbert": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "default_backend": ops.get_backend(),
    }
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    backends = {}
    for name in ops.BACKENDS:
        reason = ops._why_not(name, "fastbert.attention", device,
                              dict(dtype=torch.float16, head_dim=64, dropout_p=0.0, causal=False,
                                   has_mask=True))
        backends[name] = {"usable": reason is None, "reason": reason}
    from fastbert import cuda
    info["cuda_extension"] = cuda.extension_info()
    info["backends"] = backends
    info["auto_order"] = auto_order(device)
    from fastbert import cpu, cpu_layer_norm, cpu_train, varlen
    info["cpu_inference"] = cpu.describe()
    info["cpu_training"] = cpu_train.describe()
    info["cpu_attention"] = varlen.describe_cpu()
    info["cpu_layer_norm"] = cpu_layer_norm.describe()
    return info


def auto_order(device: torch.device) -> dict:
    """{target: {op: [(backend, why)]}}: the order `auto` tries backends in on this device, and
    on each GPU family when there is no GPU here (what a GPU run would do, and why)."""
    from fastbert import backend_order

    targets = {}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        targets[f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"] = (device, None)
    else:
        targets[f"this machine ({device.type})"] = (device, None)
        for name, capability in (("sm_90 (Hopper) GPU", (9, 0)), ("sm_80 (Ampere) GPU", (8, 0))):
            targets[name] = (torch.device("cuda"), capability)
    return {name: {op: backend_order.order(op, dev, capability=capability)
                   for op in backend_order.OPS}
            for name, (dev, capability) in targets.items()}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastbert.info", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="say why auto tries the backends in its order, on each target")
    args = parser.parse_args(argv)
    info = collect()
    print(f"fastbert {info['fastbert']}  (python {info['python']}, {sys.platform})")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
          f"transformers {info['transformers']}")
    if info["devices"]:
        print("devices: " + ", ".join(info["devices"]))
        _print_backends(info)
        _print_auto_order(info, args.verbose)
        print(info["cpu_inference"])
        print(info["cpu_training"])
        return 0
    # a CPU-only machine: what runs here first, then what a GPU would do, briefly
    print("this machine: CPU only (no CUDA device)")
    print("  runs here: every op, the model, patch_hf, training, the CLI and SentenceEncoder, on the "
          "torch backend")
    print("  " + info["cpu_inference"])
    print("  " + info["cpu_training"])
    print("  " + info["cpu_attention"])
    print("  " + _cpu_dtypes())
    print("  Triton kernels run on CPU only under TRITON_INTERPRET=1 (a test tier; slow)")
    print(f"default backend: {info['default_backend']}")
    print("on a GPU (not here):")
    ext = info["cuda_extension"]
    print("  " + (f"CUDA extension fastbert._C: built for {', '.join(ext.get('archs', []))} "
                  f"(CUDA {ext.get('cuda_version', '?')})" if ext.get("built")
                  else f"CUDA extension fastbert._C: not built ({ext.get('error')})"))
    _print_auto_order(info, args.verbose, skip_here=True)
    return 0


def _cpu_dtypes() -> str:
    """Which dtypes the model runs in on this CPU (SentenceEncoder's and the CLI's --dtype)."""
    from fastbert import cpu

    native, why = cpu.bf16_support()
    bf16 = ("bf16 too (native bf16 dot products): SentenceEncoder dtype=\"bf16\", fastbert embed "
            "--dtype bf16, --precision bf16" if native else f"bf16 not offered ({why})")
    return f"dtypes: fp32; {bf16}; fp16 needs a GPU"


def _print_backends(info) -> None:
    ext = info["cuda_extension"]
    if ext.get("built"):
        print(f"CUDA extension fastbert._C: built for {', '.join(ext.get('archs', []))} "
              f"(CUDA {ext.get('cuda_version', '?')})")
    else:
        print(f"CUDA extension fastbert._C: not built ({ext.get('error')})")
    print(f"default backend: {info['default_backend']}")
    for name, b in info["backends"].items():
        status = "usable here" if b["usable"] else f"not usable here: {b['reason']}"
        print(f"  backend {name:6s} {status}")


def _print_auto_order(info, verbose: bool, skip_here: bool = False) -> None:
    for target, ops in info["auto_order"].items():
        if skip_here and target.startswith("this machine"):
            continue
        print(f"  auto tries, on {target}: " + "; ".join(
            f"{op.removeprefix('fastbert.')} {' > '.join(backend for backend, _ in order)}"
            for op, order in ops.items()))
        if verbose:
            for op, order in ops.items():
                for backend, why in order:
                    print(f"    {op} {backend}: {why}")
    if not verbose:
        print("  (--verbose says why, per op and backend)")


if __name__ == "__main__":
    sys.exit(main())
