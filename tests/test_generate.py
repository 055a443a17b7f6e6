"""KV-cache generation: cache logits = full forward, kernel path = xla path, sampling, CLI."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moc_jax import generate, model_config
from moc_jax.model import Transformer

TINY = dict(vocab_size=64, d_model=32, d_ff=88, num_layers=2, num_heads=2, k=16)


def _model(
  ffn: str = "moc", backend: str = "xla", seed: int = 0, decode_attention: str = "xla"
) -> Transformer:
  cfg = model_config.ModelConfig(
    **TINY,
    ffn=ffn,
    dtype="float32",
    attention="xla",
    kernel_backend=backend,
    decode_attention=decode_attention,
  )
  return Transformer(cfg, nnx.Rngs(seed))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny fp32 MoC model trained a few steps by the project's trainer on the embedded corpus."""
  from configs import default
  from moc_jax import trainer

  cfg = default.get_config()
  cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 4, 4, 32
  cfg.train.log_every = 2
  cfg.eval.every, cfg.eval.batches = 4, 1
  cfg.checkpoint.every, cfg.checkpoint.async_save = 4, False
  workdir = str(tmp_path_factory.mktemp("gen"))
  trainer.train(cfg, workdir)
  return workdir


@pytest.mark.parametrize(("ffn", "attn"), [("moc", "xla"), ("dense", "xla"), ("moc", "pallas")])
def test_cache_decode_logits_match_forward(ffn, attn):
  """Prefill of right-padded prompts, then single steps (their attention through XLA or the
  one-kernel decode attention): logits equal the full forward's."""
  model = _model(ffn, seed=1, decode_attention=attn)
  graphdef, state = nnx.split(model)  # jitted: one compile per shape, not one per op
  decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  seqs = [[1, 5, 9, 13, 2, 7, 30, 31], [3, 4, 60, 8, 11, 12, 40, 41]]
  lengths, steps = [5, 3], 3
  prompt_len = max(lengths)
  tokens = np.zeros((2, prompt_len), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = seqs[b][:n]
  cache = model.init_cache(2, prompt_len + steps)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
  logits, cache = decode(state, jnp.asarray(tokens), positions, cache)
  got = [[logits[b, n - 1]] for b, n in enumerate(lengths)]
  for i in range(steps):
    pos = jnp.asarray([[n + i] for n in lengths])
    tok = jnp.asarray([[seqs[b][n + i]] for b, n in enumerate(lengths)])
    step_logits, cache = decode(state, tok, pos, cache)
    for b in range(2):
      got[b].append(step_logits[b, 0])
  for b, n in enumerate(lengths):
    full = forward(state, jnp.asarray([seqs[b][: n + steps]]))[0]
    np.testing.assert_allclose(np.stack(got[b]), full[n - 1 : n + steps], atol=2e-5, rtol=2e-5)


def test_greedy_kernel_path_matches_xla_on_trained_model(trained_workdir):
  """fp32 trained tiny model: the Pallas decode kernels (interpret mode on CPU) and the jnp
  reference produce the same greedy tokens for a batch of prompts of different lengths."""
  model, tok = generate.load(trained_workdir, backend="xla")
  assert model.cfg.ffn == "moc" and model.cfg.dtype == "float32"
  prompts = [[tok.bos_id, *tok.encode("def ")], [tok.bos_id, *tok.encode("import os\nclass A")]]
  kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id)
  want = generate.generate(model, prompts, 6, **kw)
  got = generate.generate(generate.with_backend(model, "pallas"), prompts, 6, **kw)
  assert got == want
  # and with each step's attention as one kernel too
  both = generate.with_backend(model, "pallas", decode_attention="pallas")
  assert generate.generate(both, prompts, 6, **kw) == want
  # RoPE and the q, k, v split inside that kernel; every GEMV on output-major weights
  fused = generate.with_backend(model, "pallas", decode_attention="fused", decode_gemv="rowdot")
  assert generate.generate(fused, prompts, 6, **kw) == want
  assert all(len(w) > 0 for w in want)


def test_cli_prints_prompt_and_continuation(trained_workdir, capsys):
  rc = generate.main(["--workdir", trained_workdir, "--prompt", "def f", "--max_new_tokens=3"])
  assert rc == 0
  captured = capsys.readouterr()
  assert captured.out.startswith("def f")
  assert "new tokens in" in captured.err  # the count and time go to stderr, not the text


def test_cli_rejects_bad_options(trained_workdir, capsys):
  argv = ["--workdir", trained_workdir, "--prompt", "x", "--compiler_options=xla_no_such=1"]
  with pytest.raises(SystemExit) as e:
    generate.main(argv)
  assert e.value.code == 2
  assert "--compiler_options" in capsys.readouterr().err
  argv = ["--workdir", trained_workdir, "--prompt", "x", "--decode_attention=flash"]
  with pytest.raises(SystemExit) as e:
    generate.main(argv)
  assert e.value.code == 2
  assert "model.decode_attention='flash'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    generate.main(["--workdir", trained_workdir, "--prompt", "x", "--decode_gemv=colmajor"])
  assert e.value.code == 2
  assert "model.decode_gemv='colmajor'" in capsys.readouterr().err


def test_compiler_options_reach_their_own_program():
  """Options compile a separate program (a real XLA option; a CPU ignores what it means), with
  the same tokens; an unknown option is refused by XLA, not dropped."""
  model = generate.with_backend(_model(), "xla")
  prompts = [[1, 2, 3]]
  plain = generate.generate(model, prompts, 4)
  assert (
    generate.generate(model, prompts, 4, compiler_options={"xla_gpu_enable_pdl": True}) == plain
  )
  with pytest.raises(Exception, match="xla_no_such_option"):
    generate.generate(model, prompts, 4, compiler_options={"xla_no_such_option": 1})


def test_eos_stops_and_sampling_is_seeded():
  model = generate.with_backend(_model(), "xla")
  prompts = [[1, 2, 3], [4]]
  greedy = generate.generate(model, prompts, 5)
  assert [len(g) for g in greedy] == [5, 5]
  # Stop at the token greedy decoding emits first: nothing is returned for that row.
  stopped = generate.generate(model, prompts, 5, eos_id=greedy[0][0])
  assert stopped[0] == []
  hot = generate.Sampling(temperature=1.0, top_p=0.9)
  a = generate.generate(model, prompts, 5, sampling=hot, seed=3)
  assert a == generate.generate(model, prompts, 5, sampling=hot, seed=3)
  # top_p so small that only the best token survives: sampling becomes greedy.
  narrow = generate.Sampling(temperature=1.0, top_p=1e-6)
  assert generate.generate(model, prompts, 5, sampling=narrow, seed=4) == greedy


def test_compiled_generation_repeats_generate_on_an_executable_of_its_own(monkeypatch):
  """compile_generation = generate (the EOS cut too); it traces anew, and what it traced stays:
  a model patched while it compiled keeps the patch after it is undone (benchmarks rely on it)."""
  from moc_jax.model import FeedForward

  model = generate.with_backend(_model(), "xla")
  prompts = [[1, 2, 3], [4]]
  greedy = generate.generate(model, prompts, 5)
  eos = greedy[1][2]
  run = generate.compile_generation(model, prompts, 5, eos_id=eos)
  assert run() == run() == generate.generate(model, prompts, 5, eos_id=eos)
  monkeypatch.setattr(FeedForward, "decode", lambda self, h, norm, warm=None: 50 * h)  # loud
  loud = generate.compile_generation(model, prompts, 5)
  monkeypatch.undo()
  assert loud() != greedy and loud() == loud()
  assert generate.compile_generation(model, prompts, 5)() == greedy
  with pytest.raises(ValueError, match="positive"):
    generate.compile_generation(model, prompts, 0)


def test_top_p_keeps_the_smallest_set_with_enough_mass():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  s = generate.Sampling(temperature=1.0, top_p=0.7)
  draws = {int(generate.sample(logits, jax.random.key(i), s)[0]) for i in range(200)}
  assert draws == {0, 1}


def test_with_backend_keeps_parameters():
  model = _model()
  other = generate.with_backend(model, "pallas")
  assert other.cfg == dataclasses.replace(model.cfg, kernel_backend="pallas")
  same = jax.tree.map(
    lambda a, b: bool(jnp.array_equal(a, b)),
    nnx.state(model, nnx.Param),
    nnx.state(other, nnx.Param),
  )
  assert all(jax.tree.leaves(same))
