"""Flax NNX models shared by the chapters.

Small on purpose: they train in seconds on a laptop CPU, so every chapter can measure
what it teaches on real training runs.
"""

from __future__ import annotations

import itertools

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


class MLP(nnx.Module):
    """A multilayer perceptron classifier for flat inputs: ``backbone`` then ``head``.

    The split into a backbone (feature layers) and a head (the last linear layer) is what
    transfer learning uses: keep the backbone, replace or retrain the head.
    """

    def __init__(self, features: int, classes: int, hidden: tuple[int, ...] = (128, 64),
                 dropout: float = 0.0, *, rngs: nnx.Rngs):
        if features < 1 or classes < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"features, classes and hidden sizes must be >= 1, got {features}, {classes}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_shape = (features,)
        sizes = (features, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(hidden[-1], classes, rngs=rngs)

    def backbone(self, x: jax.Array, rngs: jax.Array | None = None) -> jax.Array:
        """The feature layers. ``rngs``: a key for dropout (else the module's own stream)."""
        for i, layer in enumerate(self.layers):
            key = None if rngs is None else jax.random.fold_in(rngs, i)  # one mask stream per layer
            x = self.dropout(nnx.relu(layer(x)), rngs=key)
        return x

    def __call__(self, x: jax.Array, rngs: jax.Array | None = None) -> jax.Array:
        return self.head(self.backbone(x, rngs))


class CNN(nnx.Module):
    """A small convolutional classifier for square grey images given flat (n, side*side)."""

    def __init__(self, side: int, classes: int, channels: tuple[int, int] = (16, 32),
                 *, rngs: nnx.Rngs):
        if side < 2 or classes < 1 or min(channels) < 1:
            raise ValueError(f"need side >= 2, classes >= 1, channels >= 1; got {side}, {classes}, {channels}")
        self.side = side
        self.input_shape = (side * side,)
        self.conv1 = nnx.Conv(1, channels[0], (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
        self.dense = nnx.Linear(channels[1] * (side // 2) ** 2, 64, rngs=rngs)
        self.head = nnx.Linear(64, classes, rngs=rngs)

    def backbone(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], self.side, self.side, 1)
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone(x))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
