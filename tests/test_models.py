import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from scalelab import models


def test_conditional_vae_shapes_and_loss():
    vae = models.ConditionalVAE(6, 3, latent=2, hidden=5, rngs=nnx.Rngs(0))
    x = jnp.full((4, 6), 0.5)
    y = jnp.array([0, 1, 2, 0])
    logits, mu, logvar = vae(x, y, jax.random.key(0))
    assert logits.shape == (4, 6) and mu.shape == logvar.shape == (4, 2)
    loss = models.vae_loss(vae, x, y, jax.random.key(0))
    assert loss.shape == () and jnp.isfinite(loss) and loss > 0
    gen = vae.generate(y, jax.random.key(1))
    assert gen.shape == (4, 6) and float(gen.min()) >= 0 and float(gen.max()) <= 1


def test_conditional_vae_rejects_bad_sizes():
    with pytest.raises(ValueError, match=">= 1"):
        models.ConditionalVAE(6, 0, rngs=nnx.Rngs(0))
