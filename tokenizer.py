"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer` with Satori's COAT tokens and prompt template.

    tok = Tokenizer.from_pretrained("path/to/Qwen2.5-0.5B")   # tokenizer.json (+ tokenizer_config.json)
    tok.add_coat_tokens()                                     # <|continue|> <|reflect|> <|explore|>
    ids = tok.encode(tok.prompt("What is 2 + 3?"))
"""
import json
import os

from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers import AddedToken

# COAT's meta-action tokens: go on, check what came before, try another way
CONTINUE, REFLECT, EXPLORE = "<|continue|>", "<|reflect|>", "<|explore|>"
COAT_TOKENS = (CONTINUE, REFLECT, EXPLORE)
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Satori's prompt, used for SFT, RL and evaluation alike.
PROMPT_TEMPLATE = ("<|im_start|>user\nSolve the following math problem efficiently and clearly.\n"
                   "Please reason step by step, and put your final answer within \\boxed{{}}.\n"
                   "Problem: {question}<|im_end|>\n<|im_start|>assistant\n")


class Tokenizer:
    def __init__(self, tk: HFTokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"):
        self.tk = tk
        self.eos_token, self.pad_token = eos_token, pad_token
        for t in (eos_token, pad_token):
            if tk.token_to_id(t) is None:
                raise ValueError(f"tokenizer has no token {t!r}")

    @classmethod
    def from_pretrained(cls, path):
        f = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        tk = HFTokenizer.from_file(f)
        eos, pad = "<|im_end|>", "<|endoftext|>"
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as fh:
                cfg = json.load(fh)
            content = lambda t: t["content"] if isinstance(t, dict) else t
            eos = content(cfg.get("eos_token") or eos)
            pad = content(cfg.get("pad_token") or eos)
        if tk.token_to_id(eos) is None:   # base checkpoints name <|endoftext|> as eos
            eos = "<|endoftext|>"
        return cls(tk, eos, pad)

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        self.tk.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                       "pad_token": self.pad_token, "model_max_length": 32768}, fh, indent=2)

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

    # --- prompt template
    @staticmethod
    def prompt(question: str) -> str:
        return PROMPT_TEMPLATE.format(question=question)

    def encode_prompt(self, question: str) -> list[int]:
        return self.encode(self.prompt(question))


def build_task_tokenizer(texts, vocab_size: int = 384) -> Tokenizer:
    """Train a small byte-level BPE on `texts` (the built-in task's corpus, which should include the
    prompt template). Digits are split one per token, as in Qwen2, so arithmetic stays learnable.
    Deterministic for the same texts in the same order."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAT_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk)
