"""Scoring the demo model: loss over a token stream, and how it spreads tokens over experts.

Shared by `scripts/train_demo.py` (during and after training) and
`tests/test_demo.py` (on the committed checkpoint), so both measure the same way:

- The stream of token ids is cut into non-overlapping windows of the model's
  `sequence_len`: window w reads ids[w*T : w*T+T] and predicts
  ids[w*T+1 : w*T+T+1], so every id but the first is predicted exactly once,
  from the ids before it in its window. The last window is right-padded with
  the pad token, which the model never attends to and which is never scored.
- Windows go through `grok_moe.forward` (float32 activations) in batches of a
  fixed size, the last batch padded with empty windows, so one compilation
  serves the whole stream.
- Loss is the mean cross-entropy in nats per predicted token. Expert counts
  are the routed (token, expert) assignments of every real (non-pad) input
  token, per layer; shares divide them by their layer's total.
- The unigram baseline is `demo_data.unigram_cross_entropy` of the stream
  under the training counts committed in `checkpoints/demo/unigram_counts.json`
  (`read_train_counts`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import grok_moe
from grok_moe.config import ModelConfig
from scripts import demo_data

DEFAULT_BATCH_SIZE = 192  # windows: the committed validation sample (185 windows) in one batch
EVAL_TILE_SIZE = 2048  # MoE tile rows: 192 windows of 256 tokens give each expert ~12k rows


@dataclasses.dataclass(frozen=True)
class StreamScore:
    """The loss of a token stream and its routing counts."""

    nats_per_token: float
    num_predicted: int
    expert_counts: np.ndarray  # [L, E] routed assignments per layer and expert

    @property
    def expert_shares(self) -> np.ndarray:
        """[L, E]: each expert's fraction of its layer's routed assignments."""
        return self.expert_counts / self.expert_counts.sum(axis=-1, keepdims=True)


def stream_windows(ids: np.ndarray, window: int, pad_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets [W, window] covering `ids` (see the module docstring); pads are `pad_token`."""
    num_windows = -(-(len(ids) - 1) // window)
    padded = np.full(num_windows * window + 1, pad_token, dtype=np.int32)
    padded[:len(ids)] = ids
    inputs = padded[:-1].reshape(num_windows, window)
    targets = padded[1:].reshape(num_windows, window)
    return inputs, targets


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_score(params, inputs, targets, config: ModelConfig):
    """Summed NLL and prediction count of one batch [B, T], and its expert counts [L, E]."""
    out = grok_moe.forward(params, inputs, config, dtype=jnp.float32, return_routing=True,
                           tile_size=EVAL_TILE_SIZE)
    log_probs = jax.nn.log_softmax(out.logits, axis=-1)                            # [B, T, V]
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
    scored = targets != config.pad_token                                           # [B, T]
    nll = -jnp.sum(jnp.where(scored, target_log_probs, 0.0))
    routed = jax.nn.one_hot(out.routing.expert_indices, config.num_experts,
                            dtype=jnp.int32)                                       # [L, B, T, k, E]
    real = (inputs != config.pad_token)[None, :, :, None, None]                    # [1, B, T, 1, 1]
    counts = jnp.sum(jnp.where(real, routed, 0), axis=(1, 2, 3))                   # [L, E]
    return nll, jnp.sum(scored), counts


def score_windows(params, config: ModelConfig, inputs: np.ndarray, targets: np.ndarray,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> StreamScore:
    """Loss and routing of the model on windows [W, T] of inputs and targets (pads not scored)."""
    num_batches = -(-len(inputs) // batch_size)
    filler = np.full((num_batches * batch_size - len(inputs), inputs.shape[1]), config.pad_token,
                     np.int32)
    inputs, targets = np.concatenate([inputs, filler]), np.concatenate([targets, filler])
    total_nll, total_predicted = 0.0, 0
    counts = np.zeros((config.num_layers, config.num_experts), np.int64)
    for batch in range(num_batches):
        rows = slice(batch * batch_size, (batch + 1) * batch_size)
        nll, predicted, batch_counts = _batch_score(params, inputs[rows], targets[rows], config)
        total_nll += float(nll)
        total_predicted += int(predicted)
        counts += np.asarray(batch_counts)
    return StreamScore(total_nll / total_predicted, total_predicted, counts)


def score_stream(params, config: ModelConfig, ids: np.ndarray,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> StreamScore:
    """Loss and routing of the model on the token stream `ids` (float or int8 params)."""
    inputs, targets = stream_windows(np.asarray(ids), config.sequence_len, config.pad_token)
    return score_windows(params, config, inputs, targets, batch_size)


def read_train_counts(path: Path) -> np.ndarray:
    """The training token counts of `unigram_counts.json` (written by demo_data.py)."""
    return np.asarray(json.loads(Path(path).read_text())["counts"], dtype=np.int64)


def encode_file(tokenizer_path: Path, text_path: Path) -> np.ndarray:
    """Token ids (no BOS/EOS) of a UTF-8 text file under the demo tokenizer."""
    tokenizer = demo_data.load_tokenizer(Path(tokenizer_path).read_bytes())
    return demo_data.encode(tokenizer, Path(text_path).read_text(encoding="utf-8"))
