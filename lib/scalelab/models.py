"""Flax NNX models shared by the chapters.

Small on purpose: they train in seconds on a laptop CPU, so every chapter can measure
what it teaches on real training runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ConditionalVAE(nnx.Module):
    """A class-conditional variational autoencoder for flat images in [0, 1].

    The encoder sees the image and its one-hot label and outputs the mean and log
    variance of a Gaussian over the latent code; the decoder turns a latent code and a
    label back into pixel probabilities. Sampling a code from N(0, I) with a chosen
    label generates a new image of that class.
    """

    def __init__(self, features: int, classes: int, latent: int = 8, hidden: int = 128,
                 *, rngs: nnx.Rngs):
        if min(features, classes, latent, hidden) < 1:
            raise ValueError("features, classes, latent and hidden must all be >= 1")
        self.classes = classes
        self.latent = latent
        self.enc = nnx.Linear(features + classes, hidden, rngs=rngs)
        self.mu = nnx.Linear(hidden, latent, rngs=rngs)
        self.logvar = nnx.Linear(hidden, latent, rngs=rngs)
        self.dec1 = nnx.Linear(latent + classes, hidden, rngs=rngs)
        self.dec2 = nnx.Linear(hidden, features, rngs=rngs)

    def _onehot(self, y: jax.Array) -> jax.Array:
        return jax.nn.one_hot(y, self.classes)

    def encode(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nnx.relu(self.enc(jnp.concatenate([x, self._onehot(y)], axis=-1)))
        return self.mu(h), self.logvar(h)

    def decode_logits(self, z: jax.Array, y: jax.Array) -> jax.Array:
        h = nnx.relu(self.dec1(jnp.concatenate([z, self._onehot(y)], axis=-1)))
        return self.dec2(h)

    def __call__(self, x: jax.Array, y: jax.Array, key: jax.Array):
        mu, logvar = self.encode(x, y)
        z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
        return self.decode_logits(z, y), mu, logvar

    def generate(self, y: jax.Array, key: jax.Array) -> jax.Array:
        """Pixel probabilities of new images of classes ``y`` (codes drawn from the prior)."""
        z = jax.random.normal(key, (y.shape[0], self.latent))
        return jax.nn.sigmoid(self.decode_logits(z, y))


def vae_loss(model: ConditionalVAE, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
    """Negative evidence lower bound per example: reconstruction (Bernoulli) + KL to N(0, I)."""
    logits, mu, logvar = model(x, y, key)
    recon = jnp.sum(
        jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits))), axis=-1
    )
    kl = -0.5 * jnp.sum(1 + logvar - mu**2 - jnp.exp(logvar), axis=-1)
    return jnp.mean(recon + kl)
