"""Turn examples into token ids and loss labels: chat template, stop token, prompt masking.

The prompt format is decided here once, kept in a `Rendering`, saved with the adapters and
reused by generate/chat/serve/fuse/export. Two rules prevent the "never stops" trap:

* every trained answer ends with the token that ends a turn in this template (`<|im_end|>` for
  ChatML, `<|eot_id|>` for Llama 3, ...), appended when the rendering lacks it;
* a stop token typed into the data by hand (`<|endoftext|>` as in many blog posts) is
  recognised and removed before that, so it is never doubled or trained as plain text.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from liandan.errors import LiandanError

IGNORE = -100  # label value excluded from the loss (PyTorch's cross_entropy default)

# Used when a model has no chat template (most base models). Documented in the README.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)



@dataclass
class Rendering:
    """How prompts and answers become text. Saved as part of the adapter record."""

    chat_template: str
    stop_tokens: list[str]
    system_prompt: str | None = None
    template_source: str = "model"  # "model", a NAMED_TEMPLATES name (chatml, plain), or "file:NAME.jinja"
    prompt_style: str = "chat"  # "chat" (template) or "raw" (the model trained on plain text)
    eos_token: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rendering":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --chat-template NAME: ChatML, for base models or models trained with it elsewhere.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "plain": PLAIN_CHAT_TEMPLATE}
CHAT_TEMPLATE_HELP = ("Chat template to train or run with instead of the model's: a .jinja file, or chatml / plain "
                      "(recorded with the adapter)")


def read_chat_template(spec: str) -> tuple[str, str]:
    """(template, source) for --chat-template: a built-in name or a Jinja file."""
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec], spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LiandanError(f"--chat-template {spec}: no such file; give a .jinja file or one of: {', '.join(NAMED_TEMPLATES)}")
    try:
        return path.read_text(encoding="utf-8"), f"file:{path.name}"
    except (OSError, UnicodeDecodeError) as exc:
        raise LiandanError(f"--chat-template {spec}: cannot read it as UTF-8 text ({exc})") from None


def model_template(tokenizer, tools: bool = False) -> str | None:
    """The model's own chat template. Some tokenizers ship several by name (Hermes 2 Pro, Command R+: "default" and
    "tool_use"); pick as transformers' apply_chat_template does: "tool_use" for data with tools, else "default"."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        name = "tool_use" if tools and "tool_use" in template else "default"
        if name not in template and len(template) > 1:  # as transformers: which one to use is not ours to guess
            raise LiandanError(f"the model ships chat templates {', '.join(sorted(template))} and none is named "
                               "'default'; pass one with --chat-template FILE.jinja")
        template = template.get(name) or next(iter(template.values()), None)
    return template


def trains_tools(tokenizer, target: Path) -> bool:
    """Whether `lora` would render this data in a tokenizer's `tool_use` template (a train file with tools lines):
    only a tokenizer with several named templates asks, so only then is train.jsonl scanned."""
    from liandan.data.formats import scan_jsonl

    templates = tokenizer.chat_template
    if not (isinstance(templates, dict) and "tool_use" in templates):
        return False
    train = target / "train.jsonl" if target.is_dir() else target
    return train.is_file() and any(fmt == "tools" for fmt, _ in scan_jsonl(train))


def make_rendering(tokenizer, system_prompt: str | None = None, chat_template: str | None = None,
                   tools: bool = False) -> Rendering:
    """Choose the template (--chat-template, else the model's) and find which token ends an assistant turn in it."""
    template, source = (read_chat_template(chat_template) if chat_template
                        else (model_template(tokenizer, tools), "model"))
    if not template or not isinstance(template, str):
        if tokenizer.eos_token is None:
            raise LiandanError("the tokenizer has neither a chat template nor an end-of-sequence token")
        template, source = PLAIN_CHAT_TEMPLATE, "plain"
    stop = template_model(tokenizer, template).turn_end
    return Rendering(template, [stop], system_prompt, source, "chat", tokenizer.eos_token)


def rendering_of(record: dict, tokenizer, system_prompt: str | None = None, chat_template: str | None = None) -> Rendering:
    """The rendering saved in an adapter or fused model's record, else the tokenizer's own template.
    A system_prompt or chat_template (--chat-template) given here overrides the recorded one."""
    if chat_template:
        recorded = (record.get("rendering") or {}).get("system_prompt")
        return make_rendering(tokenizer, system_prompt if system_prompt is not None else recorded, chat_template)
    if not record.get("rendering"):
        return make_rendering(tokenizer, system_prompt)
    rendering = Rendering.from_dict(record["rendering"])
    if system_prompt is not None:
        rendering.system_prompt = system_prompt
    return rendering


def special_tokens(tokenizer) -> list[str]:
    """Strings of all special tokens (control tokens) of a tokenizer, longest first."""
    found = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((t for t in found if t), key=len, reverse=True)


def template_model(tokenizer, template: str, bos: str = ""):
    """The template's model (data/template.py: its layout and wrapper strings), probed through this tokenizer."""
    from liandan.data.template import ChatTemplate

    def render(messages, add_generation_prompt):
        return render_text(tokenizer, template, messages, add_generation_prompt)

    return ChatTemplate(render, special_tokens(tokenizer), tokenizer.eos_token, bos)


def render_text(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:
        if tools is None:  # tool-use templates (Hermes, Command-R+) iterate `tools` unguarded: a chat without tools
            try:
                return render_text(tokenizer, template, messages, add_generation_prompt, [])
            except LiandanError:
                pass
        raise LiandanError(f"the chat template failed to render: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    line: int = 0
    # Replay examples only: the base model's top-k (token ids, log-probs) at each trained position, for --kl-weight.
    soft: tuple[list[list[int]], list[list[float]]] | None = None

    @property
    def n_trained(self) -> int:
        """Positions that count in the loss: a label predicts the next token, so the first one never does."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class HandTypedStops:
    """Counts stop tokens that users typed into their data, to report them once per file."""

    counts: Counter = field(default_factory=Counter)

    def strip(self, text: str, specials: list[str]) -> str:
        """Remove special tokens typed at the end of a field, and the whitespace between them and the answer
        ("Paris <|endoftext|>" trains as "Paris", not "Paris " before the stop token)."""
        removed, changed = False, True
        while changed:
            changed = False
            stripped = text.rstrip()
            for token in specials:
                if stripped.endswith(token):
                    self.counts[token] += 1
                    text, changed, removed = stripped[: -len(token)], True, True
                    break
        return text.rstrip() if removed else text


class Encoder:
    """Encodes examples of any format into (input_ids, labels) with one fixed Rendering."""

    def __init__(self, tokenizer, rendering: Rendering, mask_prompt: bool = True):
        self.tokenizer = tokenizer
        self.rendering = rendering
        self.mask_prompt = mask_prompt
        self.specials = special_tokens(tokenizer)
        self.hand_typed = HandTypedStops()
        self._layout = None

    # -- prompts (shared with generation, so inference sees exactly the training prefix) --
    def prompt_messages(self, messages: list[dict]) -> list[dict]:
        if self.rendering.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.rendering.system_prompt}] + list(messages)
        return list(messages)

    def prompt_ids(self, messages: list[dict], tools=None) -> list[int]:
        text = render_text(self.tokenizer, self.rendering.chat_template, self.prompt_messages(messages), True, tools)
        return self._tokenize(text)

    def _tokenize(self, text: str) -> list[int]:
        # The template already contains BOS and friends where the model wants them.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- training examples --
    def encode_text(self, text: str, line: int = 0) -> Encoded:
        text = self.hand_typed.strip(text, self.specials)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        return Encoded(ids, list(ids), line)

    @property
    def layout(self):
        """The template's inferred layout (data/template.py), probed on first use."""
        if self._layout is None:
            layout = template_model(self.tokenizer, self.rendering.chat_template).layout
            self._layout = dataclasses.replace(layout, turn_end=self.rendering.stop_tokens[0])
        return self._layout

    def encode_chat(self, messages: list[dict], tools=None, line: int = 0, limit: int | None = None) -> Encoded:
        """Each trained assistant turn is exactly the generation prompt, then the answer as the model should
        generate it (think block included, data/template.py), then the turn end. With `limit`, stop after the
        turn that takes it past `limit` tokens: what follows is cut by truncation or dropped anyway, and
        rendering every prefix of a 10,000-turn chat would take minutes (each renders the whole history)."""
        messages = self.prompt_messages([self._as_rendered(self.clean_message(m)) for m in messages])
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if assistant and assistant[0] == 0:  # templates would say "empty conversation", which it is not
            raise LiandanError("the chat starts with an assistant turn: an answer needs the user turn it answers "
                               "before it")
        encoded = Encoded([], [], line)
        done = ""  # rendered text already turned into tokens
        for i in assistant:
            prompt, answer = self._turn(messages, i, tools)
            if not prompt.startswith(done):
                # Templates that rewrite history (drop old reasoning, close the last turn differently) cannot
                # train every turn in one sequence: the last turn is trained, after its exact prompt.
                encoded = Encoded([], [], line)
                self._append_turn(encoded, *self._turn(messages, assistant[-1], tools), "")
                return encoded
            self._append_turn(encoded, prompt, answer, done)
            done = prompt + answer
            if limit is not None and len(encoded.input_ids) > limit:
                break
        return encoded

    def _append_turn(self, encoded: Encoded, prompt: str, answer: str, done: str) -> None:
        prompt_ids = self._tokenize(prompt[len(done):])
        answer_ids = self._tokenize(answer)
        encoded.input_ids += prompt_ids + answer_ids
        encoded.labels += ([IGNORE] * len(prompt_ids) if self.mask_prompt else prompt_ids) + answer_ids

    def _turn(self, messages: list[dict], i: int, tools) -> tuple[str, str]:
        """(generation prompt before message i, the answer the model should generate) as text."""
        from liandan.data.template import trained_turn

        template = self.rendering.chat_template
        prompt = render_text(self.tokenizer, template, messages[:i], True, tools)
        message = messages[i]
        reasoning = message.get(self.layout.reasoning_key) if self.layout.reasoning_key else message.get("_reasoning")
        full = render_text(self.tokenizer, template, messages[: i + 1], False, tools)
        return prompt, trained_turn(self.layout, prompt, full, message.get("content") or "", reasoning)

    def _as_rendered(self, message: dict) -> dict:
        """An assistant message with its reasoning where this template reads it (else kept aside in
        `_reasoning`, for the think block liandan writes itself) and the answer alone in `content`."""
        if message.get("role") != "assistant":
            return message
        from liandan.data.template import REASONING_KEYS, split_reasoning

        content, reasoning = split_reasoning(message)
        out = {k: v for k, v in message.items() if k not in REASONING_KEYS}
        out["content"] = content if message.get("content") is not None or reasoning is not None else None
        if reasoning is not None:
            out[self.layout.reasoning_key or "_reasoning"] = reasoning
        return out

    def clean_message(self, message: dict) -> dict:
        """The message with stop tokens typed at the end of its content removed (counted in hand_typed)."""
        content = message.get("content")
        if isinstance(content, str):
            message = dict(message, content=self.hand_typed.strip(content, self.specials))
        return message

    def stop_token(self, fmt: str) -> str:
        """The token that ends a trained example of this format: the turn end for chats, EOS for text."""
        return self.tokenizer.eos_token if fmt == "text" else self.rendering.stop_tokens[0]

    def encode(self, example, limit: int | None = None) -> Encoded:
        """`limit` (chats only): see encode_chat. Text is tokenized whole, as it may be split into windows."""
        if example.text is not None:
            return self.encode_text(example.text, example.line)
        return self.encode_chat(example.messages, example.tools, example.line, limit)


def stop_token_ids(tokenizer, model, rendering, extra_eos: list[str] | None = None) -> list[int]:
    """The trained stop token(s), the model's own EOS ids, and any --extra-eos-token."""
    ids = set()
    for token in list(rendering.stop_tokens) + list(extra_eos or []):
        encoded = tokenizer.convert_tokens_to_ids(token)
        if isinstance(encoded, int) and encoded != tokenizer.unk_token_id:
            ids.add(encoded)
        else:
            pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise LiandanError(f"--extra-eos-token {token!r} is not a single token of this tokenizer")
            ids.add(pieces[0])
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


TRAINED_MARKS = ("⟦", "⟧")


def marked_text(tokenizer, encoded: Encoded) -> str:
    """The rendered example with its trained tokens between ⟦ ⟧ (the rest is masked: context, not learned)."""
    groups: list[tuple[bool, list[int]]] = []
    for token, label in zip(encoded.input_ids, encoded.labels):
        trained = label != IGNORE
        if groups and groups[-1][0] == trained:
            groups[-1][1].append(token)
        else:
            groups.append((trained, [token]))
    text = ""
    for trained, ids in groups:
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        text += f"{TRAINED_MARKS[0]}{piece}{TRAINED_MARKS[1]}" if trained else piece
    return text
