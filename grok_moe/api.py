"""`Model`: a loaded Grok-style model with its tokenizer, for notebooks and the command line."""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import os
import pathlib
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence, Union, overload

import jax
import jax.numpy as jnp
import numpy as np

from grok_moe import chat as chat_templates
from grok_moe import checkpoint, compilation, hf_checkpoint, model, sampling
from grok_moe import params as param_table
from grok_moe.chat import ChatTemplate
from grok_moe.config import ModelConfig
from grok_moe.errors import (CheckpointError, InputError, TokenizerError,
                             UnknownCharactersWarning)
from grok_moe.model import Routing
from grok_moe.sharding import ShardingPlan, fetch
from grok_moe.tokenizer import TextStream, Tokenizer, open_tokenizer

TOKENIZER_FILE = "tokenizer.model"
# In the order they are looked for: a Hugging Face directory may hold both tokenizer.json
# and the SentencePiece file it was converted from (Mixtral does); tokenizer.json comes
# first, for SentencePiece would read a chat template's special-token text as characters.
TOKENIZER_FILES = ("tokenizer.json", chat_templates.GROK2_TOKENIZER_FILE,  # Hugging Face,
                   TOKENIZER_FILE)                          # Grok-2's tiktoken, SentencePiece
SEED_LIMIT = 2 ** 32  # PRNGKey keeps the low 32 bits of a seed: larger ones repeat smaller ones

# Token ids: one prompt (a list of ids or a [T] array), or a batch (lists, or a [B, T] array).
TokenIds = Union[Sequence[int], np.ndarray]
TokenBatch = Union[Sequence[Sequence[int]], np.ndarray]
Dtype = Union[str, type, np.dtype, None]
Params = Mapping[str, Any]  # Haiku params, named as the release: {module: {name: array}}


def default_dtype(mesh=None) -> str:
  """The activation dtype used when none is given, by `Model` and the command line alike:
  float32 on CPU (bfloat16 is emulated there, slower and less exact), bfloat16 on GPU/TPU.
  The platform is that of `mesh`'s devices, or jax's default backend."""
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return "float32" if platform == "cpu" else "bfloat16"


def _directories_beside(checkpoint_path: str | os.PathLike) -> list[pathlib.Path]:
  """Where files that go with a checkpoint are looked for: the directory holding ckpt-0
  (`checkpoint_path`, or its parent when it is ckpt-0 itself), then one level up
  (checkpoints/ for the release)."""
  path = pathlib.Path(checkpoint_path)
  root = path.parent if path.name == checkpoint.TENSOR_DIR else path
  return [root, root.parent]


def find_tokenizer(checkpoint_path: str | os.PathLike) -> str | None:
  """The first of TOKENIZER_FILES (a Hugging Face tokenizer.json, Grok-2's
  tokenizer.tok.json, a SentencePiece tokenizer.model) beside ckpt-0, else one level up
  (checkpoints/ for the release), or None."""
  for directory in _directories_beside(checkpoint_path):
    for name in TOKENIZER_FILES:
      if (directory / name).is_file():
        return os.fspath(directory / name)
  return None


def find_chat_template(checkpoint_path: str | os.PathLike,
                       tokenizer_path: str | os.PathLike | None = None) -> ChatTemplate | None:
  """The chat template beside the tokenizer, else beside ckpt-0 or one level up (the
  directories find_tokenizer searches), or None; see grok_moe.chat for the files."""
  directories = _directories_beside(checkpoint_path)
  if tokenizer_path is not None:
    directories.insert(0, pathlib.Path(tokenizer_path).parent)
  for directory in dict.fromkeys(directories):
    template = chat_templates.find_chat_template(directory)
    if template is not None:
      return template
  return None


def _kind(value) -> str:
  """How an error message names a bad argument: its type, and the value when short."""
  text = repr(value)
  return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


def _integer(name: str, value) -> int:
  """`value` as a Python int (numpy integers accepted); InputError for floats, bools, None."""
  if isinstance(value, (bool, np.bool_)):
    raise InputError(f"{name} must be an integer, got {_kind(value)}")
  try:
    return operator.index(value)
  except TypeError:
    raise InputError(f"{name} must be an integer, got {_kind(value)}") from None


def _real(name: str, value) -> float:
  """`value` as a finite Python float (ints and numpy scalars accepted)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise InputError(f"{name} must be a number, got {_kind(value)}")
  if not math.isfinite(value):
    raise InputError(f"{name} must be finite, got {value}")
  return float(value)


def _sampling_config(max_new_tokens, temperature, top_p, top_k, seed) -> sampling.SamplingConfig:
  """The settings as Python numbers, checked; each InputError names the argument."""
  seed = _integer("seed", seed)
  if not 0 <= seed < SEED_LIMIT:
    raise InputError(f"seed must be in [0, 2**32), got {seed} (jax keeps a seed's low 32 "
                     "bits, so larger seeds repeat smaller ones)")
  return sampling.SamplingConfig(
      max_new_tokens=_integer("max_new_tokens", max_new_tokens),
      temperature=_real("temperature", temperature), top_p=_real("top_p", top_p),
      top_k=_integer("top_k", top_k), seed=seed)


def _stop_strings(stop) -> tuple[str, ...]:
  """`stop` (None, a str, or a sequence of str) as a tuple of str."""
  if stop is None:
    return ()
  if isinstance(stop, str):
    return (stop,)
  if isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
    return tuple(stop)
  raise InputError(f"stop must be a str or a list of str, got {_kind(stop)}")


def _text_prompts(prompt) -> list[str]:
  """A str, or a non-empty sequence of str, as a list of prompts."""
  if isinstance(prompt, str):
    return [prompt]
  if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
    return list(prompt)
  if isinstance(prompt, Sequence) and not prompt:
    raise InputError("generate needs a prompt: pass a str, or a non-empty list of str")
  raise InputError(f"the prompt must be a str or a non-empty list of str, got {_kind(prompt)}"
                   " (for token ids use generate_tokens)")


def _id_row(row, name: str) -> list[int]:
  """One prompt of token ids as a list of Python ints; InputError for anything but integers."""
  if isinstance(row, (str, bytes)) or row is None:
    raise InputError(f"{name} must be token ids (integers), got {_kind(row)}; for text "
                     "use generate")
  try:
    ids = np.asarray(row)
  except ValueError:  # nested lists of different lengths
    ids = np.asarray(row, dtype=object)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise InputError(f"{name} must be a list of integer token ids, got an array of shape "
                     f"{ids.shape} and dtype {ids.dtype}")
  return [int(t) for t in ids]


def _token_prompts(token_ids) -> tuple[list[list[int]], bool]:
  """(prompts, single): one list of ids (possibly empty), or a non-empty batch of them."""
  is_ids = isinstance(token_ids, np.ndarray) and token_ids.ndim > 0 or (
      isinstance(token_ids, Sequence) and not isinstance(token_ids, (str, bytes)))
  if not is_ids:
    raise InputError(f"token_ids must be a list of ids or a list of lists of ids, got "
                     f"{_kind(token_ids)}; for text use generate")
  if isinstance(token_ids, np.ndarray):
    single = token_ids.ndim == 1
  else:
    single = len(token_ids) == 0 or isinstance(token_ids[0], (numbers.Number, np.generic))
  if single:
    return [_id_row(token_ids, "token_ids")], True
  if len(token_ids) == 0:
    raise InputError("token_ids is a batch with no prompts; pass at least one list of ids")
  return [_id_row(row, f"token_ids[{i}]") for i, row in enumerate(token_ids)], False


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

  def __init__(self, params: Params, config: ModelConfig, tokenizer: Tokenizer | None = None,
               dtype: Dtype = None, sharding: ShardingPlan | None = None,
               compilation_cache: str | os.PathLike | bool | None = None,
               chat_template: ChatTemplate | None = None):
    """`dtype` is that of the activations, default `default_dtype()` (float32 on CPU,
    bfloat16 on GPU/TPU). `sharding` runs the model on a mesh (see grok_moe.sharding);
    params not yet placed by it are placed now. Without a tokenizer the token-level
    methods work and the text methods raise TokenizerError. `compilation_cache` is the
    directory of JAX's persistent compilation cache (None: $GROK_MOE_COMPILATION_CACHE,
    else ~/.cache/grok_moe/jax; False: off; see grok_moe.compilation). `chat_template`
    (grok_moe.chat) is what the chat methods render conversations with."""
    self.compilation_cache = compilation.use_persistent_cache(compilation_cache)
    self._compile_timer = compilation.CompileTimer()
    if sharding is not None:
      sharding.check_config(config)
      params = sharding.shard_params(params)
    if dtype is None:
      dtype = default_dtype(None if sharding is None else sharding.mesh)
    self.params = param_table.as_stacked(params, config)
    self.config = config
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.dtype = jnp.dtype(dtype).name
    self.sharding = sharding
    self.last_stats = GenerationStats()
    if tokenizer is not None:
      tokenizer.check_fits(config)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, config: ModelConfig | None = None,
                      tokenizer: Tokenizer | str | os.PathLike | None = None,
                      mesh: jax.sharding.Mesh | None = None, dtype: Dtype = None,
                      progress: bool = True, moe_sharding: str = "tensor",
                      compilation_cache: str | os.PathLike | bool | None = None,
                      quantize: str | None = None,
                      chat_template: ChatTemplate | str | os.PathLike | None = None
                      ) -> "Model":
    """Loads a checkpoint: release format (a directory holding ckpt-0/, or ckpt-0/ itself),
    or a Hugging Face directory of a supported family (config.json with its model_type
    and *.safetensors: Mixtral, Qwen2-MoE, Qwen3-MoE, and Grok-2's files split by
    tensor-parallel rank; see grok_moe.hf_checkpoint),
    whose weights keep their dtype or, with quantize="int8", become int8 with
    per-channel bfloat16 scales on the way in.

    The config comes from config.json beside ckpt-0 (Grok-1 for the release);
    the tokenizer from `tokenizer` or tokenizer.model beside the checkpoint.
    Without either, the model loads without one: generate_tokens, logits and
    routing work, and the text methods raise TokenizerError. `dtype` is that
    of the activations, default float32 on CPU and bfloat16 on GPU/TPU (as the
    command line). With `mesh` (grok_moe.make_mesh) each tensor goes straight
    into its shards as it is read, and the model runs on the mesh;
    `moe_sharding` is "tensor" (every device a slice of every expert) or
    "expert" (whole experts). The chat template (for `chat`) is `chat_template` (a
    ChatTemplate, or the path of a chat_template.jinja, a tokenizer_config.json or a
    directory), else the one beside the tokenizer or the checkpoint (find_chat_template);
    without one the chat methods raise TokenizerError.

    Example:
      >>> model = Model.from_checkpoint("checkpoints/demo")
      >>> grok = Model.from_checkpoint("checkpoints", mesh=grok_moe.make_mesh(1, 8))
    """
    if pathlib.Path(path).exists() and not pathlib.Path(path).is_dir():
      raise CheckpointError(f"{path} is a file, not a checkpoint; pass the directory that "
                            f"holds {checkpoint.TENSOR_DIR}/ (or {checkpoint.TENSOR_DIR}/ itself)")
    config = checkpoint.checkpoint_config(path, config)
    plan = None if mesh is None else ShardingPlan(config, mesh, moe_sharding)
    if tokenizer is None:
      tokenizer = find_tokenizer(path)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
      tokenizer = open_tokenizer(tokenizer)
    if tokenizer is not None:
      tokenizer.check_fits(config)
    if chat_template is None:
      chat_template = find_chat_template(path, None if tokenizer is None else tokenizer.path)
    elif not isinstance(chat_template, ChatTemplate):
      chat_template = chat_templates.read_chat_template(chat_template)
    if hf_checkpoint.is_hf_checkpoint(path):
      _, params = hf_checkpoint.load(path, config, sharding=plan, quantize=quantize)
    elif quantize is not None:
      raise InputError("quantize= applies to Hugging Face checkpoints; a release-format "
                       "checkpoint is int8 already")
    else:
      params = checkpoint.load_checkpoint(path, config, progress=progress, sharding=plan)
    return cls(params, config, tokenizer, dtype, sharding=plan,
               compilation_cache=compilation_cache, chat_template=chat_template)

  # --- Text in, text out. ---

  def _require_tokenizer(self) -> Tokenizer:
    if self.tokenizer is None:
      raise TokenizerError(
          "this Model has no tokenizer (none was given and no tokenizer.model was found "
          "beside the checkpoint): pass tokenizer=PATH to Model.from_checkpoint or Model, "
          "or use the token-level methods generate_tokens, logits and routing")
    return self.tokenizer

  def encode(self, text: str) -> list[int]:
    """The token ids of `text` as the text methods encode it (no BOS), with an
    UnknownCharactersWarning naming the characters that become <unk>."""
    return self._encode(text)

  def _encode(self, text: str) -> list[int]:
    tokenizer = self._require_tokenizer()
    ids = tokenizer.encode(text)
    unknown = tokenizer.unknown_characters(text)
    if unknown:
      named = ", ".join(f"{char!r} (U+{ord(char):04X})" for char in unknown[:10])
      more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
      warnings.warn(UnknownCharactersWarning(
          f"the tokenizer has no piece for {named}{more}: each becomes <unk>"), stacklevel=3)
    return ids

  def _stream_rows(self, prompts: list[str], stop, truncate,
                   settings: sampling.SamplingConfig) -> Iterator[list[str]]:
    tokenizer = self._require_tokenizer()
    stop = _stop_strings(stop)
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    ids = [self._encode(prompt) for prompt in prompts]
    stats = self.last_stats = GenerationStats()
    compiled_before = self._compile_timer.seconds
    start = time.perf_counter()
    for step in sampling.generate(self.params, self.config, ids, settings, dtype=self.dtype,
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

  @overload
  def generate(self, prompt: str, *, max_new_tokens: int = ..., temperature: float = ...,
               top_p: float = ..., top_k: int = ..., seed: int = ...,
               stop: str | Sequence[str] | None = ..., truncate: bool = ...) -> str: ...

  @overload
  def generate(self, prompt: Sequence[str], *, max_new_tokens: int = ...,
               temperature: float = ..., top_p: float = ..., top_k: int = ..., seed: int = ...,
               stop: str | Sequence[str] | None = ..., truncate: bool = ...) -> list[str]: ...

  def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 64,
               temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
               stop: str | Sequence[str] | None = None,
               truncate: bool = False) -> str | list[str]:
    """Completes a prompt (str -> str) or a batch of prompts (list -> list), at once.

    Stops at EOS, after max_new_tokens, or before the first stop string.
    temperature=0 is greedy. An empty prompt starts from BOS. Characters the
    tokenizer does not know become <unk>, with an UnknownCharactersWarning.
    seed is in [0, 2**32).

    Example:
      >>> model.generate(["ROMEO:", "JULIET:"], max_new_tokens=16, seed=1)
    """
    prompts = _text_prompts(prompt)
    texts = [""] * len(prompts)
    settings = _sampling_config(max_new_tokens, temperature, top_p, top_k, seed)
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
    if not isinstance(prompt, str):
      raise InputError(f"stream takes one prompt, a str, got {_kind(prompt)}; to complete "
                       "several at once, pass a list to generate")
    settings = _sampling_config(max_new_tokens, temperature, top_p, top_k, seed)
    for (piece,) in self._stream_rows([prompt], stop, truncate, settings):
      if piece:
        yield piece

  # --- A conversation in, the assistant's reply out. ---

  def _require_chat_template(self) -> ChatTemplate:
    if self.chat_template is None:
      raise TokenizerError(
          f"this checkpoint has no chat template ({chat_templates.NO_TEMPLATE_FILES} beside "
          "it): use generate() with a prompt in the model's own format, or pass "
          "chat_template= to Model.from_checkpoint")
    return self.chat_template

  def chat_prompt(self, messages: Sequence[Mapping[str, str]], *,
                  tools: Sequence[Any] | None = None,
                  documents: Sequence[Any] | None = None) -> str:
    """The prompt text `chat` generates from: the conversation rendered with the chat
    template, ending where the assistant's reply begins. `tools` (function schemas)
    and `documents` go to the template as its `tools` and `documents` (see
    `chat.ChatTemplate.render`); a template that never reads them refuses them.

    Example:
      >>> model.chat_prompt([{"role": "user", "content": "Hi"}])
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
    """
    return self._require_chat_template().render(messages, add_generation_prompt=True,
                                                tools=tools, documents=documents)

  def chat_stop_strings(self) -> tuple[str, ...]:
    """The texts at which the assistant's reply ends (besides the model's EOS id): the
    template's eos_token, the generation_config.json end ids' text, and what the template
    writes after a reply ("<|im_end|>", "<|separator|>"; see ChatTemplate.stop_strings)."""
    return self._require_chat_template().stop_strings(self._require_tokenizer())

  def chat_stream(self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0,
                  seed: int = 0, stop: str | Sequence[str] | None = None,
                  truncate: bool = False, tools: Sequence[Any] | None = None,
                  documents: Sequence[Any] | None = None) -> Iterator[str]:
    """Yields the assistant's reply to `messages` piece by piece (see `chat`)."""
    prompt = self.chat_prompt(messages, tools=tools, documents=documents)
    yield from self.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed,
                           stop=_stop_strings(stop) + self.chat_stop_strings(),
                           truncate=truncate)

  def chat(self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int = 64,
           temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0, seed: int = 0,
           stop: str | Sequence[str] | None = None, truncate: bool = False,
           tools: Sequence[Any] | None = None, documents: Sequence[Any] | None = None) -> str:
    """The assistant's reply to a conversation, a list of {"role", "content"} dicts.

    The messages are rendered with the checkpoint's chat template and a generation
    prompt (`chat_prompt`), encoded as they are (the template writes any BOS itself;
    special-token text becomes the special token with a tokenizer.json or
    tokenizer.tok.json tokenizer; SentencePiece reads it as plain text), and completed as
    `generate` does.
    The reply ends at the model's EOS id, at a chat stop string (`chat_stop_strings`)
    or at one of `stop`, which are not included; it is the model's text otherwise
    unchanged (a leading space after Grok-2's "Assistant:" stays). `tools` and
    `documents` are passed to the template (`chat_prompt`); a tool call comes back as
    the model writes it, not parsed. InputError for bad messages; TokenizerError
    without a chat template or tokenizer, or when the template refuses the messages.

    Example:
      >>> model.chat([{"role": "user", "content": "Hi"}], temperature=0)
    """
    return "".join(self.chat_stream(messages, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, stop=stop, truncate=truncate, tools=tools,
                                    documents=documents))

  # --- Tokens in, tokens out. ---

  @overload
  def generate_tokens(self, token_ids: Sequence[int], *, max_new_tokens: int = ...,
                      temperature: float = ..., top_p: float = ..., top_k: int = ...,
                      seed: int = ..., truncate: bool = ...) -> list[int]: ...

  @overload
  def generate_tokens(self, token_ids: TokenBatch, *, max_new_tokens: int = ...,
                      temperature: float = ..., top_p: float = ..., top_k: int = ...,
                      seed: int = ..., truncate: bool = ...) -> list[list[int]]: ...

  def generate_tokens(self, token_ids: TokenIds | TokenBatch, *, max_new_tokens: int = 64,
                      temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0,
                      seed: int = 0, truncate: bool = False) -> list[int] | list[list[int]]:
    """New token ids for one prompt (list of ids -> list) or a batch (list of lists).

    EOS ends a row and is not returned. With a tokenizer, only ids it can
    decode are drawn (as generate does); without one, any id of the model's
    vocabulary. An empty prompt starts from BOS.

    Example:
      >>> model.generate_tokens([1, 523, 88], max_new_tokens=8, temperature=0)
    """
    prompts, single = _token_prompts(token_ids)
    settings = _sampling_config(max_new_tokens, temperature, top_p, top_k, seed)
    vocab_limit = None if self.tokenizer is None else self.tokenizer.vocab_size
    rows: list[list[int]] = [[] for _ in prompts]
    for step in sampling.generate(self.params, self.config, prompts, settings,
                                  dtype=self.dtype, truncate=truncate, vocab_limit=vocab_limit,
                                  sharding=self.sharding):
      for row, token in enumerate(step.tokens):
        if step.active[row] and token != self.config.eos_token:
          rows[row].append(int(token))
    return rows[0] if single else rows

  def _token_batch(self, tokens: str | TokenIds | TokenBatch) -> np.ndarray:
    """str, list of ids, or [B, T] ids -> int32 [B, T], checked against the vocabulary."""
    if isinstance(tokens, str):
      tokens = [self._encode(tokens) or [self.config.bos_token]]
    try:
      batch = np.asarray(tokens)
    except ValueError:  # rows of different lengths
      raise InputError("the rows of a batch of token ids must all have the same length; "
                       "pad them, or call once per row") from None
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

  def logits(self, tokens: str | TokenIds | TokenBatch) -> np.ndarray:
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
    ids = self._encode(text)
    if not ids:
      raise InputError("score needs a non-empty text")
    batch = self._token_batch([self.config.bos_token] + ids)
    logits = fetch(model.forward(self.params, batch, self.config, dtype=self.dtype,
                                 sharding=self.sharding).logits)[0, :-1].astype(np.float64)  # [T, V]
    log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # [T, V]
    return log_probs[np.arange(len(ids)), ids].astype(np.float32)

  def routing(self, text_or_tokens: str | TokenIds | TokenBatch) -> Routing:
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
