"""webdataset tar shards and parquet files as img2dataset writes them, local and through a cloud
path: their cached records equal those of the same pairs read as a folder, bad members are counted
by reason, shards are split by whole files, and a cache run killed mid-shard resumes to the same
records."""

import contextlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from imagen_jax.files import expand_paths

BUCKET = "gs://fake-bucket"


def _jpeg(arr) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _pairs():
  """(key, image bytes or None, caption or None): 10 good pairs, then a corrupt image, an image
  without caption and a tiny image."""
  rng = np.random.default_rng(0)
  out = [
    (f"{i:09d}", _jpeg(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), f"a photo number {i}")
    for i in range(10)
  ]
  out.append(
    ("000000010", _jpeg(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))[:80], "cut off")
  )
  out.append(("000000011", _jpeg(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)), None))
  out.append(("000000012", _jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)), "a tiny one"))
  return out


BAD = {"corrupt_image": 1, "missing_or_empty_caption": 1, "image_too_small": 1}


def _tar(path, pairs):
  with tarfile.open(path, "w") as tar:
    for key, image, caption in pairs:
      members = [("jpg", image), ("json", json.dumps({"key": key, "caption": caption}).encode())]
      if caption is not None:
        members.insert(1, ("txt", caption.encode()))
      for ext, data in members:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def img2dataset_dirs(tmp_path_factory):
  """The same pairs as a folder, as three tar shards and as two parquet files (row groups of 3)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  root = tmp_path_factory.mktemp("img2dataset")
  pairs = _pairs()
  folder = root / "files" / "00000"
  folder.mkdir(parents=True)
  for key, image, caption in pairs:
    (folder / f"{key}.jpg").write_bytes(image)
    if caption is not None:
      (folder / f"{key}.txt").write_text(caption)
  (root / "tars").mkdir()
  for s in range(3):
    _tar(root / "tars" / f"{s:05d}.tar", pairs[s::3])
  (root / "parquet").mkdir()
  for s in range(2):
    part = pairs[s::2]
    table = pa.table(
      {
        "key": [k for k, _, _ in part],
        "jpg": [im for _, im, _ in part],
        "caption": [c for _, _, c in part],
      }
    )
    pq.write_table(table, root / "parquet" / f"{s:05d}.parquet", row_group_size=3)
  return root


@contextlib.contextmanager
def fake_bucket(local_root):
  """`gs://fake-bucket/...` served from `local_root` through etils.epath (what the sources, the
  cache and orbax read and write through): a stand-in where no bucket can be reached."""
  from etils import epath
  from etils.epath import testing

  os_backend = epath.backend.os_backend
  to_local = lambda p: str(p).replace(BUCKET, str(local_root), 1)  # noqa: E731
  to_cloud = lambda p: str(p).replace(str(local_root), BUCKET, 1)  # noqa: E731

  def call(name, cloud_result=False):
    def fn(_original, path, *args, **kwargs):
      args = [to_local(a) if isinstance(a, str) and a.startswith(BUCKET) else a for a in args]
      out = getattr(os_backend, name)(to_local(path), *args, **kwargs)
      return [to_cloud(p) for p in out] if cloud_result else out

    return fn

  names = (
    "open",
    "exists",
    "isdir",
    "listdir",
    "makedirs",
    "mkdir",
    "remove",
    "rename",
    "replace",
    "rmtree",
    "stat",
  )
  # With TensorFlow installed, epath sends gs:// to TensorFlow's gfile whatever the backend table
  # says; the stand-in needs the table (what mock_epath replaces) to be used.
  from unittest import mock

  from etils.epath import gpath

  with (
    mock.patch.object(gpath, "_is_tf_installed", lambda: False),
    testing.mock_epath(glob=call("glob", cloud_result=True), **{n: call(n) for n in names}),
  ):
    yield


def _records(task_name, image_size=32, num_shards=1, index=0):
  import seqio

  task = seqio.get_mixture_or_task(task_name)
  shard = seqio.ShardInfo(index, num_shards) if num_shards > 1 else None
  ds = task.get_dataset(split="train", shuffle=False, shard_info=shard, sequence_length=None)
  return list(ds.as_numpy_iterator()), task.source.stats[("train", index)]


def test_expand_paths_globs_brace_ranges_and_lists(img2dataset_dirs):
  from imagen_jax.errors import MissingFileError

  tars = img2dataset_dirs / "tars"
  names = lambda spec: [p.name for p in expand_paths(spec)]  # noqa: E731
  assert names(f"{tars}/*.tar") == ["00000.tar", "00001.tar", "00002.tar"]
  assert names(f"{tars}/{{00001..00002}}.tar") == ["00001.tar", "00002.tar"]
  assert names(f"{tars}/00002.tar,{tars}/0000[0].tar") == ["00002.tar", "00000.tar"]
  with pytest.raises(MissingFileError, match="no files match"):
    expand_paths(f"{tars}/*.parquet")
  with pytest.raises(MissingFileError, match="does not exist"):
    expand_paths(f"{tars}/{{00002..00003}}.tar")


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_shards_and_parquet_read_as_the_folder_does_and_count_bad_members(
  img2dataset_dirs, spm_model, kind
):
  from imagen_jax.data import tasks

  tasks.register_source_task(
    "i2d_folder",
    "folder",
    spm_model,
    image_size=32,
    path=str(img2dataset_dirs / "files"),
    max_bad_fraction=1.0,
  )
  glob = {"webdataset": "tars/*.tar", "parquet": "parquet/*.parquet"}[kind]
  with fake_bucket(img2dataset_dirs):
    tasks.register_source_task(
      f"i2d_{kind}", kind, spm_model, image_size=32, path=f"{BUCKET}/{glob}", max_bad_fraction=1.0
    )
    got, stats = _records(f"i2d_{kind}")
  want, want_stats = _records("i2d_folder")
  assert len(got) == 10 and stats.kept == 10 and stats.seen == 13
  assert dict(stats.skipped) == BAD == dict(want_stats.skipped)
  by_caption = lambda rs: {r["caption"]: (r["image"], r["source_size"]) for r in rs}  # noqa: E731
  assert by_caption(got) == by_caption(want)
  # keys name the file and the sample
  assert all(r["key"].decode().startswith(f"{BUCKET}/{glob.split('/')[0]}/") for r in got)


def test_hosts_and_cache_shards_read_whole_files(img2dataset_dirs, spm_model):
  from imagen_jax.data import tasks

  tasks.register_source_task(
    "i2d_split",
    "webdataset",
    spm_model,
    image_size=32,
    path=str(img2dataset_dirs / "tars" / "*.tar"),
    max_bad_fraction=1.0,
  )
  parts = [_records("i2d_split", num_shards=2, index=i)[0] for i in range(2)]
  files = [{r["key"].decode().split(":")[0].rsplit("/", 1)[1] for r in p} for p in parts]
  assert files == [{"00000.tar", "00002.tar"}, {"00001.tar"}]  # tar i -> shard i mod 2
  captions = sorted(r["caption"] for p in parts for r in p)
  assert captions == sorted(r["caption"] for r in _records("i2d_split")[0])


def test_truncated_shard_keeps_what_was_read_and_counts_it(img2dataset_dirs, tmp_path):
  from imagen_jax.data import sources

  data = (img2dataset_dirs / "tars" / "00000.tar").read_bytes()
  broken = tmp_path / "broken.tar"
  broken.write_bytes(data[: len(data) // 2])
  stats = sources.SourceStats()
  out = list(sources.clean_records(sources.webdataset_records(broken), stats, check_after=100))
  assert 0 < len(out) < 4 and stats.skipped["corrupt_tar"] == 1
  (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
  recs = list(sources.parquet_records(tmp_path / "junk.parquet"))
  assert recs == [{"key": str(tmp_path / "junk.parquet"), "error": "corrupt_parquet"}]
  with pytest.raises(sources.DataError, match="no column text"):
    list(
      sources.parquet_records(img2dataset_dirs / "parquet" / "00000.parquet", caption_column="text")
    )


def test_json_caption_field_crop_modes_and_caption_cleaning(img2dataset_dirs, tmp_path):
  from imagen_jax.data import sources

  shard = img2dataset_dirs / "tars" / "00000.tar"
  from_json = list(sources.webdataset_records(shard, caption_field="caption"))
  from_txt = list(sources.webdataset_records(shard))
  assert [r["caption"] for r in from_json] == [
    r["caption"].decode() if r["caption"] else None for r in from_txt
  ]
  assert sources.clean_caption("A  cat &amp; a dog <b>at</b> https://x.org/a.jpg \n home") == (
    "A cat & a dog at home",
    ("url", "html_tag", "html_entity", "whitespace"),
  )
  assert sources.clean_caption("a &lt;b&gt; tag") == ("a <b> tag", ("html_entity",))
  assert sources.clean_caption("  two   spaces ") == ("two spaces", ("whitespace",))
  assert sources.clean_caption("clean") == ("clean", ())
  stats = sources.SourceStats()
  wide = Image.new("RGB", (64, 32), (0, 0, 0))
  buf = io.BytesIO()
  wide.save(buf, format="PNG")
  rec = {"key": "w", "image": buf.getvalue(), "caption": "see www.example.com  now"}
  padded = next(sources.clean_records([rec], stats, image_size=16, crop="pad", clean_captions=True))
  img = np.asarray(Image.open(io.BytesIO(padded["image"])))
  assert img.shape == (16, 16, 3) and img[0].min() == 255 and img[8].max() == 0  # white bars
  assert padded["caption"] == "see now" and dict(stats.cleaned) == {"url": 1, "whitespace": 1}
  cropped = next(sources.clean_records([rec], sources.SourceStats(), image_size=16))
  assert np.asarray(Image.open(io.BytesIO(cropped["image"]))).max() == 0  # all black: no bars


def test_cache_from_bucket_shards_equals_the_folder_cache_and_resumes_mid_shard(
  img2dataset_dirs, spm_model, tiny_t5_checkpoint, tmp_path
):
  from imagen_jax.data import cache, tasks

  t5_dir, _, _ = tiny_t5_checkpoint
  kw = dict(num_shards=3, batch_size=4, max_length=12, progress=False)
  tasks.register_source_task(
    "c_folder",
    "folder",
    spm_model,
    image_size=32,
    path=str(img2dataset_dirs / "files"),
    max_bad_fraction=1.0,
  )
  folder = cache.cache_embeddings("c_folder", str(tmp_path / "folder"), str(t5_dir), **kw)
  # tars in the bucket; the cache is written locally (TFRecords go through tf.io.gfile, which reads
  # and writes gs:// itself), once whole and once killed after one shard, in the middle of the next
  with fake_bucket(img2dataset_dirs):
    tasks.register_source_task(
      "c_tars",
      "webdataset",
      spm_model,
      image_size=32,
      path=f"{BUCKET}/tars/{{00000..00002}}.tar",
      max_bad_fraction=1.0,
    )
    full = cache.cache_embeddings("c_tars", str(tmp_path / "full"), str(t5_dir), **kw)
    part = cache.cache_embeddings(
      "c_tars", str(tmp_path / "part"), str(t5_dir), stop_after_shards=1, **kw
    )
    torn = cache.shard_path(tmp_path / "part", "train", 1, 3)
    torn.with_name(torn.name + ".incomplete").write_bytes(b"killed mid-shard")
    resumed = cache.cache_embeddings("c_tars", str(tmp_path / "part"), str(t5_dir), **kw)
  assert (folder.examples, full.examples) == (10, 10)
  assert full.bad_by_reason == BAD == folder.bad_by_reason
  assert part.shards_written == 1 and (resumed.shards_skipped, resumed.shards_written) == (1, 2)
  for i in range(3):
    a = cache.shard_path(tmp_path / "full", "train", i, 3).read_bytes()
    assert a == cache.shard_path(tmp_path / "part", "train", i, 3).read_bytes(), f"shard {i}"
  from tests.integration.test_data import _read_cache

  mine = {r["caption"]: r for r in _read_cache(tmp_path / "full", spm_model, "c_tars_cached")}
  ref = {r["caption"]: r for r in _read_cache(tmp_path / "folder", spm_model, "c_folder_cached")}
  assert sorted(mine) == sorted(ref)
  for caption, r in ref.items():
    assert mine[caption]["image"] == r["image"]
    np.testing.assert_array_equal(mine[caption]["tokens"], r["tokens"])
    # the same bfloat16 embeddings, up to a 1-ulp flip where a batch of other captions rounds a
    # float32 value on a rounding boundary the other way
    ulps = np.abs(
      mine[caption]["text_emb"].view(np.uint16).astype(int) - r["text_emb"].view(np.uint16)
    )
    assert ulps.max() <= 1 and (ulps > 0).mean() < 0.01


def test_sample_images_and_json_go_to_a_cloud_path(tmp_path):
  """What `sample` and the trainer's hooks write (PNG, JSON) goes through epath to the bucket."""
  from imagen_jax import files
  from imagen_jax import images as imio

  img = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
  with fake_bucket(tmp_path):
    imio.save_png(f"{BUCKET}/run/samples/a.png", img)
    files.write_json(f"{BUCKET}/run/settings.json", {"w": 3})
    back = imio.read_image(f"{BUCKET}/run/samples/a.png")
  np.testing.assert_array_equal(back, img)
  assert (tmp_path / "run" / "samples" / "a.png").is_file()
  assert json.loads((tmp_path / "run" / "settings.json").read_text()) == {"w": 3}
  assert not list(tmp_path.rglob("*.tmp"))
