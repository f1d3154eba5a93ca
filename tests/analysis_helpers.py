"""Shared by test_analysis.py and test_calibration.py: a tiny random Llama, a character-level
tokenizer (ids = ASCII codes, so offsets are exact and independent of any real tokenizer),
and query/key constructions with a known attention pattern."""

from __future__ import annotations

import torch


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, attn: str = "sdpa", seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
    )
    cfg._attn_implementation = attn
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


class _Encoding(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CharTokenizer:
    """One token per character, id = ``ord(c) % 128``; offsets are the character itself."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 128 for c in text]

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False,
                 return_tensors: str | None = None) -> _Encoding:
        ids = self.encode(text)
        enc = _Encoding(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)
        if return_offsets_mapping:
            enc["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return enc

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(int(i)) for i in ids)


def pattern_qk(T: int, heads: list[str], *, c_local: float = 0.05, c_far: float = 0.5, offset: int = 100,
               sink_logit: float = 2.0, D: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries ``[1, len(heads), T, D]`` over one shared KV head ``[1, 1, T, D]`` (GQA) whose
    attention (scale 1) has a known shape per head:

    * ``local``: ``exp(-c_local * (i - j)^2)`` -- a narrow band at the diagonal; key 0 muted;
    * ``streaming``: the same band plus key 0 at logit ``sink_logit`` for every query;
    * ``retrieval``: ``exp(-c_far * (i - offset - j)^2)`` -- one distant key per query, a
      different one for each query (so no single key becomes a sink);
    * ``diffuse``: all scores 0 -- uniform.

    Keys ``k_j = [1, j, j^2, [j == 0], 0...]`` (key 0 is ``[0, 0, 0, 1]``), so ``q_i . k_j =
    -c (i - o - j)^2`` for ``q_i = [-c (i-o)^2, 2c (i-o), -c, *]``."""
    j = torch.arange(T, dtype=torch.float64)
    k = torch.zeros(1, 1, T, D, dtype=torch.float64)
    k[0, 0, :, 0] = 1.0
    k[0, 0, :, 1] = j
    k[0, 0, :, 2] = j * j
    k[0, 0, 0] = 0.0
    k[0, 0, 0, 3] = 1.0
    q = torch.zeros(1, len(heads), T, D, dtype=torch.float64)
    i = torch.arange(T, dtype=torch.float64)
    for h, kind in enumerate(heads):
        if kind in ("local", "streaming"):
            c, o = c_local, 0.0
        elif kind == "retrieval":
            c, o = c_far, float(offset)
        elif kind == "diffuse":
            continue
        else:
            raise ValueError(kind)
        q[0, h, :, 0] = -c * (i - o) ** 2
        q[0, h, :, 1] = 2 * c * (i - o)
        q[0, h, :, 2] = -c
        # key 0: logit sink_logit for streaming, muted otherwise
        q[0, h, :, 3] = sink_logit if kind == "streaming" else -1e3
    return q, k


def dense_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax ``[B, H, T, T]`` in float64, the plain way (for comparisons)."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(H // Hkv, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    T = q.shape[2]
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)
