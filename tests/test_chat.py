"""Chat templates (grok_moe.chat) and Model.chat, on the templates of tests/data/chat/.

The expected prompts are written out by hand from each format's definition (ChatML,
Mixtral's [INST], Grok-2's in docs/GROK2_SPEC.md); tests/data/chat/README.md says how
the two Jinja fixtures were checked against transformers. The Model tests put a family
fixture's weights (tests/data/families/qwen2_moe) in a temporary directory with a
tokenizer.json that knows the templates' special tokens and one of the fixtures'
tokenizer_config.json, and compare Model.chat with the token-level API, greedily.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time

import pytest

from grok_moe import api, chat, cli
from grok_moe.errors import InputError, TokenizerError

DATA = pathlib.Path(__file__).parent / "data"
FAMILY = DATA / "families" / "qwen2_moe"
CHATML = DATA / "chat" / "chatml"
INST = DATA / "chat" / "inst"
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]")
HI = [{"role": "user", "content": "Hi"}]
SYSTEM_PROMPT = "<|im_start|>system\nBe kind.<|im_end|>\n"


def make_checkpoint(directory: pathlib.Path, template_dir: pathlib.Path | None = None,
                    tokenizer: bool = True) -> pathlib.Path:
  """The family fixture's config and weights in `directory`, with its tokenizer.json
  extended by SPECIAL_TOKENS (ids after its vocabulary) and template_dir's files."""
  directory.mkdir(parents=True)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(FAMILY / name, directory / name)
  if tokenizer:
    spec = json.loads((FAMILY / "tokenizer.json").read_text())
    first = len(spec["model"]["vocab"])
    spec["added_tokens"] = [
        {"id": first + i, "content": text, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, text in enumerate(SPECIAL_TOKENS)]
    (directory / "tokenizer.json").write_text(json.dumps(spec))
  if template_dir is not None:
    for path in template_dir.iterdir():
      shutil.copy(path, directory / path.name)
  return directory


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory):
  return api.Model.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("chat") / "chatml",
                                                   CHATML), compilation_cache=False)


def greedy_text(model, prompt: str, max_new_tokens: int) -> str:
  """The decoded greedy continuation of `prompt` by the token-level API, not cut anywhere."""
  ids = model.generate_tokens(model.encode(prompt), max_new_tokens=max_new_tokens,
                              temperature=0)
  return model.tokenizer.decode(ids)


def test_chatml_renders_with_transformers_whitespace_rules():
  """The multi-line, indented ChatML fixture renders to the exact ChatML text: catches
  trim_blocks or lstrip_blocks left off (stray newlines and indentation), a kept final
  newline, a generation prompt added when not asked for, and a default system message
  not replaced by the conversation's own."""
  template = chat.find_chat_template(CHATML)
  assert template.render(HI) == SYSTEM_PROMPT + "<|im_start|>user\nHi<|im_end|>\n"
  assert template.render(HI, add_generation_prompt=True) == (
      SYSTEM_PROMPT + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  conversation = [{"role": "system", "content": "Be brief."}, *HI,
                  {"role": "assistant", "content": "Hello"}]
  assert template.render(conversation) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello<|im_end|>\n")


def test_inst_template_from_a_named_list_with_an_added_token_bos():
  """The [INST] fixture (chat_template a list of named templates, bos_token an AddedToken
  object) renders Mixtral's format: catches the list read as one template or the wrong
  entry taken (its tool_use entry raises), and bos_token rendered as the object's repr."""
  template = chat.find_chat_template(INST)
  conversation = [*HI, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Bye"}]
  assert template.render(conversation) == "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]"
  assert template.render(HI, add_generation_prompt=True) == "<s>[INST] Hi [/INST]"


def test_grok2_format_is_built_in_for_a_tiktoken_tokenizer(tmp_path):
  """A directory with tokenizer.tok.json and no Jinja template gets Grok-2's format
  (docs/GROK2_SPEC.md): user and system turns stripped, assistant turns not, each ending
  in "<|separator|>\\n\\n", the generation prompt "Assistant:"; a role the format lacks is
  an InputError naming the message; replies stop at <|eos|> and <|separator|>."""
  (tmp_path / "tokenizer.tok.json").write_text("{}")
  template = chat.find_chat_template(tmp_path)
  conversation = [{"role": "system", "content": " Be brief.\n"},
                  {"role": "user", "content": "  What is your name? "},
                  {"role": "assistant", "content": " Grok. "}]
  assert template.render(conversation, add_generation_prompt=True) == (
      "System: Be brief.<|separator|>\n\nHuman: What is your name?<|separator|>\n\n"
      "Assistant:  Grok. <|separator|>\n\nAssistant:")
  assert template.render([{"role": "user", "content": "What is your name?"}],
                         add_generation_prompt=True) == (
      "Human: What is your name?<|separator|>\n\nAssistant:")
  with pytest.raises(InputError, match=r"messages\[1\] has role 'tool'"):
    template.render([*HI, {"role": "tool", "content": "42"}])
  assert template.stop_strings() == ("<|eos|>", "<|separator|>")


def test_chat_template_jinja_file_comes_first_and_loses_its_final_newline(tmp_path):
  """chat_template.jinja (transformers 5's file) is used over tokenizer_config.json's field,
  whose special tokens it still gets, and its final newline is dropped as Jinja's
  keep_trailing_newline=False does: catches the wrong precedence or a kept newline."""
  shutil.copy(INST / "tokenizer_config.json", tmp_path)
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}!\n")
  assert chat.find_chat_template(tmp_path).render(HI) == "<s>Hi!"
  assert chat.read_chat_template(tmp_path / "chat_template.jinja").render(HI) == "<s>Hi!"


def test_raise_exception_is_a_tokenizer_error_with_the_templates_message():
  """The [INST] template's raise_exception (roles that do not alternate) becomes one
  TokenizerError naming the file and carrying the template's message (which names the
  message at fault), not jinja's exception or a traceback."""
  with pytest.raises(TokenizerError) as caught:
    chat.find_chat_template(INST).render([{"role": "system", "content": "Be brief."}, *HI])
  message = str(caught.value)
  assert str(INST / "tokenizer_config.json") in message and "\n" not in message
  assert "must alternate" in message and "message 0 is system" in message


@pytest.mark.parametrize("source, message", [
    ("{% for message in messages %}{{ message }", r"syntax error at line 1"),
    ("{{ tools.function.name }}", r"undefined value"),  # tools is None, as in transformers
    ("{{ missing.name }}", r"undefined value: 'missing' is undefined"),
    ("{{ 1 // 0 }}", r"ZeroDivisionError"),
])
def test_template_errors_are_one_line_tokenizer_errors_naming_the_file(source, message):
  """A broken template fails with a one-line TokenizerError that names the file."""
  template = chat.ChatTemplate(source, "dir/tokenizer_config.json")
  with pytest.raises(TokenizerError, match=message) as caught:
    template.render(HI)
  assert str(caught.value).startswith("dir/tokenizer_config.json: ")
  assert "\n" not in str(caught.value)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ messages.append(1) }}",                 # the immutable sandbox
    "{{ raise_exception.__globals__ }}",
    "{{ 'a' * 100000000 }}",                    # a 100 MB string
    "{{ 2 ** 100000000 }}",
])
def test_sandbox_refuses_python_internals_with_a_tokenizer_error(source):
  """A hostile template cannot reach Python's internals or build huge values: each is a
  TokenizerError from the sandbox, never a crash or the attribute's value. Catches the
  template rendered by a plain (unsandboxed) jinja2.Environment."""
  with pytest.raises(TokenizerError, match="refused by the sandbox"):
    chat.ChatTemplate(source, "evil.jinja").render(HI)


def test_a_template_that_runs_too_long_or_writes_too_much_is_stopped():
  """Nested loops over range (10^15 steps, inside the sandbox's limits) stop at the time
  limit, and 10^8 characters of output at MAX_PROMPT_CHARS, each with a one-line
  TokenizerError naming the file; a debugger's or coverage tool's trace function is
  back afterwards. Catches a hostile template hanging or exhausting the process that
  loads its checkpoint."""
  loops = ("{% for i in range(100000) %}{% for j in range(100000) %}"
           "{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}")
  before = sys.gettrace()
  start = time.monotonic()
  with pytest.raises(TokenizerError, match=r"^slow.jinja: .*stopped: it ran over 0.5 s$"):
    chat.ChatTemplate(loops, "slow.jinja").render(HI, time_limit=0.5)
  assert time.monotonic() - start < 5  # the limit, plus a wide margin for a busy machine
  assert sys.gettrace() is before
  writes = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
  with pytest.raises(TokenizerError, match=r"^big.jinja: .*stopped: it wrote over"):
    chat.ChatTemplate(writes, "big.jinja").render(HI)
  assert sys.gettrace() is before


TOOLS_TEMPLATE = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                  "{% for d in documents or [] %}Doc: {{ d.text }}\n{% endfor %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
WEATHER = {"type": "function",
           "function": {"name": "weather", "parameters": {"city": {"type": "string"}}}}


def test_tools_and_documents_reach_the_template_as_json():
  """tools and documents are the template's `tools` and `documents`, as plain JSON data
  (a tuple becomes a list). Catches them dropped (the template then sees None) or
  passed as the caller's objects."""
  template = chat.ChatTemplate(TOOLS_TEMPLATE, "t.jinja")
  text = template.render(HI, tools=(WEATHER,), documents=[{"text": "Rain."}])
  assert text == ('Tools: [{"type": "function", "function": {"name": "weather", '
                  '"parameters": {"city": {"type": "string"}}}}]\nDoc: Rain.\nuser: Hi\n')
  assert template.render(HI) == "user: Hi\n"


@pytest.mark.parametrize("tools, message", [
    ("weather", r"tools must be a list"),
    ({"name": "weather"}, r"tools must be a list"),
    ([object()], r"tools must hold JSON values only"),
    ([{"x": float("nan")}], r"tools must hold JSON values only"),
])
def test_bad_tools_are_an_input_error(tools, message):
  """tools that are not a list of JSON values are one-line InputErrors, before the
  template runs."""
  with pytest.raises(InputError, match=message):
    chat.ChatTemplate(TOOLS_TEMPLATE, "t.jinja").render(HI, tools=tools)


def test_tools_for_a_template_that_never_reads_them_are_refused():
  """Grok-2's built-in format has no tools: tools given to it are an InputError naming
  the template, not silently dropped; documents likewise for a template without them.
  A template with a syntax error stays its TokenizerError."""
  grok2 = chat.ChatTemplate(chat.GROK2_CHAT_TEMPLATE, "grok2/tokenizer.tok.json")
  with pytest.raises(InputError, match=r"^grok2/tokenizer.tok.json: .* never reads `tools`"):
    grok2.render(HI, tools=[WEATHER])
  with pytest.raises(InputError, match=r"never reads `documents`"):
    grok2.render(HI, documents=[{"text": "Rain."}])
  with pytest.raises(TokenizerError, match=r"syntax error"):
    chat.ChatTemplate("{{ tools ", "bad.jinja").render(HI, tools=[WEATHER])


def test_tojson_is_json_dumps_without_html_escaping():
  """tojson writes what transformers' does (json.dumps, ensure_ascii off) rather than
  Jinja's own HTML-escaping filter: catches "<" turned into "\\u003c" in tool prompts."""
  template = chat.ChatTemplate("{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=1) }}",
                               "t.jinja")
  message = {"role": "user", "content": "<é>"}
  assert template.render([message]) == (json.dumps(message, ensure_ascii=False) + "|"
                                        + json.dumps(message, ensure_ascii=False, indent=1))


@pytest.mark.parametrize("messages, message", [
    ("Hi", r"messages must be a list"),
    ({"role": "user", "content": "Hi"}, r"messages must be a list"),
    ([], r"messages is empty"),
    ([("user", "Hi")], r"messages\[0\] must be a dict"),
    ([*HI, {"role": "user"}], r"messages\[1\] has no 'content'"),
    ([{"role": 1, "content": "Hi"}], r"messages\[0\]\['role'\] must be a str, got int"),
    ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
    ([{"role": "user", "content": "a\udc80"}], r"messages\[0\]\['content'\] holds U\+DC80"),
])
def test_bad_messages_raise_input_error_naming_the_message(messages, message):
  """Messages that are not a non-empty list of {role: str, content: str} are refused before
  the template sees them, with an InputError naming the bad message."""
  with pytest.raises(InputError, match=message):
    chat.find_chat_template(CHATML).render(messages)


def test_stop_strings_come_from_the_checkpoint(tmp_path):
  """A reply ends at the template's eos_token, at the text of generation_config.json's end
  ids, and at what the template writes after a reply: "<|im_end|>" for ChatML (its
  eos_token too, listed once), "</s>" for [INST]. Catches a stop list left empty."""
  assert chat.find_chat_template(CHATML).stop_strings() == ("<|im_end|>",)
  assert chat.find_chat_template(INST).stop_strings() == ("</s>",)
  shutil.copy(INST / "tokenizer_config.json", tmp_path)
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 5, 999]}))

  class Letters:  # a tokenizer of 26 ids, "a" .. "z"
    vocab_size = 26

    def decode(self, ids):
      return "".join(chr(ord("a") + i) for i in ids)

  assert chat.find_chat_template(tmp_path).stop_strings(Letters()) == ("</s>", "d", "f")


def test_template_file_errors_name_the_file(tmp_path):
  """An unreadable tokenizer_config.json or a chat_template list without "default" is a
  TokenizerError naming the file, when the checkpoint is opened."""
  path = tmp_path / "tokenizer_config.json"
  path.write_text("{not json")
  with pytest.raises(TokenizerError, match=r"tokenizer_config.json is not valid JSON"):
    chat.find_chat_template(tmp_path)
  path.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
  with pytest.raises(TokenizerError, match=r"\['tool_use'\] but none named 'default'"):
    chat.find_chat_template(tmp_path)


def test_chat_is_the_greedy_text_of_the_rendered_prompt(chatml_model):
  """Model.chat generates from chat_prompt's text, encoded with its special tokens as
  single ids and nothing added in front, and returns the decoded greedy continuation up
  to the first stop string. Catches special-token text encoded character by character,
  a BOS added before the template's text, or the prompt echoed in the reply."""
  model = chatml_model
  prompt = model.chat_prompt(HI)
  assert prompt == SYSTEM_PROMPT + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  ids = model.encode(prompt)
  im_start = model.tokenizer.processor.token_to_id("<|im_start|>")
  assert ids[0] == im_start and ids.count(im_start) == 3
  assert len(ids) == len(prompt.replace("<|im_start|>", "S").replace("<|im_end|>", "E"))
  text = greedy_text(model, prompt, 8)
  expected = text
  for stop in model.chat_stop_strings():
    expected = expected.split(stop)[0]
  assert model.chat(HI, max_new_tokens=8, temperature=0) == expected
  assert "".join(model.chat_stream(HI, max_new_tokens=8, temperature=0)) == expected


def test_tokenizer_json_is_preferred_to_a_sentencepiece_file_beside_it(tmp_path):
  """A Hugging Face directory holding both tokenizer.json and tokenizer.model (Mixtral
  ships both) is read through tokenizer.json, whose special tokens encode as single ids.
  Catches the SentencePiece file taking precedence: it reads a chat template's
  "<|im_start|>" or "<s>" as plain characters."""
  directory = make_checkpoint(tmp_path / "both", CHATML)
  shutil.copy(pathlib.Path(api.__file__).parent.parent / "checkpoints" / "demo"
              / api.TOKENIZER_FILE, directory / api.TOKENIZER_FILE)
  path = api.find_tokenizer(directory)
  assert pathlib.Path(path).name == "tokenizer.json"
  tokenizer = api.open_tokenizer(path)
  assert tokenizer.encode("<|im_start|><s>") == [
      tokenizer.processor.token_to_id("<|im_start|>"), tokenizer.processor.token_to_id("<s>")]


@pytest.mark.parametrize("where", ["tokenizer_config", "generation_config"])
def test_chat_stops_at_the_checkpoints_end_of_sequence(tmp_path, chatml_model, where):
  """The reply ends before the checkpoint's end-of-sequence text, whether it is
  tokenizer_config.json's eos_token or generation_config.json's eos_token_id: the test
  names as EOS a character the greedy reply writes after its first character, and the
  reply must end just before it. Catches a chat that ignores the checkpoint's EOS."""
  text = greedy_text(chatml_model, chatml_model.chat_prompt(HI), 12)
  at = next(i for i in range(1, len(text)) if text[i] not in text[:i] and text[i].isalnum())
  directory = make_checkpoint(tmp_path / "ckpt", CHATML)
  config = json.loads((CHATML / "tokenizer_config.json").read_text())
  if where == "tokenizer_config":
    config["eos_token"] = text[at]
  else:
    del config["eos_token"]
    eos_id = chatml_model.tokenizer.processor.token_to_id(text[at])
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos_id]}))
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  model = api.Model.from_checkpoint(directory, compilation_cache=False)
  assert model.chat(HI, max_new_tokens=12, temperature=0) == text[:at]


def test_model_chat_hands_tools_to_the_template(chatml_model):
  """Model.chat_prompt and Model.chat pass tools on to the template: the ChatML fixture's
  template never reads them, so they are refused. Catches the API dropping them."""
  with pytest.raises(InputError, match=r"never reads `tools`"):
    chatml_model.chat_prompt(HI, tools=[WEATHER])
  with pytest.raises(InputError, match=r"never reads `documents`"):
    chatml_model.chat(HI, documents=[{"text": "Rain."}], max_new_tokens=1)


def test_inst_prompt_holds_one_bos(tmp_path):
  """With the [INST] template the prompt's "<s>" is the one BOS id at the start: catches a
  BOS added on top of the template's, or "<s>" encoded as three characters ("[INST]" and
  "[/INST]" are added tokens of the test's tokenizer too, whose vocabulary lacks "[")."""
  model = api.Model.from_checkpoint(make_checkpoint(tmp_path / "inst", INST),
                                    compilation_cache=False)
  ids = model.encode(model.chat_prompt(HI))
  bos = model.tokenizer.processor.token_to_id("<s>")
  assert ids[0] == bos and ids.count(bos) == 1
  assert model.tokenizer.decode(ids) == "<s>[INST] Hi [/INST]"


def test_no_template_or_no_tokenizer_is_a_clear_error(tmp_path, chatml_model):
  """A checkpoint without a chat template loads, and chat says there is none and to use
  generate(); one with a template and no tokenizer renders the prompt and loads for the
  token-level methods, and chat asks for a tokenizer. (The token ids are those of the
  chat prompt, so that the sampler compiled for chatml_model serves here too.)"""
  model = api.Model.from_checkpoint(make_checkpoint(tmp_path / "plain"), compilation_cache=False)
  with pytest.raises(TokenizerError, match=r"no chat template .*use generate\(\)"):
    model.chat(HI)
  with pytest.raises(TokenizerError, match=r"no chat template"):
    model.chat_prompt(HI)
  bare = api.Model.from_checkpoint(make_checkpoint(tmp_path / "bare", CHATML, tokenizer=False),
                                   compilation_cache=False)
  assert bare.chat_prompt(HI).endswith("<|im_start|>assistant\n")
  ids = chatml_model.encode(bare.chat_prompt(HI))
  assert len(bare.generate_tokens(ids, max_new_tokens=2, temperature=0)) == 2
  with pytest.raises(TokenizerError, match=r"no tokenizer"):
    bare.chat(HI)


def test_command_line_chat_prints_the_reply(tmp_path, capsys, chatml_model):
  """`grok-moe --chat` sends the prompt as one user message and prints only the reply,
  the same as Model.chat; without a chat template it stops with one line and status 2."""
  directory = make_checkpoint(tmp_path / "ckpt", CHATML)
  flags = ["--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "0",
           "--compilation-cache", "off", "--chat"]
  assert cli.main(["--checkpoint", str(directory), *flags]) == 0
  assert capsys.readouterr().out == chatml_model.chat(HI, max_new_tokens=6, temperature=0) + "\n"
  assert cli.main(["--checkpoint", str(make_checkpoint(tmp_path / "plain")), *flags]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith("error: --chat: ") and "no chat template" in captured.err
  assert captured.err.count("\n") == 1
