import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma.inference.sampling import Sampler, sample

LOGITS = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))


def _draws(sampler, seed=0):
  return np.asarray(sample(LOGITS, jax.random.key(seed), sampler))


def test_greedy_is_argmax():
  logits = jax.random.normal(jax.random.key(1), (3, 50))
  assert (np.asarray(sample(logits, jax.random.key(0), Sampler())) ==
          np.asarray(logits.argmax(-1))).all()


def test_temperature_sampling_follows_probabilities():
  counts = np.bincount(_draws(Sampler(temperature=1.0)), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_seeded_and_reproducible():
  s = Sampler(temperature=0.8, top_k=3)
  assert (_draws(s, 7) == _draws(s, 7)).all()
  assert not (_draws(s, 7) == _draws(s, 8)).all()


def test_top_k_support():
  assert set(_draws(Sampler(temperature=1.0, top_k=2))) == {0, 1}


def test_top_p_support():
  # 0.5 + 0.3 reaches 0.8: tokens 0, 1 only; 0.81 also needs token 2
  assert set(_draws(Sampler(temperature=1.0, top_p=0.8))) == {0, 1}
  assert set(_draws(Sampler(temperature=1.0, top_p=0.81))) == {0, 1, 2}
  assert set(_draws(Sampler(temperature=1.0, top_p=0.1))) == {0}


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_parameters_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Sampler(**kwargs)
