"""Chat templates: a conversation as the prompt text a checkpoint's model was trained on.

Where the template comes from, in a directory (the first that applies):

    chat_template.jinja       the template as its own file (transformers 5 saves it so);
    tokenizer_config.json     its `chat_template` field: the template, or a list of
                              {"name", "template"} entries of which "default" is used;
    tokenizer.tok.json        Grok-2's tokenizer, whose format has no Jinja template:
                              the built-in GROK2_CHAT_TEMPLATE (docs/GROK2_SPEC.md).

tokenizer_config.json also gives the special tokens the template may write
(`bos_token`, `eos_token`, ...; each a string or an {"content": ...} object), and
generation_config.json beside it the ids that end generation (`eos_token_id`).

Rendering follows transformers' `apply_chat_template` as its documentation states it:
Jinja with `trim_blocks` and `lstrip_blocks` (a block tag's own line leaves no
whitespace behind), the template's final newline dropped, the `loopcontrols`
extension (`break`, `continue`), `{% generation %}` blocks rendered as their body,
`tojson` as Python's `json.dumps` (no HTML escaping, `ensure_ascii=False`), and the
variables `messages`, `add_generation_prompt`, `tools` and `documents` (None unless
given: lists of JSON values, such as function schemas for tool calling), the special
tokens, `raise_exception(message)` and `strftime_now(format)`.

A template is untrusted input (it comes with a downloaded checkpoint), so it runs in
Jinja's immutable sandbox: no attribute of Python's internals (`__class__`, ...), no
method that changes a list or dict, `range` up to 100,000, and here also no `*` that
makes a string or list over a million items and no `**` with an exponent over 1,000.
Every failure of a template (syntax, undefined names, the sandbox, raise_exception,
any exception inside) is one TokenizerError naming the file. The sandbox bounds what
a template can touch, not how long it runs, so `render` also stops a template that
runs over MAX_RENDER_SECONDS (nested loops over `range`) or writes over
MAX_PROMPT_CHARS characters.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.sandbox

from grok_moe.errors import InputError, TokenizerError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GROK2_TOKENIZER_FILE = "tokenizer.tok.json"
DEFAULT_TEMPLATE_NAME = "default"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
MAX_FILE_BYTES = 16 * 1024 * 1024  # tokenizer_config.json with a large added-token table
MAX_REPEAT_ITEMS = 1_000_000       # `'x' * n`, `[x] * n` in a template
MAX_EXPONENT = 1_000               # `a ** b` in a template
MAX_RENDER_SECONDS = 10.0          # a template's rendering (a real one takes milliseconds)
MAX_PROMPT_CHARS = 16 * 1024 * 1024  # the text a template writes
ERROR_CHARS = 300                  # a template's error message, shortened to one line
# Where a template is looked for, for the error that finds none.
NO_TEMPLATE_FILES = (f"no {TEMPLATE_FILE}, no chat_template in {TOKENIZER_CONFIG_FILE}, "
                     f"no {GROK2_TOKENIZER_FILE}")

# Grok-2's chat format (docs/GROK2_SPEC.md, "Chat template"): a user or system turn is
# stripped of surrounding whitespace, an assistant turn is not; each ends in
# "<|separator|>\n\n"; the generation prompt is "Assistant:".
GROK2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + (message['content'] | trim) }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + (message['content'] | trim) }}"
    "{% else %}{{ 'Assistant: ' + message['content'] }}{% endif %}"
    "{{ '<|separator|>\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
GROK2_ROLES = ("system", "user", "assistant")
GROK2_EOS = "<|eos|>"  # docs/GROK2_SPEC.md: end of sequence is the id of <|eos|>

# An assistant message's content, to find what the template writes after a reply.
_REPLY_MARK = "GROK_MOE_REPLY_MARK"


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %} ... {% endgeneration %}`: transformers marks the assistant's text with
  it (for its training masks); here the body renders unchanged."""
  tags = {"generation"}

  def parse(self, parser):
    next(parser.stream)  # the tag's name
    return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
  """Jinja's immutable sandbox, refusing at once what it would otherwise turn into an
  undefined value, and bounding the two operators that can build huge values."""
  intercepted_binops = frozenset({"*", "**"})

  def unsafe_undefined(self, obj, attribute):
    raise jinja2.sandbox.SecurityError(
        f"access to {attribute!r} (on a {type(obj).__name__}) is refused by the sandbox")

  def call_binop(self, context, operator, left, right):
    if operator == "*":
      for items, count in ((left, right), (right, left)):
        if (isinstance(items, (str, list, tuple)) and isinstance(count, int)
            and len(items) * count > MAX_REPEAT_ITEMS):
          raise jinja2.sandbox.SecurityError(
              f"a repetition of over {MAX_REPEAT_ITEMS} items is refused by the sandbox")
    if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
      raise jinja2.sandbox.SecurityError(
          f"an exponent over {MAX_EXPONENT} is refused by the sandbox")
    return super().call_binop(context, operator, left, right)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
  """transformers' `tojson`: `json.dumps` with its keyword arguments, no HTML escaping."""
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
  return datetime.datetime.now().strftime(date_format)


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  environment = _Sandbox(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
  environment.filters["tojson"] = _tojson
  environment.globals["strftime_now"] = _strftime_now
  return environment


def _one_line(text: str) -> str:
  line = " ".join(str(text).split())
  return line if len(line) <= ERROR_CHARS else line[:ERROR_CHARS - 3] + "..."


def check_messages(messages, roles: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """`messages` as a list of plain dicts, checked: a non-empty list of mappings, each with
  a str "role" (one of `roles` when given) and a str "content" of valid Unicode; other
  keys pass through. InputError names the first bad message."""
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise InputError(f"messages must be a list of {{'role': str, 'content': str}} dicts, got "
                     f"{type(messages).__name__}")
  if not messages:
    raise InputError("messages is empty; pass at least one {'role': 'user', 'content': ...}")
  checked = []
  for index, message in enumerate(messages):
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
      raise InputError(f"{where} must be a dict with 'role' and 'content', got "
                       f"{type(message).__name__}")
    for key in ("role", "content"):
      if key not in message:
        raise InputError(f"{where} has no {key!r}; each message is {{'role': str, "
                         "'content': str}")
      if not isinstance(message[key], str):
        raise InputError(f"{where}[{key!r}] must be a str, got {type(message[key]).__name__}")
    if roles is not None and message["role"] not in roles:
      raise InputError(f"{where} has role {message['role']!r}; this chat format has the "
                       f"roles {', '.join(roles)}")
    try:
      message["content"].encode("utf-8")
    except UnicodeEncodeError as error:
      raise InputError(f"{where}['content'] holds U+{ord(message['content'][error.start]):04X}"
                       f" at character {error.start}, which is not valid Unicode") from None
    checked.append(dict(message))
  return checked


def check_json_list(value, name: str) -> list[Any] | None:
  """`value` (`tools` or `documents`) as plain JSON data: None, or a list of JSON values
  (dicts, lists, str, numbers, bools, None), copied so that a template sees no other
  objects. InputError otherwise."""
  if value is None:
    return None
  if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
    raise InputError(f"{name} must be a list (of dicts such as function schemas), got "
                     f"{type(value).__name__}")
  try:
    return json.loads(json.dumps(list(value), allow_nan=False))
  except (TypeError, ValueError) as error:
    raise InputError(f"{name} must hold JSON values only (dicts, lists, str, numbers, "
                     f"bools, None): {_one_line(error)}") from None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template and what it is rendered with.

  `source` is the Jinja text; `origin` names where it came from in error
  messages; `special_tokens` maps bos_token, eos_token, ... to their text;
  `eos_token_ids` are generation_config.json's end ids; `roles`, when set,
  are the only roles the format has (checked before rendering).
  """
  source: str
  origin: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
  eos_token_ids: tuple[int, ...] = ()
  roles: tuple[str, ...] | None = None

  @functools.cached_property
  def _compiled(self) -> jinja2.Template:
    try:
      return _environment().from_string(self.source)
    except jinja2.TemplateSyntaxError as error:
      raise TokenizerError(f"{self.origin}: the chat template has a syntax error at line "
                           f"{error.lineno}: {_one_line(error.message)}") from None

  def render(self, messages, add_generation_prompt: bool = False, *, tools=None,
             documents=None, time_limit: float = MAX_RENDER_SECONDS) -> str:
    """The conversation as prompt text; with `add_generation_prompt`, ending where the
    assistant's reply begins. `tools` and `documents` (lists of JSON values) are passed
    to the template as they are. InputError for bad messages, tools or documents, or
    for tools or documents given to a template that never reads them; TokenizerError for
    a template that fails on them, runs over `time_limit` seconds or writes over
    MAX_PROMPT_CHARS characters."""
    messages = check_messages(messages, self.roles)
    extras = {"tools": check_json_list(tools, "tools"),
              "documents": check_json_list(documents, "documents")}
    origin = self.origin
    for name, value in extras.items():
      if value is not None and not self.reads(name):
        raise InputError(f"{origin}: this chat template never reads `{name}`, so the "
                         f"{name} given would be dropped; leave {name} out")

    def raise_exception(message):
      raise TokenizerError(f"{origin}: the chat template refuses these messages: "
                           f"{_one_line(message)}")

    template = self._compiled
    variables = dict(messages=messages, add_generation_prompt=bool(add_generation_prompt),
                     **extras, raise_exception=raise_exception, **self.special_tokens)
    try:
      text = _with_deadline(lambda: _bounded_text(template.generate(**variables), origin),
                            time_limit)
    except _OverTime:
      raise TokenizerError(f"{origin}: the chat template was stopped: it ran over "
                           f"{time_limit:g} s") from None
    except TokenizerError:
      raise
    except jinja2.sandbox.SecurityError as error:
      raise TokenizerError(f"{origin}: the chat template was stopped: {_one_line(error)}"
                           ) from None
    except jinja2.UndefinedError as error:
      raise TokenizerError(f"{origin}: the chat template uses an undefined value: "
                           f"{_one_line(error)}") from None
    except Exception as error:  # anything a hostile or broken template can raise
      raise TokenizerError(f"{origin}: the chat template failed: {type(error).__name__}: "
                           f"{_one_line(error)}") from None
    return text

  def reads(self, name: str) -> bool:
    """Whether the template reads the variable `name` anywhere (jinja2.meta's undeclared
    variables of its parsed source)."""
    return name in self._variables

  @functools.cached_property
  def _variables(self) -> frozenset[str]:
    """The names the template reads without setting them itself."""
    self._compiled  # compiled first, so that a syntax error is its TokenizerError
    return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(self.source)))

  def end_of_turn(self) -> str | None:
    """What the template writes after an assistant's reply, whitespace stripped
    ("<|im_end|>" for ChatML, "</s>" for Mixtral, "<|separator|>" for Grok-2), found by
    rendering a user message and a marked reply; None if it writes nothing or refuses."""
    try:
      text = self.render([{"role": "user", "content": "?"},
                          {"role": "assistant", "content": _REPLY_MARK}])
    except TokenizerError:
      return None
    at = text.rfind(_REPLY_MARK)
    return (text[at + len(_REPLY_MARK):].strip() or None) if at >= 0 else None

  def stop_strings(self, tokenizer=None) -> tuple[str, ...]:
    """The texts that end an assistant's reply: the eos_token, the text of each
    generation_config.json end id the tokenizer can decode, and the end of turn."""
    stops = [self.special_tokens.get("eos_token")]
    if tokenizer is not None:
      stops += [tokenizer.decode([i]) for i in self.eos_token_ids if 0 <= i < tokenizer.vocab_size]
    stops.append(self.end_of_turn())
    return tuple(dict.fromkeys(s for s in stops if s))


class _OverTime(Exception):
  """A template's rendering ran past its deadline (raised inside the template's code)."""


def _with_deadline(render, seconds: float):
  """render() with every line the template's compiled code runs checking the clock: past
  `seconds`, _OverTime is raised inside the template.

  A Python trace function (`sys.settrace`, this thread only) that traces the
  template's own frames (Jinja compiles templates into code of the file
  "<template>") and no others; the previous trace function (a debugger's, a
  coverage tool's) is put back afterwards.
  """
  deadline = time.monotonic() + seconds

  def check_line(frame, event, arg):
    if time.monotonic() > deadline:
      raise _OverTime
    return check_line

  def trace_templates(frame, event, arg):
    return check_line if frame.f_code.co_filename == "<template>" else None

  previous = sys.gettrace()
  sys.settrace(trace_templates)
  try:
    return render()
  finally:
    sys.settrace(previous)


def _bounded_text(pieces, origin: str) -> str:
  """The text of a template's generated pieces; TokenizerError past MAX_PROMPT_CHARS."""
  parts, size = [], 0
  for piece in pieces:
    size += len(piece)
    if size > MAX_PROMPT_CHARS:
      raise TokenizerError(f"{origin}: the chat template was stopped: it wrote over "
                           f"{MAX_PROMPT_CHARS:,} characters")
    parts.append(piece)
  return "".join(parts)


def _read_text(path: pathlib.Path) -> str:
  """A text file's contents, size-capped; TokenizerError naming it otherwise."""
  try:
    with open(path, "rb") as file:
      data = file.read(MAX_FILE_BYTES + 1)
  except OSError as error:
    raise TokenizerError(f"cannot read {path}: {error.strerror}") from None
  if len(data) > MAX_FILE_BYTES:
    raise TokenizerError(f"{path} is over {MAX_FILE_BYTES // 2 ** 20} MiB; it is not a "
                         "tokenizer file")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as error:
    raise TokenizerError(f"{path} is not UTF-8 text (byte {error.start})") from None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    value = json.loads(_read_text(path))
  except ValueError as error:
    raise TokenizerError(f"{path} is not valid JSON ({_one_line(error)})") from None
  if not isinstance(value, dict):
    raise TokenizerError(f"{path} must hold a JSON object, got {type(value).__name__}")
  return value


def _special_tokens(config: Mapping[str, Any], path: pathlib.Path) -> dict[str, str]:
  """bos_token, eos_token, ... of tokenizer_config.json: a string, or {"content": ...}."""
  tokens = {}
  for name in SPECIAL_TOKEN_NAMES:
    value = config.get(name)
    if isinstance(value, Mapping):
      value = value.get("content")
    if value is None:
      continue
    if not isinstance(value, str):
      raise TokenizerError(f"{path}: {name} must be a string or {{\"content\": string}}, got "
                           f"{type(value).__name__}")
    tokens[name] = value
  return tokens


def _template_field(value, path: pathlib.Path) -> str | None:
  """tokenizer_config.json's chat_template: a string, or a list of named templates."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list):
    named = {entry.get("name"): entry.get("template") for entry in value
             if isinstance(entry, Mapping)}
    if DEFAULT_TEMPLATE_NAME not in named:
      raise TokenizerError(f"{path}: chat_template lists the templates "
                           f"{sorted(map(str, named))} but none named 'default'")
    if not isinstance(named[DEFAULT_TEMPLATE_NAME], str):
      raise TokenizerError(f"{path}: the 'default' chat_template's template is not a string")
    return named[DEFAULT_TEMPLATE_NAME]
  raise TokenizerError(f"{path}: chat_template must be a string or a list of "
                       f"{{\"name\", \"template\"}}, got {type(value).__name__}")


def _eos_token_ids(directory: pathlib.Path) -> tuple[int, ...]:
  """generation_config.json's eos_token_id (an int or a list of ints), or ()."""
  path = directory / GENERATION_CONFIG_FILE
  if not path.is_file():
    return ()
  ids = _read_json(path).get("eos_token_id")
  ids = [ids] if isinstance(ids, int) else ids
  if ids is None:
    return ()
  if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                          for i in ids):
    raise TokenizerError(f"{path}: eos_token_id must be an int or a list of ints")
  return tuple(ids)


def find_chat_template(directory) -> ChatTemplate | None:
  """The chat template of a checkpoint or tokenizer directory (see the module docstring
  for the order), or None if it has none. TokenizerError for an unreadable file."""
  directory = pathlib.Path(directory)
  config_path = directory / TOKENIZER_CONFIG_FILE
  config = _read_json(config_path) if config_path.is_file() else {}
  special_tokens = _special_tokens(config, config_path)
  template_path = directory / TEMPLATE_FILE
  if template_path.is_file():
    source, origin = _read_text(template_path), str(template_path)
  elif (field := _template_field(config.get("chat_template"), config_path)) is not None:
    source, origin = field, str(config_path)
  elif (directory / GROK2_TOKENIZER_FILE).is_file():
    return ChatTemplate(GROK2_CHAT_TEMPLATE,
                        f"Grok-2's chat format (built in, for {directory / GROK2_TOKENIZER_FILE})",
                        {"eos_token": GROK2_EOS}, _eos_token_ids(directory), GROK2_ROLES)
  else:
    return None
  return ChatTemplate(source, origin, special_tokens, _eos_token_ids(directory))


def read_chat_template(path) -> ChatTemplate:
  """The chat template at `path`: a directory (as find_chat_template), a *.jinja file
  (with the special tokens of a tokenizer_config.json beside it), or a
  tokenizer_config.json. TokenizerError if there is none."""
  path = pathlib.Path(path)
  if path.is_dir():
    template = find_chat_template(path)
    if template is None:
      raise TokenizerError(f"{path} has no chat template ({NO_TEMPLATE_FILES})")
    return template
  if not path.is_file():
    raise TokenizerError(f"chat template not found: {path}")
  if path.suffix == ".json":
    config = _read_json(path)
    source = _template_field(config.get("chat_template"), path)
    if source is None:
      raise TokenizerError(f"{path} has no chat_template")
    return ChatTemplate(source, str(path), _special_tokens(config, path),
                        _eos_token_ids(path.parent))
  beside = path.parent / TOKENIZER_CONFIG_FILE
  special_tokens = _special_tokens(_read_json(beside), beside) if beside.is_file() else {}
  return ChatTemplate(_read_text(path), str(path), special_tokens, _eos_token_ids(path.parent))
