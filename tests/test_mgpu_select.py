"""The Mosaic GPU radix select (benchmarks/mgpu_select_probe.py lowers it for CUDA on a CPU-only
machine); the radix select's algorithm, emulated in jnp with the kernel's own bit helpers,
selects exactly what the reference selects; and the select kernel itself, in interpret mode
(its inline shared-memory ops replaced by jnp scatters and gathers, one CTA), gives the
reference's words and top-K. Only a GPU runs the inline PTX and the barriers for real."""

import dataclasses
import time

import _ptxas
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import mgpu_select_probe
from pallas_kernels import mgpu_select, reference


def _assert_reference_topk(idx, val, g, k: int, seed: int) -> None:
  """idx and val are `reference.select(g, k, 'moc')`'s, bit for bit."""
  want_idx, want_val = reference.select(g, k, "moc")
  assert np.array_equal(idx, want_idx), f"{seed=}"
  assert np.array_equal(np.asarray(val, np.float32), np.asarray(want_val, np.float32)), f"{seed=}"


@pytest.mark.parametrize(
  "shape", [["--f=512", "--k=40"], ["--f=1408", "--k=256", "--num_valid=1376"]]
)
def test_select_probe_lowers_for_cuda(capsys, shape):
  """F = 512, and 1408 (the 60m layer) with padding channels; 4 CTAs for 8 rows, and 3 (the
  last round's rows for some CTAs only)."""
  mgpu_select_probe.main(["--lower_only", "--t=8", "--ctas=4,3", *shape])
  out = capsys.readouterr().out
  assert "mgpu_select: lowered for CUDA" in out and "mgpu_select_c3: lowered for CUDA" in out
  assert ("mgpu_topk: lowered for CUDA" in out) == ("--num_valid=1376" not in shape)


@pytest.mark.parametrize(
  ("f", "k", "num_valid"),
  [(512, 40, None), (1024, 1, None), (1536, 768, None), (5632, 1024, None), (5504, 1024, 5461)],
)
def test_select_algorithm_is_exact(f, k, num_valid):
  """Random rows, small-integer rows (many ties at the K-th value), an all-equal row, a row of
  -0.0, and padding channels that must never be selected: the emulated radix select's words
  equal the reference's."""
  seed = time.time_ns() % (2**31)
  keys = jax.random.split(jax.random.key(seed), 2)
  g = jax.random.normal(keys[0], (6, f)).astype(jnp.bfloat16)
  ties = jax.random.randint(keys[1], (6, f), -3, 4).astype(jnp.bfloat16)
  ties = ties.at[0].set(0.5).at[1].set(-0.0)
  for x in (g, ties):
    got = mgpu_select_probe.emulate_words(x, k, num_valid)
    want = mgpu_select_probe.reference_words(x, k, num_valid)
    assert np.array_equal(np.asarray(got), want), f"{seed=}"
    # the compaction's slots: channel c lands at slot s, so idx[s] = c, in ascending order
    slots = np.asarray(mgpu_select_probe.emulate_slots(got, f))
    idx, _ = reference.select(x[:, : num_valid or f], k, "moc")
    for row in range(x.shape[0]):
      chans = np.nonzero(slots[row] >= 0)[0]
      assert np.array_equal(slots[row, chans], np.arange(k)), f"{seed=}"
      assert np.array_equal(chans, np.asarray(idx[row])), f"{seed=}"


@pytest.mark.parametrize(("f", "k"), [(5632, 1024), (1408, 256), (640, 40), (256, 8)])
@pytest.mark.parametrize("spread", ["random", "one_block"])
def test_balanced_walk_finds_every_slots_channel(f, k, spread):
  """The balanced compaction's arithmetic (search, dropped bits, walk; `emulate_balanced`)
  puts the s-th selected channel at slot s: K channels chosen at random, or K consecutive
  ones (full words, with empty words before and after)."""
  rng = np.random.default_rng(time.time_ns() % (2**31))
  if spread == "random":
    chosen = np.sort(rng.choice(f, size=k, replace=False))
  else:
    start = rng.integers(0, f - k + 1)
    chosen = np.arange(start, start + k)
  bits = np.zeros(256 * 32, np.uint64)
  bits[chosen] = 1
  words = (bits.reshape(256, 32) << np.arange(32, dtype=np.uint64)).sum(axis=1)
  got = mgpu_select_probe.emulate_balanced(words.astype(np.uint32), k)
  assert np.array_equal(got, chosen)


def test_keep_lowest_keeps_the_lowest_set_bits():
  rng = np.random.default_rng(0)
  x = rng.integers(-(2**31), 2**31, 64, dtype=np.int64).astype(np.int32)
  m = rng.integers(0, 33, 64).astype(np.int32)
  got = np.asarray(mgpu_select_probe.keep_lowest(jnp.asarray(x), jnp.asarray(m)))
  for xi, mi, gi in zip(x.view(np.uint32), m, got.view(np.uint32), strict=True):
    bits = [b for b in range(32) if xi >> b & 1][:mi]
    assert gi == sum(1 << b for b in bits)


@pytest.mark.parametrize("async_rows", [False, True])
@pytest.mark.parametrize(
  ("f", "k", "num_valid"), [(512, 40, None), (640, 1, None), (1024, 512, None), (640, 64, 600)]
)
def test_select_kernel_in_interpret_mode(f, k, num_valid, async_rows):
  """The kernel's own dataflow (histograms cleared as they are read, scans, thresholds, tie
  cut, slots, the row loop; rows through the two-row buffer with `async_rows`) on random
  rows, tie-heavy rows, an all-equal row and a -0.0 row."""
  seed = time.time_ns() % (2**31)
  keys = jax.random.split(jax.random.key(seed), 2)
  g = jax.random.normal(keys[0], (3, f)).astype(jnp.bfloat16)
  ties = jax.random.randint(keys[1], (3, f), -3, 4).astype(jnp.bfloat16)
  ties = ties.at[0].set(0.5).at[1].set(-0.0)
  with_topk = num_valid is None and k % 8 == 0  # the top-K's rows leave by TMA: K % 8 == 0
  for x in (g, ties):
    words = mgpu_select.words(x, k, num_valid=num_valid, interpret=True, async_rows=async_rows)
    want = mgpu_select_probe.reference_words(x, k, num_valid)
    assert np.array_equal(np.asarray(words), want), f"{seed=}"
    if with_topk:
      idx, val = mgpu_select.select(x, k, interpret=True, async_rows=async_rows)
      _assert_reference_topk(idx, val, x, k, seed)


def test_select_refuses_what_it_cannot_do():
  """One clear error each: a 32-bit G, K not a multiple of 8 for the top-K, F not a multiple
  of 128."""
  g = jnp.zeros((4, 256), jnp.float32)
  with pytest.raises(ValueError, match="16-bit"):
    mgpu_select.select(g, 16)
  with pytest.raises(ValueError, match="K % 8"):
    mgpu_select.select(g.astype(jnp.bfloat16), 12)
  with pytest.raises(ValueError, match="F % 128"):
    mgpu_select.words(jnp.zeros((4, 200), jnp.bfloat16), 16)


def test_topk_select_through_mosaic_matches_reference():
  """`topk.select` with `selection='mgpu'`: the whole Mosaic top-K, and (compact) its words
  with the gathered compaction; interpret mode on the CPU."""
  from pallas_kernels import topk

  seed = time.time_ns() % (2**31)
  g = jax.random.normal(jax.random.key(seed), (3, 640)).astype(jnp.bfloat16)
  for compact in (False, True):
    cfg = topk.TopKConfig(selection="mgpu", compact=compact, apply_mode="gather")
    idx, val = topk.select(g, 64, "moc", config=cfg)
    _assert_reference_topk(idx, val, g, 64, seed)


@pytest.mark.parametrize("z_sel", [False, True])
def test_train_forward_with_mosaic_words_matches_triton(z_sel):
  """The train forward epilogue on the fused [G | U] buffer, padding channels included: the
  Mosaic words and everything computed from them equal the Triton selection's."""
  from pallas_kernels import moc_train, moc_train_mask

  seed = time.time_ns() % (2**31)
  gu = jax.random.normal(jax.random.key(seed), (4, 2 * 640)).astype(jnp.bfloat16)
  base = moc_train.forward_config(640)
  configs = [
    dataclasses.replace(base, selection="triton"),
    dataclasses.replace(base, selection="mgpu"),
  ]
  outs = [
    moc_train_mask.train_forward_bitmask(gu, None, 64, num_valid=600, config=c, z_sel=z_sel)
    for c in configs
  ]
  for want, got in zip(*outs, strict=True):
    assert np.array_equal(np.asarray(want, np.float32), np.asarray(got, np.float32)), f"{seed=}"


@pytest.mark.gpu
@pytest.mark.parametrize(
  "form", ["default", "sync", "one_store_per_ballot", "ballot_lanes", "balanced_walk"]
)
def test_mgpu_select_gpu_real_size(form):
  """Compiled on the GPU: the whole top-K at 16384 × 5632 (Gaussian and tie-heavy rows) and
  the words at the 1B layer's 5504 channels with 43 of padding (read from a row twice as wide,
  as the fused [G | U] buffer is), as the reference selects; in the defaults and each form."""
  kw = {
    "default": {},
    "sync": dict(async_rows=False, ballot_lanes=False),
    "one_store_per_ballot": dict(ballot_lanes=False),
    "ballot_lanes": dict(ballot_lanes=True),
    "balanced_walk": dict(balanced_walk=True),
  }[form]
  seed = time.time_ns() % (2**31)
  keys = jax.random.split(jax.random.key(seed), 2)
  g = jax.random.normal(keys[0], (16384, 5632)).astype(jnp.bfloat16)
  ties = jax.random.randint(keys[1], (16384, 5632), -3, 4).astype(jnp.bfloat16)
  for x in (g, ties):
    idx, val = mgpu_select.select(x, 1024, **kw)
    _assert_reference_topk(idx, val, x, 1024, seed)
  gu = jnp.concatenate([g[:, :5504], ties[:, :5504]], axis=1)
  kw.pop("balanced_walk", None)  # the whole top-K's only
  words = mgpu_select.words(gu, 1024, num_valid=5461, width=5504, **kw)
  assert np.array_equal(words, mgpu_select_probe.reference_words(g[:, :5504], 1024, 5461))


def test_auto_selection_takes_mosaic_only_where_it_can_run():
  """'auto' (the shipped defaults) never picks the Mosaic kernel in interpret mode, on a CPU,
  for 32-bit values or for F it cannot take; on the CPU the defaults' selection stays exact."""
  from pallas_kernels import moc_train, topk

  assert moc_train.FORWARD_DEFAULT.selection == "auto" == topk.GAUSS_GATHER.selection
  assert not mgpu_select.usable(jnp.bfloat16, 5504, interpret=True)
  assert not mgpu_select.usable(jnp.bfloat16, 5504, interpret=False)  # this CPU
  assert not mgpu_select.usable(jnp.float32, 5504, interpret=False)
  assert not mgpu_select.usable(jnp.bfloat16, 5461, interpret=False)
  seed = time.time_ns() % (2**31)
  g = jax.random.normal(jax.random.key(seed), (4, 640)).astype(jnp.bfloat16)
  idx, val = topk.select(g, 64, "moc")
  _assert_reference_topk(idx, val, g, 64, seed)


def test_auto_selection_on_a_hopper_gpu_and_its_escape_hatch(monkeypatch):
  """On a (stand-in) compute capability 9.0 GPU 'auto' takes the Mosaic kernel, not on 8.0;
  MOC_SELECTION=triton turns it off; any other value is one clear error."""

  class Gpu:
    platform = "gpu"

    def __init__(self, cc):
      self.compute_capability = cc

  for cc, want in (("9.0", True), ("8.0", False)):
    monkeypatch.setattr(jax, "devices", lambda cc=cc: [Gpu(cc)])
    assert mgpu_select.usable(jnp.bfloat16, 5504, interpret=False) == want
  monkeypatch.setenv("MOC_SELECTION", "triton")
  assert not mgpu_select.usable(jnp.bfloat16, 5504, interpret=False)
  monkeypatch.setenv("MOC_SELECTION", "mosaic")
  with pytest.raises(ValueError, match="MOC_SELECTION must be"):
    mgpu_select.usable(jnp.bfloat16, 5504, interpret=False)


def test_select_default_is_the_whole_mosaic_topk_where_usable(monkeypatch):
  """Where the Mosaic kernel is usable, `topk.select` without a config runs the whole top-K in
  it (`topk.MOSAIC`, the kernel in interpret mode here) and equals the reference; K % 8 != 0
  and 'moc_2of8' keep the Triton path."""
  from pallas_kernels import topk

  calls = []
  whole = mgpu_select.select
  monkeypatch.setattr(mgpu_select, "usable", lambda dtype, f, interpret: True)
  monkeypatch.setattr(mgpu_select, "select", lambda *a, **kw: calls.append(a) or whole(*a, **kw))
  seed = time.time_ns() % (2**31)
  g = jax.random.normal(jax.random.key(seed), (3, 640)).astype(jnp.bfloat16)
  idx, val = topk.select(g, 64, "moc", interpret=True)
  assert len(calls) == 1
  _assert_reference_topk(idx, val, g, 64, seed)
  odd = jax.random.normal(jax.random.key(seed + 1), (3, 600)).astype(jnp.bfloat16)
  idx, val = topk.select(odd, 64, "moc", interpret=True)  # padded to 640 inside
  assert len(calls) == 2
  _assert_reference_topk(idx, val, odd, 64, seed)
  kw = dict(dtype=g.dtype, interpret=True)
  assert topk.default_config(600, "moc", k=64, **kw) is topk.MOSAIC
  assert topk.default_config(640, "moc", k=60, **kw) is not topk.MOSAIC
  assert topk.default_config(640, "moc_2of8", k=64, **kw) is not topk.MOSAIC
  assert topk.default_config(640, "moc", k=64, **kw) is topk.MOSAIC


@pytest.mark.gpu
def test_auto_selection_on_gpu_is_mosaic_and_exact():
  """On a Hopper GPU the defaults' 'auto' is the Mosaic kernel, and `topk.select` (the whole
  Mosaic top-K) equals the reference at the 1B layer's width and at the paper's widths that
  are not multiples of 128 (padded inside)."""
  from pallas_kernels import topk

  assert mgpu_select.usable(jnp.bfloat16, 5504, interpret=False)
  seed = time.time_ns() % (2**31)
  for f, k in ((5504, 1024), (5461, 1024), (2736, 512), (1376, 256)):
    assert topk.default_config(f, "moc", k=k, dtype=jnp.bfloat16, interpret=False) is topk.MOSAIC
    g = jax.random.normal(jax.random.key(seed + f), (4096, f)).astype(jnp.bfloat16)
    idx, val = topk.select(g, k, "moc")
    _assert_reference_topk(idx, val, g, k, seed)


@pytest.mark.skipif(_ptxas.path() is None, reason="no ptxas on this machine")
def test_inline_ptx_assembles_for_hopper(monkeypatch, tmp_path, capsys):
  """Every inline PTX block the kernels emit (captured while lowering each form for CUDA),
  its operands bound to registers, assembles with ptxas for sm_90a: a syntax check of the
  PTX on a CPU machine (what it computes only a GPU tests)."""
  from pallas_kernels import _mgpu_compact

  snippets = _ptxas.record_asm(monkeypatch)
  mgpu_select_probe.main(["--lower_only", "--t=8", "--ctas=4", "--f=512", "--k=40"])
  mgpu_select_probe.main(
    ["--lower_only", "--t=8", "--ctas=3", "--f=1408", "--k=256", "--num_valid=1376"]
  )
  capsys.readouterr()
  partials = jax.ShapeDtypeStruct((2, 1, 512), jnp.float32)
  warm = jax.ShapeDtypeStruct((64, 96), jnp.bfloat16)  # the select's warming CTAs' prefetch
  fn = lambda p, w: mgpu_select.select_partials(
    p, 40, 500, jnp.bfloat16, interpret=False, ctas=1, warm=(w, 4096), warm_ctas=8
  )
  jax.jit(fn).trace(partials, warm).lower(lowering_platforms=("cuda",))
  assert len(snippets) >= 12  # counts, ballots, scans, stores, bit ops (popc, fns), compaction
  assert any("popc.b32" in text for text in snippets) and any("fns.b32" in t for t in snippets)
  assert _mgpu_compact.compact_loop() in snippets  # the top-K's bit walk
  assert _mgpu_compact.balanced_loop() in snippets  # and its balanced form
  assert any("%laneid" in t and "vote.sync" in t for t in snippets)  # ballots kept by lanes
  assert any(text.startswith("{\n\nst.shared.b16") for text in snippets)  # its row stash
  assert any("cp.async.bulk.prefetch.L2" in text for text in snippets)  # decode's warming
  done = _ptxas.assemble_snippets(snippets, tmp_path)
  assert done.returncode == 0, done.stderr


def test_probe_device_time_counts_the_calls_kernels():
  """`--device_time`'s measure: kernel time per call from a profile, more for more work."""
  x = jnp.ones((128, 128), jnp.float32)
  small = mgpu_select_probe.device_us(jax.jit(lambda a: a @ a), (x,), calls=5)
  big = mgpu_select_probe.device_us(jax.jit(lambda a: a @ a @ a @ a @ a @ a @ a @ a), (x,), 5)
  assert 0 < small < big


def test_a_swapped_forward_default_is_not_frozen_by_jits_cache(monkeypatch):
  """`common.forward_selection` swaps `moc_train.FORWARD_DEFAULT`; the epilogues pick their
  default config outside their jit, so a call after the swap runs the swapped kernel even
  when the same shapes were traced before it (until 2026-12-05d the first trace was reused:
  the benchmarks' selection rows in one process timed the default's program again)."""
  from benchmarks import common
  from pallas_kernels import moc_train_mask

  calls = []
  words = mgpu_select.words
  monkeypatch.setattr(mgpu_select, "words", lambda *a, **k: calls.append(1) or words(*a, **k))
  gu = jax.random.normal(jax.random.key(0), (5, 1536)).astype(jnp.bfloat16)  # shapes of its own:
  run = lambda: moc_train_mask.train_forward_bitmask(gu, None, 72, num_valid=700)  # no trace yet
  run()  # the default: on the CPU, the Triton selection
  assert not calls
  with common.forward_selection("mgpu"):
    run()
  assert calls == [1]


def test_forward_config_fields_reach_the_mosaic_select(monkeypatch):
  """`common.forward_selection(selection, async_rows=False)` (ffn_layer's `moc_pallas_sync`):
  the train forward's words come from the Mosaic select with its rows loaded at each row's
  start instead of copied one ahead (the default), and equal the default's."""
  from benchmarks import common
  from pallas_kernels import moc_train_mask

  seen = []
  words = mgpu_select.words
  monkeypatch.setattr(mgpu_select, "words", lambda *a, **k: seen.append(k) or words(*a, **k))
  gu = jax.random.normal(jax.random.key(3), (5, 1280)).astype(jnp.bfloat16)
  run = lambda: moc_train_mask.train_forward_bitmask(gu, None, 64, num_valid=600)
  with common.forward_selection("mgpu"):
    want = run()
  with common.forward_selection("mgpu", async_rows=False):
    got = run()
  assert [k["async_rows"] for k in seen] == [True, False]
  for w, g in zip(want, got, strict=True):
    assert np.array_equal(np.asarray(w, np.float32), np.asarray(g, np.float32))
