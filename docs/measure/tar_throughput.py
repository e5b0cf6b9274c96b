"""Throughput of reading webdataset tar shards: this project's source against the webdataset
library.

Writes `--num` random-content JPEGs (`--source_size` px, quality 90) with captions into `--shards`
tar shards in img2dataset's layout, then measures on this machine, each after one warm-up pass:
  1. `ours_records`: `sources.webdataset_records` + `clean_records` (decode, convert to RGB, centre
     crop to `--image_size`, PNG re-encode): what every cache shard runs;
  2. `webdataset_lib`: the `webdataset` library reading the same shards (`wds.WebDataset(...)
     .decode('pil')`), then the same crop and PNG re-encode;
  3. `ours_task`: the registered seqio source task (the above plus tokenization, through tf.data),
     the stream that `cache-embeddings` and on-the-fly training read;
  4. `cache_embeddings`: the whole cache run with the `make demo` T5 (`--encoder`, optional).

  JAX_PLATFORMS=cpu .venv/bin/python docs/measure/tar_throughput.py --vocab out/demo/spiece.model \
    --encoder out/demo/t5 --json docs/bench/cpu_tar_throughput.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_shards(root: Path, num: int, shards: int, size: int) -> list:
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
  paths = []
  for s in range(shards):
    path = root / f"{s:05d}.tar"
    with tarfile.open(path, "w") as tar:
      for i in range(s, num, shards):
        img = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((size, size), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        for ext, data in (("jpg", buf.getvalue()), ("txt", f"picture number {i}".encode())):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(str(path))
  return paths


def timed(fn, repeats: int = 2) -> float:
  """examples/s of the best of `repeats` passes after one warm-up pass."""
  fn()
  best = float("inf")
  n = 0
  for _ in range(repeats):
    t0 = time.perf_counter()
    n = fn()
    best = min(best, time.perf_counter() - t0)
  return n / best


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--num", type=int, default=1000)
  p.add_argument("--shards", type=int, default=4)
  p.add_argument("--source_size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument(
    "--vocab", default=None, help="sentencepiece model (for ours_task / cache_embeddings)"
  )
  p.add_argument("--encoder", default=None, help="T5 checkpoint (for cache_embeddings)")
  p.add_argument("--json", default=None)
  a = p.parse_args()

  from imagen_jax.data import sources

  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    files = write_shards(Path(tmp), a.num, a.shards, a.source_size)

    def ours():
      stats = sources.SourceStats()
      recs = sources.sharded_file_records(files, sources.webdataset_records, 0, 1)
      return sum(1 for _ in sources.clean_records(recs, stats, image_size=a.image_size))

    def theirs():
      import webdataset as wds

      n = 0
      for sample in wds.WebDataset(files, shardshuffle=False).decode("pil"):
        img = sources.resize_center_crop(sources.to_rgb(sample["jpg"]), a.image_size)
        img.save(io.BytesIO(), format="PNG")
        n += 1
      return n

    rows["ours_records"] = timed(ours)
    rows["webdataset_lib"] = timed(theirs)
    if a.vocab:
      from imagen_jax.data import tasks

      task = tasks.register_source_task(
        "tar_throughput", "webdataset", a.vocab, image_size=a.image_size, path=",".join(files)
      )

      def task_stream():
        ds = task.get_dataset(split="train", shuffle=False, sequence_length=None)
        return sum(1 for _ in ds.as_numpy_iterator())

      rows["ours_task"] = timed(task_stream)
      if a.encoder:
        from imagen_jax.data import cache

        def cached():
          with tempfile.TemporaryDirectory() as out:
            s = cache.cache_embeddings(
              "tar_throughput",
              out,
              a.encoder,
              num_shards=a.shards,
              batch_size=64,
              max_length=16,
              progress=False,
            )
          return s.examples

        rows["cache_embeddings"] = timed(cached, repeats=1)
  result = {
    "date": time.strftime("%Y-%m-%d"),
    "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    "examples": a.num,
    "shards": a.shards,
    "source_size": a.source_size,
    "image_size": a.image_size,
    "examples_per_s": {k: round(v, 1) for k, v in rows.items()},
  }
  print(json.dumps(result, indent=1))
  if a.json:
    Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  main()
