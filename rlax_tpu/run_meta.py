"""Run metadata in the store: the model architecture and the tokenizer files.

The trainer decides both (a trained tokenizer fixes the vocabulary, a Hugging Face checkpoint
fixes the architecture) and writes them once into the run's store. Workers and the evaluator read
them from there, so a worker on another machine needs nothing but the store URL and the config:
no shared filesystem, no copy of the checkpoint or tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from rlax_tpu.kvstore import KVStore
from rlax_tpu.store_layout import MODEL_KEY, TOKENIZER_PREFIX


def local_dir(workdir: str) -> str:
    """Where a role keeps host-local files (tokenizer cache, metrics, eval records): the workdir
    itself, or a directory under /tmp for a gs:// workdir."""
    if workdir.startswith("gs://"):
        return os.path.join("/tmp/rlax_tpu", workdir[len("gs://"):].strip("/").replace("/", "_"))
    return workdir


class MetaError(RuntimeError):
    """Run metadata is missing, corrupt, or inconsistent with the config."""


def write_model_config(kv: KVStore, model_cfg) -> None:
    """Writes the architecture once; a different one already there is an error (another run?)."""
    raw = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True).encode()
    if kv.create(MODEL_KEY, raw):
        return
    existing = kv.get(MODEL_KEY)
    if existing is not None and json.loads(existing) != json.loads(raw):
        raise MetaError(
            f"{kv.url}{MODEL_KEY} describes another model than this trainer's; the store belongs to a "
            "different run (use a fresh workdir or store.url)")


def read_model_config(kv: KVStore):
    from rlax_tpu.models import ModelConfig

    raw = kv.get(MODEL_KEY)
    if raw is None:
        return None
    try:
        return ModelConfig(**json.loads(raw))
    except (ValueError, TypeError) as e:
        raise MetaError(f"{kv.url}{MODEL_KEY} is corrupt: {e}") from e


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files that reconstruct ``tokenizer``, by relative path (a Hugging Face or GGUF-converted
    tokenizer: tokenizer.json, tokenizer_config.json with the chat template, template files)."""
    if hasattr(tokenizer, "files"):
        return tokenizer.files()
    path = getattr(tokenizer, "path", None)
    if not path:
        return {"spm.model": tokenizer.sp.serialized_model_proto()}
    with open(path, "rb") as f:
        return {os.path.basename(path): f.read()}


def write_tokenizer(kv: KVStore, tokenizer) -> None:
    for name, data in tokenizer_files(tokenizer).items():
        key = TOKENIZER_PREFIX + name
        if not kv.create(key, data) and kv.get(key) != data:
            raise MetaError(f"{kv.url}{key} holds another tokenizer than this trainer's")


def stored_tokenizer_files(kv: KVStore) -> dict[str, bytes]:
    """The tokenizer's files as the trainer stored them, by relative path."""
    return {key[len(TOKENIZER_PREFIX):]: kv.get(key) for key in kv.list(TOKENIZER_PREFIX)}


def read_tokenizer(kv: KVStore, config, cache_dir: str):
    """Rebuilds the run's tokenizer from the store into ``cache_dir``; None if not written yet."""
    import shutil

    from rlax_tpu.tokenizer.hf import CONFIG_FILE, TEMPLATE_DIR, TEMPLATE_FILE, HFTokenizer
    from rlax_tpu.tokenizer.spm import SentencePieceTokenizer

    keys = kv.list(TOKENIZER_PREFIX)
    if not keys:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    names = [key[len(TOKENIZER_PREFIX):] for key in keys]
    # Side files left by another run's tokenizer would be read as this one's chat template.
    for side in (CONFIG_FILE, TEMPLATE_FILE, TEMPLATE_DIR):
        stale = os.path.join(cache_dir, side)
        if not any(n == side or n.startswith(side + "/") for n in names):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.exists(stale):
                os.unlink(stale)
    paths = {}
    for key, name in zip(keys, names, strict=True):
        if name.startswith("/") or ".." in name.split("/"):
            raise MetaError(f"{kv.url}{key}: tokenizer file name escapes the cache directory")
        paths[name] = os.path.join(cache_dir, *name.split("/"))
        os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
        with open(paths[name], "wb") as f:
            f.write(kv.get(key))
    c = config.tokenizer
    if "spm.model" in paths or any(n.endswith(".model") for n in paths):
        model = next(p for n, p in paths.items() if n.endswith(".model"))
        return SentencePieceTokenizer(model, c.prompt_template, c.system_prompt)
    json_file = paths.get("tokenizer.json") or next(
        (p for n, p in paths.items() if n.endswith(".json") and "/" not in n and n != CONFIG_FILE), None)
    if json_file is None:
        raise MetaError(f"{kv.url}{TOKENIZER_PREFIX} has no tokenizer file: {sorted(paths)}")
    return HFTokenizer(json_file, c.bos_token, c.eos_token, c.pad_token, c.prompt_template, c.system_prompt,
                       bool(c.use_chat_template))


def wait_for_meta(kv: KVStore, config, cache_dir: str, timeout_s: float, poll_s: float = 1.0,
                  log=None):
    """Blocks until the trainer has written the model config and tokenizer; returns both."""
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        model_cfg = read_model_config(kv)
        tok = read_tokenizer(kv, config, cache_dir) if model_cfg is not None else None
        if model_cfg is not None and tok is not None:
            return model_cfg, tok
        if time.monotonic() > deadline:
            raise MetaError(f"no run metadata in {kv.url} after {timeout_s:.0f}s: is the trainer running "
                            "with the same store.url?")
        if log is not None and not announced:
            log("waiting for the trainer to write the model config and tokenizer to the store")
            announced = True
        time.sleep(poll_s)
