"""``streamtotal info``: what this install computes with — versions, devices, kernel path, optional extras."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform

EXTRAS = {
    "s3": ("s3fs", "s3:// stores and run directories"),
    "soma": ("tiledbsoma", "TileDB-SOMA Experiments"),
    "lamin": ("lamindb", "lamin:// collections"),
    "mudata": ("mudata", ".h5mu ingest, TOTALVI.setup_mudata"),
    "evaluate": ("scib_metrics", "streamtotal evaluate"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show versions, devices, which likelihood kernels are in use and which extras are installed",
        description="Shows what this install computes with: streamtotal, Python and torch versions, the devices "
        "torch sees, whether the compiled CPU kernels are in use (or the torch operations, and why), and which "
        "optional extras are installed.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run)


def collect() -> dict:
    """The facts ``streamtotal info`` shows, as a JSON-able dict."""
    import torch

    from streamtotal import __version__
    from streamtotal.model import native

    cuda = torch.cuda.is_available()
    return {
        "streamtotal": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_threads": torch.get_num_threads(),
        "kernels": native.describe(),
        "extras": {name: importlib.util.find_spec(module) is not None for name, (module, _) in EXTRAS.items()},
    }


def run(args: argparse.Namespace) -> None:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=1))
        return
    print(f"streamtotal {facts['streamtotal']} (python {facts['python']}, torch {facts['torch']})")
    devices = ", ".join(facts["cuda_devices"]) or "none"
    print(f"CUDA: {'torch built with CUDA ' + facts['torch_cuda_build'] if facts['torch_cuda_build'] else 'CPU-only torch build'}; GPUs: {devices}")
    print(f"CPU threads: {facts['cpu_threads']}")
    print(f"likelihood kernels: {facts['kernels']}")
    for name, (module, enables) in EXTRAS.items():
        state = "installed" if facts["extras"][name] else f"not installed (pip install 'streamtotal[{name}]')"
        print(f"extra [{name}] ({enables}): {state}")
