"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` with Satori's COAT tokens and prompt.

    tok = Tokenizer.from_pretrained("path/to/Qwen2.5-0.5B")   # tokenizer.json (+ tokenizer_config.json)
    tok.add_coat_tokens()                                     # <|continue|> <|reflect|> <|explore|>
    ids = tok.encode(tok.prompt("What is 2 + 3?"))

A run's prompts are Satori's ChatML lines (PROMPT = "satori") or the same words as one user message
in the tokenizer's own chat template (PROMPT = "chat_template"); train.main sets PROMPT from --prompt.
"""
import functools
import json
import os
from datetime import datetime

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import AddedToken

# COAT's meta-action tokens: go on, check what came before, try another way
CONTINUE, REFLECT, EXPLORE = "<|continue|>", "<|reflect|>", "<|explore|>"
COAT_TOKENS = (CONTINUE, REFLECT, EXPLORE)
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Satori's prompt, used for SFT, RL and evaluation alike: its instruction as one user message
INSTRUCTION = ("Solve the following math problem efficiently and clearly.\n"
               "Please reason step by step, and put your final answer within \\boxed{{}}.\n"
               "Problem: {question}")
CHATML = "<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
PROMPT_TEMPLATE = CHATML.format(message=INSTRUCTION)
# The built-in tokenizer's chat template: plain ChatML (no default system message), so that
# --prompt=chat_template gives it Satori's prompt exactly.
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT_STYLES = ("satori", "chat_template")
PROMPT = "satori"     # the run's --prompt, one of PROMPT_STYLES (train.main sets it)
# tokenizer_config.json fields not carried to a saved copy: the added tokens' ids (stale once COAT
# tokens are added; tokenizer.json holds them), the class and file pointers (we write ours), the loader's state
NOT_KEPT = ("added_tokens_decoder", "tokenizer_class", "auto_map", "backend", "tokenizer_file", "vocab_file",
            "merges_file", "special_tokens_map_file", "name_or_path", "is_local", "local_files_only")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, tk: HFTokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", config=None):
        self.tk = tk
        self.eos_token, self.pad_token = eos_token, pad_token
        # the rest of tokenizer_config.json (chat_template, model_max_length, bos_token, ...), saved as it came
        self.config = {k: v for k, v in (config or {}).items() if k not in NOT_KEPT}
        for t in (eos_token, pad_token):
            if tk.token_to_id(t) is None:
                raise ValueError(f"tokenizer has no token {t!r}")

    @classmethod
    def from_pretrained(cls, path):
        f = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tk = HFTokenizer.from_file(f)
        eos, pad, cfg = "<|im_end|>", "<|endoftext|>", {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as fh:
                cfg = json.load(fh)
            eos = _content(cfg.get("eos_token")) or eos
            pad = _content(cfg.get("pad_token")) or eos
        jinja = os.path.join(path, "chat_template.jinja")   # where newer transformers save it; it wins, as there
        if os.path.isfile(jinja):
            with open(jinja) as fh:
                cfg["chat_template"] = fh.read()
        if tk.token_to_id(eos) is None:   # base checkpoints name <|endoftext|> as eos
            eos = "<|endoftext|>"
        return cls(tk, eos, pad, cfg)

    def save_pretrained(self, path):
        """tokenizer.json and tokenizer_config.json, the chat template in the latter, where transformers
        4 and 5 both read it. PreTrainedTokenizerFast loads tokenizer.json as it is (transformers 5
        would rebuild a Qwen2Tokenizer's pre-tokenizer), and marks its special added tokens special."""
        os.makedirs(path, exist_ok=True)
        self.tk.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
            json.dump({**self.config, "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                       "pad_token": self.pad_token}, fh, indent=2)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # Special tokens stay in the text: the grader and the COAT grammar read them.
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    @property
    def bos_token(self):
        return _content(self.config.get("bos_token"))

    @property
    def special_tokens(self) -> dict:
        """{"bos_token": ..., "eos_token": ..., ...}: the named special tokens that are set, as
        transformers hands them to a chat template."""
        named = {k: _content(self.config.get(k)) for k in SPECIAL_NAMES}
        named.update(eos_token=self.eos_token, pad_token=self.pad_token)
        return {k: v for k, v in named.items() if v}

    @property
    def special_token_ids(self) -> dict:
        """The ids a model's config.json names: bos (None without one), eos, pad."""
        bos = self.bos_token
        return {"bos_token_id": self.tk.token_to_id(bos) if bos else None, "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id}

    @property
    def chat_template(self):
        """The default chat template (tokenizer_config.json may list several by name), or None."""
        t = self.config.get("chat_template")
        if isinstance(t, list):
            t = next((x["template"] for x in t if x.get("name") == "default"), None)
        return t

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a response: eos and, when present, <|im_end|> and <|endoftext|>."""
        ids = {self.eos_id} | {self.tk.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
        return sorted(i for i in ids if i is not None)

    # --- COAT meta-action tokens
    def add_coat_tokens(self) -> int:
        """Add <|continue|>, <|reflect|>, <|explore|> as special tokens (never split). Returns how
        many were new; grow the model with `model.resize_vocab(tok.vocab_size)` afterwards."""
        return self.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in COAT_TOKENS])

    @property
    def continue_id(self) -> int:
        return self.token_id(CONTINUE)

    @property
    def reflect_id(self) -> int:
        return self.token_id(REFLECT)

    @property
    def explore_id(self) -> int:
        return self.token_id(EXPLORE)

    @property
    def coat_ids(self) -> set[int]:
        return {self.continue_id, self.reflect_id, self.explore_id}

    # --- prompts
    def chat_prompt(self, message: str) -> str:
        """A prompt that asks `message` as one user message, in the run's style (render_prompt)."""
        return render_prompt(message, self.chat_template, self.special_tokens)

    def prompt(self, question: str) -> str:
        """Satori's prompt for `question`, in the run's style (chat_prompt)."""
        return self.chat_prompt(INSTRUCTION.format(question=question))

    def encode_prompt(self, question: str) -> list[int]:
        return self.encode(self.prompt(question))


def _content(token):
    """A special token of tokenizer_config.json, a string or an AddedToken dict, as a string."""
    return token["content"] if isinstance(token, dict) else token


# the sandboxed jinja2 environment transformers renders chat templates in; compiled once per template
@functools.lru_cache(maxsize=8)
def _compile(template):
    import jinja2          # comes with torch
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(template)


def render_prompt(message: str, chat_template=CHAT_TEMPLATE, special_tokens=None) -> str:
    """A prompt that asks `message` as one user message: Satori's ChatML lines, or with
    PROMPT == "chat_template" chat_template rendered as transformers' apply_chat_template(
    add_generation_prompt=True) renders it, the special tokens ({"eos_token": ...}) in reach.
    The default template is the built-in tokenizer's (its corpus is made before it is)."""
    if PROMPT == "satori":
        return CHATML.format(message=message)
    if not chat_template:
        raise ValueError("--prompt=chat_template: the tokenizer has no chat_template")
    return _compile(chat_template).render(messages=[{"role": "user", "content": message}],
                                          add_generation_prompt=True, **(special_tokens or {}))


def build_task_tokenizer(texts, vocab_size: int = 384, model_max_length: int = 1024,
                         whole_numbers: bool = False) -> Tokenizer:
    """Train a small byte-level BPE on `texts` (the built-in task's corpus, which should include the
    prompt template). Digits are split one per token, as in Qwen2, so arithmetic stays learnable;
    whole_numbers: a number is one piece for BPE instead, so that its frequent numbers become single
    tokens (arithmetic on them a lookup). Deterministic for the same texts in the same order. Its
    chat template is CHAT_TEMPLATE; model_max_length: the model's max_position_embeddings."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=not whole_numbers),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAT_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, config={"chat_template": CHAT_TEMPLATE, "model_max_length": model_max_length})
