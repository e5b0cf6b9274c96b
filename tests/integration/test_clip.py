"""Our Flax CLIP against transformers' CLIPModel (PyTorch CPU) on a random tiny config saved with
save_pretrained: tokenizer ids and masks (padded and truncated prompts), text and image
embeddings, CLIP's image preprocessing; and `imagen-jax eval clip` end to end."""

import json

import numpy as np
import pytest

from imagen_jax.eval.networks import clip
from tests.helpers import CONTEXT

TEXTS = [
  "a red circle",
  "blue",
  "a blue circle and a red circle " * 5,
  "",
  "RED   circle!",
  "red circle, blue",
]


def test_tokenizer_equals_transformers_with_padding_and_truncation(clip_checkpoint):
  d, _, tok = clip_checkpoint
  ours = clip.ClipTokenizer(d, CONTEXT)
  ids, mask = ours(TEXTS)
  ref = tok(TEXTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="np")
  assert np.array_equal(ids, ref["input_ids"]) and np.array_equal(mask, ref["attention_mask"])
  assert mask[2].all() and ids[2, -1] == tok.eos_token_id  # truncated: the end token kept
  assert mask[3].sum() == 2  # "" -> start, end


def test_text_and_image_embeddings_equal_transformers(clip_checkpoint):
  import torch

  d, model, tok = clip_checkpoint
  ours = clip.load(d)
  ids, mask = ours.tokenizer(TEXTS)
  with torch.no_grad():
    want = model.get_text_features(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask, dtype=torch.long),
    )
  want = getattr(want, "pooler_output", want).numpy()
  got = ours.text_embeddings(ids, mask)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
  rng = np.random.default_rng(0)
  pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = model.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2))
  want = getattr(want, "pooler_output", want).numpy()
  got = ours.image_embeddings(pixels)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_preprocessing_equals_clip_image_processor():
  from transformers import CLIPImageProcessor

  rng = np.random.default_rng(1)
  proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  ours = clip.Preprocess(32, 32)
  for shape in ((48, 40, 3), (32, 32, 3), (100, 64, 3)):
    im = rng.integers(0, 256, shape, dtype=np.uint8)
    want = proc(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(ours(im) - want).max() < 1e-5, shape


def test_clip_score_is_100_cosine_clipped_at_zero():
  a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  b = np.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
  assert np.allclose(clip.clip_scores(a, b), [100.0, 0.0, 100.0 / np.sqrt(2)])


def test_batches_with_a_padded_last_one_equal_one_call_and_compile_once(clip_checkpoint, tmp_path):
  from imagen_jax import images as imio

  d, _, _ = clip_checkpoint
  model = clip.load(d)
  rng = np.random.default_rng(3)
  ims = [rng.integers(0, 256, (36, 44, 3), dtype=np.uint8) for _ in range(5)]
  files = []
  for k, im in enumerate(ims):
    imio.save_png(tmp_path / f"{k}.png", im)
    files.append(tmp_path / f"{k}.png")
  got = model.embed_images(files, batch_size=2)  # batches 2, 2, 1 (padded to 2), read from disk
  assert model._image._cache_size() == 1  # one compiled shape
  want = model.image_embeddings(np.stack([model.preprocess(im) for im in ims]))
  assert got.shape == want.shape and np.abs(got - want).max() / np.abs(want).max() < 1e-5
  texts = TEXTS[:5]
  got = model.embed_texts(texts, batch_size=2)
  assert model._text._cache_size() == 1
  want = model.text_embeddings(*model.tokenizer(texts))
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_clip_command_end_to_end_and_bad_input(clip_checkpoint, tmp_path, capsys):
  from imagen_jax import cli
  from imagen_jax import images as imio

  d, _, _ = clip_checkpoint
  rng = np.random.default_rng(2)
  samples = tmp_path / "s"
  samples.mkdir()
  for k in range(4):
    imio.save_png(samples / f"{k}.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
  prompts = tmp_path / "p.txt"
  prompts.write_text("a red circle\nblue\n")
  out = tmp_path / "clip.json"
  assert (
    cli.main(
      [
        "eval",
        "clip",
        "--samples",
        str(samples),
        "--prompts",
        str(prompts),
        "--checkpoint",
        str(d),
        "--batch_size",
        "3",
        "--json",
        str(out),
      ]
    )
    == 0
  ), capsys.readouterr().err
  result = json.loads(out.read_text())
  model = clip.load(d)
  ims = [imio.read_image(samples / f"{k}.png") for k in range(4)]
  want, _ = clip.clip_score(model, ims, ["a red circle", "a red circle", "blue", "blue"])
  assert result["clip_score"] == pytest.approx(want, rel=1e-5) and result["pairs"] == 4
  prompts.write_text("a\nb\nc\n")
  assert (
    cli.main(
      ["eval", "clip", "--samples", str(samples), "--prompts", str(prompts), "--checkpoint", str(d)]
    )
    == 2
  )
  assert "3 prompts" in capsys.readouterr().err
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text(json.dumps({"text_config": {}}))
  prompts.write_text("a\n")
  assert (
    cli.main(
      [
        "eval",
        "clip",
        "--samples",
        str(samples),
        "--prompts",
        str(prompts),
        "--checkpoint",
        str(tmp_path / "bad"),
      ]
    )
    == 2
  )
  err = capsys.readouterr().err
  assert "not a CLIP config" in err and len(err.strip().splitlines()) == 1
