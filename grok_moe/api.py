"""`Model`: a loaded Grok-style model with its tokenizer, for notebooks and run.py."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from grok_moe import checkpoint, compilation, model, sampling
from grok_moe import params as param_table
from grok_moe.config import ModelConfig
from grok_moe.errors import InputError, TokenizerError
from grok_moe.model import Routing
from grok_moe.sharding import ShardingPlan, fetch
from grok_moe.tokenizer import TextStream, Tokenizer

TOKENIZER_FILE = "tokenizer.model"


def _find_tokenizer(checkpoint_path) -> str:
  """tokenizer.model beside ckpt-0, or one level up (checkpoints/ for the release)."""
  path = pathlib.Path(checkpoint_path)
  root = path.parent if path.name == checkpoint.TENSOR_DIR else path
  for candidate in (root / TOKENIZER_FILE, root.parent / TOKENIZER_FILE):
    if candidate.is_file():
      return os.fspath(candidate)
  raise TokenizerError(f"no {TOKENIZER_FILE} found beside {root}; pass tokenizer=PATH "
                       "(--tokenizer) with the checkpoint's SentencePiece model")


@dataclasses.dataclass
class GenerationStats:
  """Counts and times of the last generate/stream call.

  The first step's time includes compiling the prefill, the second's
  compiling the decode step (once per shape), so the decode rate counts only
  the steps after the second.
  """
  new_tokens: int = 0
  first_token_s: float = 0.0   # prefill and the first sample
  second_token_s: float = 0.0  # ... and the first decode step
  total_s: float = 0.0
  steps: int = 0               # steps of the sampler (one token per active row each)
  steady_tokens: int = 0       # tokens of the steps after the second
  compile_s: float = 0.0       # of total_s, the time JAX spent compiling (0 on a cache hit)

  @property
  def decode_tokens_per_s(self) -> float:
    """Tokens per second after the second step (steady decoding, compilation excluded)."""
    decode_s = self.total_s - self.second_token_s
    return self.steady_tokens / decode_s if self.steady_tokens and decode_s > 0 else 0.0

  def add_step(self, tokens: int, elapsed_s: float) -> None:
    """Counts one step of `tokens` new tokens (one per active row), `elapsed_s` after the start."""
    self.steps += 1
    self.new_tokens += tokens
    self.total_s = elapsed_s
    if self.steps == 1:
      self.first_token_s = elapsed_s
    elif self.steps == 2:
      self.second_token_s = elapsed_s
    else:
      self.steady_tokens += tokens


class Model:
  """A Grok-style model, its parameters and its tokenizer.

  Example:
    >>> model = Model.from_checkpoint("checkpoints/demo")
    >>> print(model.generate("ROMEO:", max_new_tokens=20, temperature=0))
  """

  def __init__(self, params, config: ModelConfig, tokenizer: Tokenizer | None = None,
               dtype="bfloat16", sharding: ShardingPlan | None = None,
               compilation_cache=None):
    """`sharding` runs the model on a mesh (see grok_moe.sharding); params not yet
    placed by it are placed now. `compilation_cache` is the directory of JAX's
    persistent compilation cache (None: $GROK_MOE_COMPILATION_CACHE, else
    ~/.cache/grok_moe/jax; False: off; see grok_moe.compilation)."""
    self.compilation_cache = compilation.use_persistent_cache(compilation_cache)
    self._compile_timer = compilation.CompileTimer()
    if sharding is not None:
      sharding.check_config(config)
      params = sharding.shard_params(params)
    self.params = param_table.as_stacked(params, config)
    self.config = config
    self.tokenizer = tokenizer
    self.dtype = jnp.dtype(dtype).name
    self.sharding = sharding
    self.last_stats = GenerationStats()
    if tokenizer is not None:
      tokenizer.check_fits(config)

  @classmethod
  def from_checkpoint(cls, path, config: ModelConfig | None = None,
                      tokenizer: Tokenizer | str | os.PathLike | None = None,
                      mesh=None, dtype="bfloat16", progress: bool = True,
                      moe_sharding: str = "tensor", compilation_cache=None) -> "Model":
    """Loads a release-format checkpoint (a directory holding ckpt-0/, or ckpt-0/ itself).

    The config comes from config.json beside ckpt-0 (Grok-1 for the release);
    the tokenizer from `tokenizer` or tokenizer.model beside the checkpoint.
    With `mesh` (grok_moe.make_mesh) each tensor goes straight into its
    shards as it is read, and the model runs on the mesh; `moe_sharding` is
    "tensor" (every device a slice of every expert) or "expert" (whole experts).

    Example:
      >>> model = Model.from_checkpoint("checkpoints/demo", dtype="float32")
      >>> grok = Model.from_checkpoint("checkpoints", mesh=grok_moe.make_mesh(1, 8))
    """
    config = checkpoint.checkpoint_config(path, config)
    plan = None if mesh is None else ShardingPlan(config, mesh, moe_sharding)
    if not isinstance(tokenizer, Tokenizer):
      tokenizer = Tokenizer(tokenizer if tokenizer is not None else _find_tokenizer(path))
    tokenizer.check_fits(config)
    params = checkpoint.load_checkpoint(path, config, progress=progress, sharding=plan)
    return cls(params, config, tokenizer, dtype, sharding=plan,
               compilation_cache=compilation_cache)

  # --- Text in, text out. ---

  def _require_tokenizer(self) -> Tokenizer:
    if self.tokenizer is None:
      raise TokenizerError("this Model has no tokenizer; pass one to Model(...) or "
                           "use the token-level methods")
    return self.tokenizer

  def _stream_rows(self, prompts: Sequence[str], stop, truncate, settings) -> Iterator[list[str]]:
    tokenizer = self._require_tokenizer()
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    ids = [tokenizer.encode(prompt) for prompt in prompts]
    stats = self.last_stats = GenerationStats()
    compiled_before = self._compile_timer.seconds
    start = time.perf_counter()
    for step in sampling.generate(self.params, self.config, ids,
                                  sampling.SamplingConfig(**settings), dtype=self.dtype,
                                  truncate=truncate, vocab_limit=tokenizer.vocab_size,
                                  sharding=self.sharding):
      stats.add_step(int(step.active.sum()), time.perf_counter() - start)
      stats.compile_s = self._compile_timer.seconds - compiled_before
      pieces = []
      for row, stream in enumerate(streams):
        token = int(step.tokens[row])
        if stream.stopped or not step.active[row] or token == self.config.eos_token:
          pieces.append("")
          continue
        pieces.append(stream.add(token))
      yield pieces
      if all(stream.stopped for stream in streams):
        return
    yield [stream.finish() for stream in streams]

  def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
               stop: str | Sequence[str] | None = None, truncate: bool = False):
    """Completes a prompt (str -> str) or a batch of prompts (list -> list), at once.

    Stops at EOS, after max_new_tokens, or before the first stop string.
    temperature=0 is greedy. An empty prompt starts from BOS.

    Example:
      >>> model.generate(["ROMEO:", "JULIET:"], max_new_tokens=16, seed=1)
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [""] * len(prompts)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=seed)
    for pieces in self._stream_rows(prompts, stop, truncate, settings):
      texts = [text + piece for text, piece in zip(texts, pieces)]
    return texts[0] if isinstance(prompt, str) else texts

  def stream(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
             top_p: float = 0.95, top_k: int = 0, seed: int = 0,
             stop: str | Sequence[str] | None = None, truncate: bool = False) -> Iterator[str]:
    """Yields the completion of one prompt piece by piece, as it is generated.

    Example:
      >>> for piece in model.stream("ROMEO:", max_new_tokens=32):
      ...   print(piece, end="", flush=True)
    """
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=seed)
    for (piece,) in self._stream_rows([prompt], stop, truncate, settings):
      if piece:
        yield piece

  # --- Tokens in, tokens out. ---

  def generate_tokens(self, token_ids, *, max_new_tokens: int = 64, temperature: float = 0.8,
                      top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                      truncate: bool = False):
    """New token ids for one prompt (list of ids -> list) or a batch (list of lists).

    EOS ends a row and is not returned.

    Example:
      >>> model.generate_tokens([1, 523, 88], max_new_tokens=8, temperature=0)
    """
    single = len(token_ids) == 0 or np.ndim(token_ids[0]) == 0
    prompts = [list(token_ids)] if single else [list(row) for row in token_ids]
    settings = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, seed=seed)
    rows: list[list[int]] = [[] for _ in prompts]
    for step in sampling.generate(self.params, self.config, prompts, settings,
                                  dtype=self.dtype, truncate=truncate, sharding=self.sharding):
      for row, token in enumerate(step.tokens):
        if step.active[row] and token != self.config.eos_token:
          rows[row].append(int(token))
    return rows[0] if single else rows

  def _token_batch(self, tokens) -> np.ndarray:
    """str, list of ids, or [B, T] ids -> int32 [B, T], checked against the vocabulary."""
    if isinstance(tokens, str):
      tokens = [self._require_tokenizer().encode(tokens) or [self.config.bos_token]]
    batch = np.asarray(tokens)
    if batch.ndim == 1:
      batch = batch[None, :]
    if batch.ndim != 2 or batch.shape[1] == 0 or not np.issubdtype(batch.dtype, np.integer):
      raise InputError(f"tokens must be a non-empty list of ids or a [B, T] array of ids, "
                       f"got shape {batch.shape} dtype {batch.dtype}")
    if batch.min() < 0 or batch.max() >= self.config.vocab_size:
      raise InputError(f"token ids must be in [0, {self.config.vocab_size})")
    if batch.shape[1] > self.config.sequence_len:
      raise InputError(f"{batch.shape[1]} tokens exceed the context of "
                       f"{self.config.sequence_len}; split the input")
    return batch.astype(np.int32)

  def logits(self, tokens) -> np.ndarray:
    """float32 logits [B, T, V] for token ids [B, T] (or one list of ids -> [1, T, V]).

    Example:
      >>> model.logits([[1, 523, 88]]).shape
      (1, 3, 131072)
    """
    out = model.forward(self.params, self._token_batch(tokens), self.config, dtype=self.dtype,
                        sharding=self.sharding)
    return fetch(out.logits).astype(np.float32)

  def score(self, text: str) -> np.ndarray:
    """Log-probability of each token of `text` given BOS and the tokens before it, [T].

    Example:
      >>> model.score("To be, or not to be").sum()   # total log-likelihood in nats
    """
    tokenizer = self._require_tokenizer()
    ids = tokenizer.encode(text)
    if not ids:
      raise InputError("score needs a non-empty text")
    batch = self._token_batch([self.config.bos_token] + ids)
    logits = fetch(model.forward(self.params, batch, self.config, dtype=self.dtype,
                                 sharding=self.sharding).logits)[0, :-1].astype(np.float64)  # [T, V]
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # [T, V]
    return log_probs[np.arange(len(ids)), ids].astype(np.float32)

  def routing(self, text_or_tokens) -> Routing:
    """The experts each token went to, per layer, with their gates.

    A text or one list of ids gives arrays [L, T, k]; a batch [B, T] gives
    [L, B, T, k]. Example:
      >>> model.routing("ROMEO:").expert_indices[0]   # layer 0's experts per token
    """
    batch = self._token_batch(text_or_tokens)
    routing = model.forward(self.params, batch, self.config, dtype=self.dtype,
                            return_routing=True, sharding=self.sharding).routing
    indices, gates = fetch(routing.expert_indices), fetch(routing.gates)
    single = isinstance(text_or_tokens, str) or np.ndim(text_or_tokens) == 1
    return Routing(indices[:, 0], gates[:, 0]) if single else Routing(indices, gates)
