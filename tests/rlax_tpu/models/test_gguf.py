"""load_gguf: a real llama.cpp checkpoint (SmolLM2-135M-Instruct, Q4_1) against transformers' own
GGUF loader (logits, and greedy tokens and raw log-probs through our Engine), and tiny GGUF files
written here for every supported tensor type, for Qwen2/Qwen3, Llama 3 rope scaling, sharding and
bad files."""

from __future__ import annotations

import math
import os

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

from rlax_tpu import models, sharding
from rlax_tpu.models import CheckpointError
from rlax_tpu.models.layers import rope_inv_freq
from tests.helpers.checkpoints import smollm2_or_skip

# -- the real checkpoint ---------------------------------------------------------------------------
TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
        "capital of Germany. Water boils at one hundred degrees Celsius at sea level. In 1969, astronauts "
        "first walked on the Moon, and millions of people around the world watched it happen.")
CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
         "Explain in one sentence what a CPU does."]
EOS = 2
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def real():
    """(our model, cfg, transformers model, tokenizer) of the SmolLM2 GGUF."""
    import torch
    import transformers

    path = smollm2_or_skip()
    model, cfg = models.load(path)
    d, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    # One torch thread: on a small shared CPU, torch's intra-op threads wait on each other behind
    # other processes (measured: transformers' greedy generation here 40 s with 2 threads, 7 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, cfg, hf, tok
    torch.set_num_threads(threads)


def test_real_config_matches_the_checkpoint(real):
    _, cfg, hf, _ = real
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == ("llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == hf.config.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(hf.config.rms_norm_eps, rel=1e-7)


def test_real_logits_match_transformers(real):
    import torch

    model, _, hf, tok = real
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert 55 <= len(ids) <= 70, len(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, np.asarray([ids], np.int32)))
    diff = np.abs(ours - ref).max()
    print(f"max |logit diff| vs transformers over {len(ids)} tokens: {diff:.2e}")
    assert diff < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_real_greedy_generation_matches_transformers(real):
    import torch

    from inference_worker.engine import Engine, SamplingParams

    model, cfg, hf, tok = real
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for c in CHATS]
    expected = []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=EOS, pad_token_id=EOS)
        new = out[0, len(p):].tolist()
        expected.append(new[: new.index(EOS) + 1] if EOS in new else new)
    max_seq_len = -(-(max(map(len, prompts)) + NEW_TOKENS) // 16) * 16
    engine = Engine(model, cfg, max_batch=4, max_seq_len=max_seq_len, max_prefill_batch=4,
                    decode_chunk=NEW_TOKENS, max_decode_chunk=NEW_TOKENS, page_size=16, num_pages=0)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, n=1,
                                                   stop_token_ids=(EOS,)))
    got = [o[0].tokens for o in outs]
    for g, e in zip(got, expected, strict=True):
        print(repr(tok.decode(g)))
        assert g == e
    assert sum(map(len, got)) > 2 * len(prompts)  # real continuations, not an immediate eos
    # The engine's raw log-probs (paged cache, fused view) against transformers' forward over the
    # whole sequence: log_softmax at each position before a generated token.
    for p, (c,) in zip(prompts, outs, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([p + c.tokens])).logits[0, len(p) - 1: -1].double()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.tokens)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(c.raw_logprobs, want, atol=2e-3)


# -- tiny synthetic files ---------------------------------------------------------------------------
H, F, V, L = 256, 512, 320, 2  # rows of 256 values: the K-quant block size
SHAPES = {"llama": (4, 2, 64), "qwen2": (4, 2, 64), "qwen3": (4, 2, 128)}  # q heads, kv heads, head_dim
# K-quant blocks (no quantizer in the gguf package) are random bytes with their f16 scales set:
# type -> (bytes per 256-value block, byte offsets of the f16 scale fields).
K_BLOCKS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
            Q.Q6_K: (210, (208,))}
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, *K_BLOCKS]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama's q/k rows (rotary halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_tensors(arch: str, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> f32 array (outermost dimension first), random weights."""
    rng = np.random.default_rng(seed)
    nq, nkv, d = SHAPES[arch]
    w = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
    norm = lambda n: (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    t = {"token_embd.weight": w(V, H), "output_norm.weight": norm(H)}
    if not tied:
        t["output.weight"] = w(V, H)
    for i in range(L):
        b = f"blk.{i}."
        q, k = w(nq * d, H), w(nkv * d, H)
        if arch == "llama":
            q, k = llama_cpp_permute(q, nq), llama_cpp_permute(k, nkv)
        t |= {b + "attn_norm.weight": norm(H), b + "attn_q.weight": q, b + "attn_k.weight": k,
              b + "attn_v.weight": w(nkv * d, H), b + "attn_output.weight": w(H, nq * d),
              b + "ffn_norm.weight": norm(H), b + "ffn_gate.weight": w(F, H), b + "ffn_up.weight": w(F, H),
              b + "ffn_down.weight": w(H, F)}
        if arch == "qwen2":
            t |= {b + f"attn_{p}.bias": w(n * d) for p, n in (("q", nq), ("k", nkv), ("v", nkv))}
        if arch == "qwen3":
            t |= {b + "attn_q_norm.weight": norm(d), b + "attn_k_norm.weight": norm(d)}
    return t


def metadata(arch: str) -> dict[str, tuple[str, object]]:
    nq, nkv, d = SHAPES[arch]
    meta = {"block_count": ("uint32", L), "context_length": ("uint32", 256), "embedding_length": ("uint32", H),
            "feed_forward_length": ("uint32", F), "attention.head_count": ("uint32", nq),
            "attention.head_count_kv": ("uint32", nkv), "rope.freq_base": ("float32", 10000.0),
            "attention.layer_norm_rms_epsilon": ("float32", 1e-6), "vocab_size": ("uint32", V)}
    if d != H // nq:
        meta["attention.key_length"] = ("uint32", d)
    return {f"{arch}.{k}": v for k, v in meta.items()}


def encode(a: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """``a`` stored as qtype: the gguf quantizer where it has one, else random K-quant blocks
    scaled to about a's spread."""
    if qtype not in K_BLOCKS:
        return gguf.quants.quantize(a, qtype)
    size, scale_at = K_BLOCKS[qtype]
    raw = rng.integers(0, 256, (a.shape[0], a.shape[1] // 256, size), dtype=np.uint8)

    def with_scale(s: float) -> np.ndarray:
        out = raw.copy()
        for off in scale_at:
            out[..., off:off + 2] = np.frombuffer(np.float16(s).tobytes(), np.uint8)
        return out.reshape(a.shape[0], -1)

    spread = gguf.quants.dequantize(with_scale(1.0), qtype).std()
    return with_scale(float(a.std()) / spread)


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray], *, types: dict[str, Q] | None = None,
               meta: dict | None = None, extra: dict[str, np.ndarray] | None = None) -> str:
    """A GGUF file; ``types`` gives the stored type of each tensor (F32 when absent: tensors
    given already encoded carry their type there)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, (kind, value) in (metadata(arch) if meta is None else meta).items():
        getattr(w, f"add_{kind}")(key, value)
    for name, a in {**tensors, **(extra or {})}.items():
        qtype = (types or {}).get(name, Q.F32)
        w.add_tensor(name, a, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def quantized_pair(tmp_path, arch: str, qtype: Q, seed: int = 0):
    """Two files of the same model: every matrix stored as qtype, and the same values
    (dequantized by the gguf package) stored as F32."""
    rng = np.random.default_rng(seed)
    tensors = random_tensors(arch, tied=False, seed=seed)
    encoded, types, plain = {}, {}, {}
    for name, a in tensors.items():
        if a.ndim == 2:
            encoded[name], types[name] = encode(a, qtype, rng), qtype
            plain[name] = gguf.quants.dequantize(encoded[name], qtype).reshape(a.shape)
        else:
            encoded[name] = plain[name] = a
    return (write_gguf(tmp_path / f"{qtype.name}.gguf", arch, encoded, types=types),
            write_gguf(tmp_path / f"{qtype.name}_f32.gguf", arch, plain))


@jax.jit
def forward(model, tokens):
    return model(tokens)


TOKENS = np.random.default_rng(3).integers(0, V, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
def test_tiny_file_matches_transformers(tmp_path, arch, tied):
    """Layout, the q/k un-permutation, biases, q/k norms and tying, against transformers' loader."""
    import torch
    import transformers

    path = write_gguf(tmp_path / "m.gguf", arch, random_tensors(arch, tied=tied, seed=1))
    model, cfg = models.load(path)
    assert (cfg.arch, cfg.tie_embeddings, cfg.head_dim) == (arch, tied, SHAPES[arch][2])
    assert models.read_model_config(path) == cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(model, TOKENS)), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_supported_type_loads_its_dequantized_values(tmp_path, qtype):
    quantized, plain = quantized_pair(tmp_path, "llama", qtype)
    got, cfg = models.load_gguf(quantized)
    want, cfg_plain = models.load_gguf(plain)
    assert cfg == cfg_plain
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(got)), nnx.to_flat_state(nnx.state(want)),
                                 strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    embed = np.asarray(got.embed[...])
    assert 0.02 < embed.std() < 0.1  # real values, not zeros or blown-up scales


def test_sharded_load_places_params_in_their_shardings(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen3", random_tensors("qwen3", tied=False))
    mesh = jax.make_mesh((1, 2, 4), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    got, _ = models.load(path, mesh=mesh, dtype="bfloat16")
    want, _ = models.load(path, dtype="bfloat16")
    shardings = dict(nnx.to_flat_state(sharding.param_shardings(nnx.state(want), mesh, sharding.TRAIN_RULES)))
    wanted = dict(nnx.to_flat_state(nnx.state(want)))
    for p, var in nnx.to_flat_state(nnx.state(got)):
        a = var.get_value()
        assert a.sharding == shardings[p].get_value() and a.dtype == jax.numpy.bfloat16, p
        np.testing.assert_array_equal(np.asarray(a), np.asarray(wanted[p].get_value()), err_msg=str(p))
    q = got.layers[0].attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (H // 2, 1, 128)


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float, lo: float, hi: float, old_len: int):
    """The rope_freqs.weight llama.cpp's converter writes for Llama 3 rope scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / hi:
            out.append(1.0)
        elif wavelen > old_len / lo:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    truth = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    freqs = llama_cpp_rope_freqs(64, 10000.0, 8.0, 1.0, 4.0, 64)
    assert ((freqs > 1) & (freqs < 8)).sum() >= 2
    tensors = random_tensors("llama", tied=True)
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, extra={"rope_freqs.weight": freqs})
    _, cfg = models.load(path)
    got = cfg.rope_scaling_dict
    assert got["original_max_position_embeddings"] == 64 and got["factor"] == pytest.approx(8.0)
    assert got["low_freq_factor"] == pytest.approx(1.0, rel=1e-3)
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)
    np.testing.assert_allclose(rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_scaling=truth)), rtol=1e-5)
    bad = write_gguf(tmp_path / "bad.gguf", "llama", tensors,
                     extra={"rope_freqs.weight": np.linspace(1, 3, 32, dtype=np.float32)[::-1].copy()})
    with pytest.raises(CheckpointError, match="rope_freqs.weight.*not Llama 3 rope scaling"):
        models.read_model_config(bad)


# -- bad files -------------------------------------------------------------------------------------
def test_unsupported_architecture_is_named(tmp_path):
    meta = {k.replace("llama.", "gpt2."): v for k, v in metadata("llama").items()}
    path = write_gguf(tmp_path / "m.gguf", "gpt2", random_tensors("llama", tied=True), meta=meta)
    for fn in (models.load, models.read_model_config):
        with pytest.raises(CheckpointError, match=r"general\.architecture='gpt2'.*supported.*'llama'"):
            fn(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    tensors = random_tensors("llama", tied=True)
    rows, cols = tensors["blk.1.ffn_up.weight"].shape
    tensors["blk.1.ffn_up.weight"] = np.zeros((rows, cols // 32 * 18), np.uint8)  # IQ4_NL: 18 bytes / 32
    path = write_gguf(tmp_path / "m.gguf", "llama", tensors, types={"blk.1.ffn_up.weight": Q.IQ4_NL})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.ffn_up\.weight' has type IQ4_NL"):
        models.load(path)


@pytest.mark.parametrize("key", ["llama.attention.layer_norm_rms_epsilon", "llama.block_count",
                                 "llama.context_length", "llama.attention.head_count"])
def test_missing_metadata_key_is_named(tmp_path, key):
    meta = metadata("llama")
    del meta[key]
    path = write_gguf(tmp_path / "m.gguf", "llama", random_tensors("llama", tied=True), meta=meta)
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*missing metadata key '{key}'"):
        models.read_model_config(path)


@pytest.mark.parametrize("edit,match", [
    ({"llama.rope.scaling.type": ("string", "yarn"), "llama.rope.scaling.factor": ("float32", 4.0)},
     "rope scaling 'yarn' by 4.0"),
    ({"llama.attention.head_count_kv": ("uint32", 3)}, "invalid model.*num_kv_heads"),
    ({"llama.rope.dimension_count": ("uint32", 32)}, "llama.rope.dimension_count=32 differs"),
    ({"llama.vocab_size": ("uint32", 999)}, "llama.vocab_size=999 but token_embd.weight has 320 rows"),
], ids=["yarn", "kv_heads", "partial_rope", "vocab"])
def test_bad_metadata_is_named(tmp_path, edit, match):
    path = write_gguf(tmp_path / "m.gguf", "llama", random_tensors("llama", tied=True),
                      meta={**metadata("llama"), **edit})
    with pytest.raises(CheckpointError, match=f"m.gguf: .*{match}"):
        models.read_model_config(path)


def test_tensor_problems_are_named(tmp_path):
    tensors = random_tensors("llama", tied=True)
    extra = write_gguf(tmp_path / "extra.gguf", "llama", tensors,
                       extra={"blk.0.attn_q.bias": np.zeros(256, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*blk\.0\.attn_q\.bias"):
        models.load(extra)
    missing = write_gguf(tmp_path / "missing.gguf", "llama",
                         {k: v for k, v in tensors.items() if k != "blk.1.ffn_gate.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor.*blk\.1\.ffn_gate\.weight"):
        models.load(missing)
    shape = write_gguf(tmp_path / "shape.gguf", "llama",
                       {**tensors, "blk.0.attn_v.weight": np.zeros((64, H), np.float32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_v\.weight.*shape \(64, 256\)"):
        models.load(shape)


def test_load_dispatches_on_the_path(tmp_path):
    from tests.helpers.hf_models import make_hf_model

    hf_dir = tmp_path / "hf"
    make_hf_model("qwen2_tied").save_pretrained(str(hf_dir))
    model, cfg = models.load(str(hf_dir), overrides={"attention_impl": "reference"})
    assert cfg == models.read_model_config(str(hf_dir), overrides={"attention_impl": "reference"})
    assert cfg.arch == "qwen2" and cfg.attention_impl == "reference"
    path = write_gguf(tmp_path / "m.gguf", "qwen2", random_tensors("qwen2", tied=True))
    assert models.read_model_config(path, dtype="bfloat16").param_dtype == "bfloat16"
    with pytest.raises(CheckpointError, match="overrides \\['vocab_size'\\]"):
        models.load(path, overrides={"vocab_size": 8})
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: not a GGUF file"):
        models.load(str(tmp_path / "notes.txt"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        models.read_model_config(str(tmp_path / "nowhere.gguf"))
