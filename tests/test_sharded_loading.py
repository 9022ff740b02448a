"""Sharded checkpoint loading: memory-mapped safetensors, chunked converted checkpoints, and
`load(..., mesh=)` placing every leaf as `param_specs` says with values bit-equal to the unsharded
load, reading each owned slice once (8 host CPU devices, in a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from gemma.io.formats import common, hf
from gemma.io.formats import converted as CV
from gemma.io.formats.common import CheckpointError
from gemma.model.params import abstract, leaf_names
from tests.conftest import fixture_dir

HERE = os.path.dirname(os.path.abspath(__file__))
HF_FIXTURES = ("e_style", "moe")


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_memmap_reader_equals_safe_open_and_transforms_stay_views(name):
  path = Path(fixture_dir(name))
  f = path / "model.safetensors"
  handle = safe_open(str(f), framework="numpy")
  tensors = dict(hf.iter_safetensors([f]))
  assert set(tensors) == set(handle.keys())
  tree = abstract(hf.read_config(path))
  shapes = dict(zip(leaf_names(tree), (x.shape for x in jax.tree.leaves(tree)), strict=True))
  views = 0
  for tensor, read in tensors.items():
    got, want = read(), handle.get_tensor(tensor)
    assert got.dtype == want.dtype and np.array_equal(got, want), tensor
    assert common.is_file_backed(got), tensor
    mapped = hf.map_name(tensor)
    if isinstance(mapped, common.Mapped) and all(t in shapes for t in mapped.targets):
      # transposes, axis splits and np.split keep views: a slice reads only its own pages
      want_shapes = [shapes[t] for t in mapped.targets]
      out = mapped.transform(got, want_shapes if len(want_shapes) > 1 else want_shapes[0])
      for a in out if isinstance(out, list) else [out]:
        assert common.is_file_backed(a), tensor
        views += 1
  assert views > 100


def test_memmap_reader_dtypes_and_bad_headers(tmp_path):
  from safetensors.numpy import save_file

  data = {"a": np.arange(6, dtype=np.float16).reshape(2, 3),
          "b": np.arange(4).astype(ml_dtypes.bfloat16), "c": np.zeros((0, 3), np.float32),
          "d": np.array(7, np.int32)}
  save_file(data, str(tmp_path / "x.safetensors"))
  got = {n: read() for n, read in hf.iter_safetensors([tmp_path / "x.safetensors"])}
  for name, want in data.items():
    assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
    assert np.array_equal(got[name], want), name
  raw = (tmp_path / "x.safetensors").read_bytes()
  (tmp_path / "short.safetensors").write_bytes(raw[:-4])
  with pytest.raises(CheckpointError, match=r"short.safetensors.*data_offsets"):
    list(hf.iter_safetensors([tmp_path / "short.safetensors"]))
  (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 8 + b"{}")
  with pytest.raises(CheckpointError, match=r"junk.safetensors.*header length"):
    list(hf.iter_safetensors([tmp_path / "junk.safetensors"]))


def test_unsharded_leaves_are_copied_out_of_the_map():
  f = Path(fixture_dir("e_style")) / "model.safetensors"
  mapped = dict(hf.iter_safetensors([f]))["model.embed_tokens.weight"]()
  for dtype in (np.float32, jnp.bfloat16):  # a copy even when no cast is needed
    host = common.host_array(mapped.T, dtype)
    assert not common.is_file_backed(host) and host.dtype == dtype
    assert np.array_equal(host, mapped.T.astype(dtype))
  plain = np.ones(3, np.float32)
  assert common.host_array(plain, np.float32) is plain  # in-memory tensors: no extra copy


def test_converted_checkpoints_are_stored_in_bounded_chunks(tmp_path, monkeypatch):
  import tensorstore as ts

  from gemma.io.checkpoint import load

  cfg, params = load(fixture_dir("e_style"), jnp.float32)
  monkeypatch.setattr(CV, "CHUNK_BYTES", 8192)  # the embedding (128 KiB) becomes 16 chunks
  out = CV.save_converted(tmp_path / "conv", cfg, params)
  store = ts.open({"driver": "zarr", "kvstore": {
      "driver": "ocdbt", "base": f"file://{out / CV.PARAMS_DIR}/", "path": "embed"}}).result()
  chunk = store.chunk_layout.read_chunk.shape
  assert np.prod(chunk) * 4 <= 8192 and tuple(chunk) != tuple(params.embed.shape)
  _, got = CV.load(out, jnp.float32)
  assert all(np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True))


def test_mesh_must_be_a_mesh():
  from gemma.io.checkpoint import load

  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    load(fixture_dir("e_style"), jnp.float32, mesh="2x4")


@pytest.mark.slow
def test_sharded_load_equals_unsharded_and_reads_owned_slices_once(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_loading_check.py"),
                         str(tmp_path), *HF_FIXTURES],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(result) == {*HF_FIXTURES, "converted", "quant_on_load", "converted_quantized",
                         "official_orbax"}
  for case, r in result.items():
    # every leaf (QArray children included) where param_specs puts it, bit-equal to 1 device
    assert r["sharding_ok"] == r["leaves"] and r["equal"] == r["leaves"], (case, r)
  for name in HF_FIXTURES:
    r = result[name]
    assert r["file_backed"] == r["leaves"], r  # every leaf sliced from the mapped file
    # each distinct owned slice read once: all reads together are the params' size, whatever
    # the replication (jax asks once per device; 8 devices would read replicated slices 2-8x)
    assert r["exact_reads"] == r["leaves"] and r["read_bytes"] == r["param_bytes"], r
    # a weight split 8 ways is read as 8 slices of 1/8 each
    assert r["split8"] > 0 and r["split8_ok"] == r["split8"], r
