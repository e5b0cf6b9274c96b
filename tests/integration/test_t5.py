"""The T5 v1.1 encoder against an independent reference: Hugging Face transformers on PyTorch
CPU."""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import cli, partitioning
from imagen_jax.text import checkpoints, t5
from imagen_jax.text.encoder import TextEncoder
from imagen_jax.text.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A random tiny T5 v1.1 encoder in Hugging Face format (safetensors + config.json)."""
  cfg = transformers.T5Config(
    **TINY,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
  )
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(cfg).eval()
  with torch.no_grad():  # make the layer norms and the position table non-trivial
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.mul_(1.0 + 0.3 * torch.randn_like(p))
      if "relative_attention_bias" in name:
        p.normal_(0.0, 1.0)
  directory = tmp_path_factory.mktemp("hf_t5")
  model.save_pretrained(directory, safe_serialization=True)
  return model, directory


def batch_tokens(length=160, seed=0):
  """Padding, and one sequence longer than the relative-position max distance (128)."""
  rng = np.random.default_rng(seed)
  lengths = [150, 37, 5, 1]
  tokens = np.zeros((len(lengths), length), np.int32)
  for i, n in enumerate(lengths):
    n = min(n, length)
    tokens[i, : n - 1] = rng.integers(2, TINY["vocab_size"], n - 1)
    tokens[i, n - 1] = t5.EOS_ID
  return tokens


def hf_hidden(model, tokens):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(tokens, dtype=torch.long),
      attention_mask=torch.tensor(tokens > 0, dtype=torch.long),
    ).last_hidden_state
  return out.numpy()


def ours(config, params, tokens):
  emb, mask = jax.jit(lambda p, t: t5.T5Encoder(config).apply({"params": p}, t))(params, tokens)
  return np.asarray(emb), np.asarray(mask)


def assert_matches_reference(emb, mask, ref, tokens):
  np.testing.assert_array_equal(mask, tokens > 0)
  valid = tokens > 0
  err = np.linalg.norm(emb[valid] - ref[valid]) / np.linalg.norm(ref[valid])
  assert err < 2e-5, err
  np.testing.assert_allclose(emb[valid], ref[valid], rtol=1e-4, atol=1e-4)


def test_relative_position_buckets_match_reference():
  from transformers.models.t5.modeling_t5 import T5Attention

  rel = np.arange(-600, 601)
  ref = T5Attention._relative_position_bucket(
    torch.tensor(rel), bidirectional=True, num_buckets=32, max_distance=128
  ).numpy()
  np.testing.assert_array_equal(t5.relative_position_bucket(rel, 32, 128), ref)


def test_hf_checkpoint_matches_transformers(hf_model):
  model, directory = hf_model
  config, params = checkpoints.load_hf(directory)
  assert (config.d_model, config.num_layers, config.num_heads, config.d_ff) == (32, 2, 4, 48)
  tokens = batch_tokens()
  emb, mask = ours(config, params, tokens)
  assert_matches_reference(emb, mask, hf_hidden(model, tokens), tokens)


def _write_t5x_msgpack(directory, params, extra=None):
  """A T5X checkpoint as t5x writes it: msgpack tree, large arrays in their own TensorStore
  (zarr)."""
  import tensorstore as ts
  from flax import serialization

  ckpt = directory / "checkpoint_1000"
  ckpt.mkdir(parents=True)
  target = {}
  for path, value in checkpoints.flatten(params).items():
    value = np.asarray(value)
    if value.ndim < 2:  # small arrays inline in the msgpack, like t5x
      leaf = value
    else:  # the rest: a TensorStore spec with a path relative to the checkpoint
      rel = "target." + path.replace("/", ".")
      spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": rel},
        "metadata": {
          "shape": list(value.shape),
          "chunks": list(value.shape),
          "dtype": "<f4",
          "compressor": {"id": "gzip"},
        },
      }
      store = ts.open(
        {**spec, "kvstore": {"driver": "file", "path": str(ckpt / rel)}}, create=True
      ).result()
      store.write(value.astype(np.float32)).result()
      leaf = spec
    node = target
    *parents, name = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[name] = leaf
  target.update(extra or {})
  state = {"optimizer": {"target": target, "state": {"step": np.asarray(1000)}}, "version": 3}
  (ckpt / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
  return directory


def test_t5x_msgpack_tensorstore_checkpoint_matches_transformers(hf_model, tmp_path):
  model, hf_dir = hf_model
  config, params = checkpoints.load_hf(hf_dir)
  decoder = {"decoder": {"decoder_norm": {"scale": np.ones(32, np.float32)}}}  # ignored
  t5x_dir = _write_t5x_msgpack(tmp_path / "t5x", params, decoder)
  config2, params2 = checkpoints.load_t5x(t5x_dir, t5.t5_config("tiny", **TINY))
  tokens = batch_tokens(seed=1)
  emb, mask = ours(config2, params2, tokens)
  assert_matches_reference(emb, mask, hf_hidden(model, tokens), tokens)


def test_t5x_orbax_checkpoint_matches_transformers(hf_model, tmp_path):
  import orbax.checkpoint as ocp

  model, hf_dir = hf_model
  config, params = checkpoints.load_hf(hf_dir)
  ckpt = tmp_path / "t5x_orbax" / "checkpoint_7"
  ocp.PyTreeCheckpointer().save(str(ckpt), {"optimizer": {"target": params}})
  config2, params2 = checkpoints.load_t5x(tmp_path / "t5x_orbax", t5.t5_config("tiny", **TINY))
  tokens = batch_tokens(seed=2)
  emb, mask = ours(config2, params2, tokens)
  assert_matches_reference(emb, mask, hf_hidden(model, tokens), tokens)


def test_missing_and_mismatched_tensors_are_named(hf_model, tmp_path):
  from safetensors.numpy import load_file, save_file

  _, hf_dir = hf_model
  tensors = load_file(str(hf_dir / "model.safetensors"))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((hf_dir / "config.json").read_text())
  missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  save_file({k: v for k, v in tensors.items() if k != missing}, str(broken / "model.safetensors"))
  with pytest.raises(checkpoints.CheckpointError, match=missing.replace(".", r"\.")):
    checkpoints.load_hf(broken)
  # A checkpoint whose sizes disagree with the configured encoder.
  with pytest.raises(checkpoints.CheckpointError, match=r"d_ff=48 \(config: 64\)"):
    checkpoints.load_hf(hf_dir, t5.t5_config("tiny", **{**TINY, "d_ff": 64}))
  # A tensor of the wrong shape (config.json edited to claim another vocabulary size).
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["vocab_size"] = 256
  (broken / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(broken / "model.safetensors"))
  with pytest.raises(
    checkpoints.CheckpointError, match=r"token_embedder/embedding has shape \(128, 32\)"
  ):
    checkpoints.load_hf(broken)
  # Pickle weights are refused, not loaded.
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((hf_dir / "config.json").read_text())
  (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(checkpoints.CheckpointError, match="pickle"):
    checkpoints.load_hf(pickled)
  with pytest.raises(checkpoints.CheckpointError, match="no such checkpoint"):
    checkpoints.load_any(tmp_path / "nowhere")
  with pytest.raises(checkpoints.CheckpointError, match="not a T5X checkpoint"):
    checkpoints.load_t5x(tmp_path, t5.t5_config("tiny", **TINY))


def test_tokenizer_eos_mask_truncation_and_bad_input(spm_model):
  tok = Tokenizer(spm_model, max_length=8)
  batch = tok(
    ["two red circles", "", "a big blue square to the left of a green triangle", b"red \xff square"]
  )
  assert batch.tokens.shape == (4, 8) and batch.tokens.dtype == np.int32
  for i, n in enumerate(batch.lengths):
    assert (
      batch.tokens[i, n - 1] == t5.EOS_ID
      and np.all(batch.tokens[i, n:] == 0)
      and np.all(batch.tokens[i, :n] > 0)
    )
  np.testing.assert_array_equal(batch.mask, batch.tokens > 0)
  assert batch.lengths[1] == 1  # empty caption: EOS only, counted
  assert batch.truncated.tolist() == [False, False, True, False]
  s = batch.stats
  assert (s.captions, s.truncated, s.empty, s.invalid_utf8) == (4, 1, 1, 1)
  # seqio's vocabulary and plain sentencepiece give the same ids.
  plain = Tokenizer(spm_model, max_length=8, use_seqio=False)
  np.testing.assert_array_equal(
    plain(["two red circles", "a big blue square"]).tokens,
    tok(["two red circles", "a big blue square"]).tokens,
  )
  with pytest.raises(FileNotFoundError, match="sentencepiece model not found"):
    Tokenizer("/nonexistent/spm.model")
  with pytest.raises(TypeError, match="caption 0 is a int"):
    tok([3])


def test_sharded_batched_encoder_matches_unsharded(hf_model):
  _, hf_dir = hf_model
  config, params = checkpoints.load_hf(hf_dir)
  tokens = np.concatenate([batch_tokens(length=24, seed=s) for s in range(3)])  # 12 rows
  plain = TextEncoder(config, params, batch_size=8)
  emb, mask = plain.encode(tokens)
  ref, ref_mask = ours(config, params, tokens)
  np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
  mesh = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
  sharded = TextEncoder(config, params, mesh=mesh, batch_size=8)
  emb2, mask2 = sharded.encode(tokens)
  np.testing.assert_allclose(emb2, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mask2, ref_mask)
  assert sharded.trace_count == 1  # 12 rows = two fixed-size batches, one program
  q = sharded.params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  with pytest.raises(ValueError, match="token ids must lie in"):
    plain.encode(np.full((1, 4), 500))


def test_cli_convert_and_encode(hf_model, spm_model, tmp_path, capsys):
  _, hf_dir = hf_model
  out = tmp_path / "converted"
  assert (
    cli.main(
      ["t5", "convert", "--from", str(hf_dir), "--to", str(out), "--param_dtype", "bfloat16"]
    )
    == 0
  )
  config, params = checkpoints.load_params(out)
  assert config.param_dtype == "bfloat16"
  assert params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"].dtype == jnp.bfloat16
  # bfloat16 parameters stay close to the float32 reference.
  _, ref_params = checkpoints.load_hf(hf_dir)
  tokens = batch_tokens(seed=3)
  a, _ = ours(config, params, tokens)
  b, _ = ours(config, ref_params, tokens)
  valid = tokens > 0
  assert np.linalg.norm(a[valid] - b[valid]) / np.linalg.norm(b[valid]) < 0.05
  capsys.readouterr()
  code = cli.main(
    [
      "t5",
      "encode",
      "--checkpoint",
      str(out),
      "--vocab",
      spm_model,
      "--max_length",
      "6",
      "--prompts",
      "two red circles",
      "a big blue square to the left of a green triangle",
    ]
  )
  text = capsys.readouterr().out
  assert code == 0
  assert "embeddings (2, 6, 32)" in text and "truncated=1" in text and "(truncated)" in text
  # Bad input: one line on stderr, exit code 2.
  assert (
    cli.main(
      [
        "t5",
        "encode",
        "--checkpoint",
        str(tmp_path / "nope"),
        "--vocab",
        spm_model,
        "--prompts",
        "x",
      ]
    )
    == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no such checkpoint" in err[0]
  assert cli.main(["t5", "convert", "--from", str(hf_dir), "--to", str(out)]) == 2  # not empty
  assert "not empty" in capsys.readouterr().err
  assert (
    cli.main(
      [
        "t5",
        "encode",
        "--checkpoint",
        str(out),
        "--vocab",
        str(tmp_path / "x.model"),
        "--prompts",
        "x",
      ]
    )
    == 2
  )


@pytest.mark.parametrize("size", ["small", "xxl"])
def test_module_parameters_are_exactly_the_checkpoint_layout(size):
  # The module's parameter tree (eval_shape: nothing allocated) is the T5X layout the loaders fill.
  config = t5.t5_config(size)
  abstract = t5.abstract_encoder_params(config)
  shapes = {k: tuple(v.shape) for k, v in checkpoints.flatten(nn.unbox(abstract)).items()}
  assert shapes == checkpoints.expected_shapes(config)
  if size == "xxl":  # T5-XXL encoder: 4.76B parameters with the 32128 x 4096 embedding
    assert abs(sum(int(np.prod(s)) for s in shapes.values()) - 4.762e9) < 1e6


def test_bfloat16_hf_checkpoint_loads(hf_model, tmp_path):
  # Released T5 v1.1 weights are often bfloat16 safetensors, which NumPy cannot represent natively.
  model, hf_dir = hf_model
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(
    tmp_path / "bf16", safe_serialization=True
  )
  config, params = checkpoints.load_hf(tmp_path / "bf16")
  _, ref = checkpoints.load_hf(hf_dir)
  a = checkpoints.flatten(params)
  b = checkpoints.flatten(ref)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == np.float32
    np.testing.assert_allclose(a[k], b[k], rtol=1e-2, atol=1e-2)  # bf16 rounding of the weights
    np.testing.assert_array_equal(a[k], b[k].astype(jnp.bfloat16).astype(np.float32))


def test_truncation_boundary(spm_model):
  # A caption of exactly max_length - 1 pieces fits with its EOS; one more piece is truncated.
  import sentencepiece as sp

  n = len(sp.SentencePieceProcessor(model_file=spm_model).encode("two red circles"))
  fits = Tokenizer(spm_model, max_length=n + 1)(["two red circles"])
  assert not fits.truncated[0] and fits.stats.truncated == 0 and fits.lengths[0] == n + 1
  cut = Tokenizer(spm_model, max_length=n)(["two red circles"])
  assert cut.truncated[0] and cut.stats.truncated == 1 and cut.lengths[0] == n
  assert cut.tokens[0, -1] == t5.EOS_ID
  np.testing.assert_array_equal(cut.tokens[0, :-1], fits.tokens[0, : n - 1])
