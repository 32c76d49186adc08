"""The ONE shared encoder of SIMLA: a BERT-style stack whose every layer has self- and cross-attention.

Without an image (mode "text") the cross-attention sub-blocks are skipped and the stack is a plain BERT
text encoder; with image tokens as keys/values (mode "multimodal") the same weights are the multimodal
encoder. The MIM pass uses it the other way round: image tokens enter as `inputs_embeds` and
the text embeddings are the keys/values.

Sub-module names follow Hugging Face BERT (`embeddings.word_embeddings`, `encoder.layer.{i}.attention.self.
query`, ...) so that HF checkpoints and the reference SIMLA checkpoints map onto it by renaming prefixes
only. Attention runs through `scaled_dot_product_attention`; probabilities are materialised only when a
caller asks for them (PSL's [CLS] row, Grad-CAM capture).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from ..load_report import LoadReport

logger = logging.getLogger(__name__)

MODES = ("text", "multimodal")


def keep_mask(like: Tensor, p: float) -> Tensor:
    """A boolean keep mask shaped like `like`, each element kept with probability 1 - p (to 2^-15).

    Each 31-bit integer drawn from torch's generator yields two mask elements: its low 16 bits compared
    with p * 2^16 and its high 15 bits with p * 2^15. On CPU, where the generator is serial, that is about
    half the time of fp32 uniform draws and a third of torch's Bernoulli sampler, which otherwise cost a
    tenth of a paper-size pretraining step."""
    count = like.numel()
    draws = torch.empty((count + 1) // 2, dtype=torch.int32, device=like.device).random_()
    low_high = draws.view(torch.int16).view(-1, 2)  # signed 16-bit halves; the high one is in [0, 2^15)
    thresholds = _keep_thresholds(p, like.device)
    return (low_high >= thresholds).view(-1)[:count].view(like.shape)


def _keep_thresholds(p: float, device: torch.device) -> Tensor:
    """(low, high) int16 thresholds for :func:`keep_mask`, in the machine's byte order."""
    low, high = round(p * 2**16) - 2**15, round(p * 2**15)
    pair = [low, high] if sys.byteorder == "little" else [high, low]
    return torch.tensor(pair, dtype=torch.int16, device=device)


def dropout(x: Tensor, p: float, training: bool, uniform: bool) -> Tensor:
    """Inverted dropout. With `uniform` on a CPU tensor the mask comes from :func:`keep_mask` (uniform
    integer draws); elsewhere, torch's dropout."""
    if not training or p == 0:
        return x
    if uniform and x.device.type == "cpu":
        return x * keep_mask(x, p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return F.dropout(x, p, True)


class _Dropout(nn.Dropout):
    """nn.Dropout (same name in the module tree) that can draw its masks as :func:`dropout` does."""

    uniform = False  # set by SharedEncoder.set_uniform_dropout

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.uniform)


class BertEmbeddings(nn.Module):
    """Word (or precomputed) embeddings + absolute positions + token type 0 -> LayerNorm -> dropout."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # We keep BERT's token-type table (type 0 is always added) so that a model loaded from a Hugging Face
        # checkpoint reproduces its hidden states exactly. The table is a constant, never trained: the paper
        # model has no token types, so training the row would train a parameter it lacks (and make a model
        # imported from a reference checkpoint drift from the authors' after one step). It starts at zero
        # (adds nothing) and only a BERT checkpoint fills it; reference checkpoints import it as zeros.
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        if self.token_type_embeddings is not None:
            self.token_type_embeddings.weight.requires_grad_(False)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = _Dropout(config.hidden_dropout)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        length = x.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence of {length} tokens exceeds the {self.position_embeddings.num_embeddings} position embeddings"
            )
        x = x + self.position_embeddings.weight[:length].unsqueeze(0)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class AttentionProjections(nn.Module):
    """Query/key/value projections (HF name `attention.self`). Keys/values may come from another width."""

    def __init__(self, hidden_size: int, num_heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)
        self.dropout_p = dropout
        self.uniform_dropout = False  # set by SharedEncoder.set_uniform_dropout
        # Grad-CAM: when True the probabilities and their gradient are kept on the module.
        self.capture = False
        self.saved_probs: Tensor | None = None
        self.saved_probs_grad: Tensor | None = None

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _save_grad(self, grad: Tensor) -> None:
        self.saved_probs_grad = grad

    def forward(
        self, hidden: Tensor, context: Tensor, mask: Tensor | None, want_cls_row: bool = False,
        context_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Return the attended values (B, Lq, H) and, if asked, the [CLS]-query probabilities (B, h, Lk).

        `mask` is a boolean mask broadcastable to (B, h, Lq, Lk), True where attending is allowed.
        `context_index` (B,): row i attends to context row `context_index[i]`. The keys and values are then
        projected once per distinct context row and gathered, instead of once per query row (several
        captions of one image in a pretraining step share that image's projections, gradients included).
        """
        q, (k, v) = self._heads(self.query(hidden)), self.keys_values(context)
        if context_index is not None:
            k, v = k.index_select(0, context_index), v.index_select(0, context_index)
        p = self.dropout_p if self.training else 0.0
        # SDPA's CPU kernels cannot drop attention probabilities, so with dropout it computes them explicitly
        # anyway; computing them here lets keep_mask draw the mask.
        integer_mask = p > 0 and self.uniform_dropout and q.device.type == "cpu"
        explicit = self.capture or integer_mask
        if explicit:
            # The 1/sqrt(d) scale goes on q and the dropout's 1/(1-p) on the output: both are smaller than
            # the (Lq, Lk) maps, which then see no extra pass. Contiguous heads let the product run as one
            # batched GEMM on a transposed operand instead of copying k transposed (twice as fast on CPU).
            q = (q * (1.0 / math.sqrt(self.head_dim))).contiguous()
            scores = q @ k.contiguous().transpose(-1, -2)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            if self.capture:
                self.saved_probs = probs
                if probs.requires_grad:
                    probs.register_hook(self._save_grad)
            if integer_mask:
                out = ((probs * keep_mask(probs, p).to(probs.dtype)) @ v).mul_(1.0 / (1.0 - p))
            else:
                out = dropout(probs, p, self.training, False) @ v
            cls_row = probs[:, :, 0] if want_cls_row else None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            cls_row = None
            if want_cls_row:
                # Only the [CLS] query row is needed (PSL): one (B, h, 1, Lk) product, not the full map.
                scores = q[:, :, :1] @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
                if mask is not None:
                    row_mask = mask[..., :1, :] if mask.shape[-2] > 1 else mask
                    scores = scores.masked_fill(~row_mask, torch.finfo(scores.dtype).min)
                cls_row = scores.softmax(-1)[:, :, 0]
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1), cls_row

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of ``context`` in head layout, (B, h, Lk, d) each (cacheable per image)."""
        return self._heads(self.key(context)), self._heads(self.value(context))

    def attend_packed(self, tokens: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Packed text tokens (R, H) of any number of texts attend, without a mask, to ONE context's
        precomputed ``keys``/``values`` (1, h, Lk, d). Cross-attention queries do not interact, so all R
        tokens form one query sequence: the context's keys and values are neither recomputed nor copied
        per text (evaluation: no dropout)."""
        r = tokens.shape[0]
        q = self.query(tokens).view(r, self.num_heads, self.head_dim).transpose(0, 1).unsqueeze(0)
        return F.scaled_dot_product_attention(q, keys, values)[0].transpose(0, 1).reshape(r, -1)


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (HF names `attention.output` / `output`)."""

    def __init__(self, in_features: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = _Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: TextConfig, kv_width: int) -> None:
        super().__init__()
        self.self = AttentionProjections(config.hidden_size, config.num_heads, kv_width, config.attention_dropout)
        self.output = ResidualOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps, config.hidden_dropout)

    def forward(self, hidden: Tensor, context: Tensor, mask: Tensor | None, want_cls_row: bool = False,
                context_index: Tensor | None = None):
        attended, cls_row = self.self(hidden, context, mask, want_cls_row, context_index)
        return self.output(attended, hidden), cls_row


class Intermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT


class EncoderLayer(nn.Module):
    """Self-attention -> cross-attention (multimodal mode only) -> FFN, each with a post-residual LayerNorm."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.attention = Attention(config, config.hidden_size)
        self.crossattention = Attention(config, encoder_width)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config.intermediate_size, config.hidden_size, config.layer_norm_eps, config.hidden_dropout)

    def forward(
        self,
        hidden: Tensor,
        self_mask: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
        want_cls_row: bool = False,
        context_index: Tensor | None = None,
        query_positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        queries = hidden
        if query_positions is not None:
            # Only these positions go on (every position still serves as a key/value of the self-attention).
            queries = hidden.gather(1, query_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        hidden, cls_row = self.attention(queries, hidden, self_mask, want_cls_row)
        if context is not None:
            hidden, _ = self.crossattention(hidden, context, context_mask, context_index=context_index)
        return self.output(self.intermediate(hidden), hidden), cls_row

    def forward_packed(self, tokens: Tensor, real: Tensor, self_mask: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """The layer on packed tokens (R, H), the real positions ``real`` (T, L) of T texts, cross-attending
        to one image's cached keys/values. Every position-wise step (projections, FFN, LayerNorms) runs on
        the real tokens only; only the self-attention products need the (T, L) layout, where padding keys
        are masked as in :meth:`forward`, so the result equals it on the real tokens."""
        attention = self.attention.self
        t, n = real.shape

        def padded(x: Tensor) -> Tensor:
            full = x.new_zeros(t, n, x.shape[-1])
            full[real] = x
            return attention._heads(full)

        q, k, v = (padded(proj(tokens)) for proj in (attention.query, attention.key, attention.value))
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=self_mask).transpose(1, 2).reshape(t, n, -1)
        tokens = self.attention.output(mixed[real], tokens)
        cross = self.crossattention
        tokens = cross.output(cross.self.attend_packed(tokens, keys, values), tokens)
        return self.output(self.intermediate(tokens), tokens)


class LayerStack(nn.Module):
    """Holds the layers under the HF name `encoder.layer`."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config, encoder_width) for _ in range(config.num_layers))


def _padding_mask(mask: Tensor | None) -> Tensor | None:
    """(B, L) 1/0 padding mask -> boolean (B, 1, 1, L) attention mask (True = attend)."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"attention masks must be (batch, length), got shape {tuple(mask.shape)}")
    return mask.bool()[:, None, None, :]


class SharedEncoder(nn.Module):
    """The shared text / multimodal encoder (no pooler). Call it for hidden states (B, L, H)."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.encoder_width = encoder_width
        self.embeddings = BertEmbeddings(config)
        self.encoder = LayerStack(config, encoder_width)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if self.embeddings.token_type_embeddings is not None:
            with torch.no_grad():
                self.embeddings.token_type_embeddings.weight.zero_()  # a constant zero until BERT fills it

    def _init_weights(self, module: nn.Module) -> None:
        # Hugging Face BERT's initialisation; cross-attention weights not found in a checkpoint keep it.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = self.config.layer_init_std if isinstance(module, nn.Linear) else 0.02
            nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    @contextmanager
    def capture_cross_attention(self, layer: int) -> Iterator[AttentionProjections]:
        """Within the block, layer `layer`'s cross-attention keeps its probabilities (`.saved_probs`, in the
        autograd graph): only that layer leaves the SDPA path, and only for the duration (Grad-CAM)."""
        if not -len(self.layers) <= layer < len(self.layers):
            raise ValueError(f"layer {layer} out of range for {len(self.layers)} encoder layers")
        module = self.layers[layer].crossattention.self
        module.capture, module.saved_probs, module.saved_probs_grad = True, None, None
        try:
            yield module
        finally:
            module.capture = False
            module.saved_probs = module.saved_probs_grad = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.gradient_checkpointing = enable

    def set_uniform_dropout(self, enable: bool = True) -> None:
        """Draw every dropout mask of this encoder (hidden states and attention probabilities) with
        :func:`keep_mask` on CPU; off, torch's own sampler (the reference's random stream)."""
        for module in self.modules():
            if isinstance(module, _Dropout):
                module.uniform = enable
            elif isinstance(module, AttentionProjections):
                module.uniform_dropout = enable

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mode: str | None = None,
        encoder_hidden_states: Tensor | Sequence[Tensor] | None = None,
        encoder_attention_mask: Tensor | Sequence[Tensor | None] | None = None,
        layer_image_index: Sequence[int] | None = None,
        causal: bool = False,
        context_index: Tensor | None = None,
        output_positions: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (B, L, H) after the last layer.

        mode: "text" skips cross-attention; "multimodal" cross-attends in every layer. Default: multimodal
        when `encoder_hidden_states` is given, else text. Unlike the reference, any other string is an error.
        encoder_hidden_states: one (B, Lk, W) tensor, or a sequence of them (NLVR2: two images); then
        `layer_image_index[i]` says which one layer i attends to (default: layer i -> i mod count).
        causal: add a causal self-attention mask (an answer decoder).
        context_index: (B,) long; text i cross-attends to row `context_index[i]` of `encoder_hidden_states`,
        which may then hold fewer rows than there are texts. Each row's per-layer keys/values are computed
        once however many texts use it (the pretraining step's ITM and MLM passes share their images).
        output_positions: (B, K) long; only these positions' final states are computed and returned,
        (B, K, H): the last layer runs its queries, cross-attention and FFN on them alone (every position
        still serves as a key/value). MIM needs only the masked patches' states.
        """
        hidden, _ = self._run(
            input_ids, attention_mask, inputs_embeds, mode, encoder_hidden_states, encoder_attention_mask,
            layer_image_index, causal, cls_attention_layer=None, context_index=context_index,
            output_positions=output_positions,
        )
        return hidden

    def forward_with_cls_attention(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                                   layer: int, **kwargs) -> tuple[Tensor, Tensor]:
        """Like `forward`, also returning layer `layer`'s [CLS]-row self-attention probabilities (B, h, L)."""
        if not -len(self.layers) <= layer < len(self.layers):
            raise ValueError(f"layer {layer} out of range for {len(self.layers)} layers")
        hidden, cls_row = self._run(
            input_ids, attention_mask, kwargs.pop("inputs_embeds", None), kwargs.pop("mode", None),
            kwargs.pop("encoder_hidden_states", None), kwargs.pop("encoder_attention_mask", None),
            kwargs.pop("layer_image_index", None), kwargs.pop("causal", False), cls_attention_layer=layer % len(self.layers),
            context_index=kwargs.pop("context_index", None),
        )
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        return hidden, cls_row

    def image_keys_values(self, image_tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Each layer's cross-attention keys and values of ``image_tokens`` (1, N, W): compute them once per
        image and pass them to :meth:`forward_image_cached` for every text paired with that image."""
        return [layer.crossattention.self.keys_values(image_tokens) for layer in self.layers]

    def forward_image_cached(self, input_ids: Tensor, attention_mask: Tensor | None,
                             keys_values: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Multimodal hidden states of texts (T, L) that all attend to ONE image, given that image's per-layer
        keys and values (:meth:`image_keys_values`). The same result as `forward(..., encoder_hidden_states=
        tokens.expand(T, -1, -1))`, without recomputing the image's projections for each text (in the
        paper model they are the largest share of an ITM pass: 577 image tokens against ~30 text tokens)
        and without running padding through the layers. Padding positions of the result are zero.
        Evaluation only (no dropout; no gradient checkpointing)."""
        if len(keys_values) != len(self.layers):
            raise ValueError(f"keys_values needs one (keys, values) pair per layer ({len(self.layers)}), "
                             f"got {len(keys_values)}")
        if self.training:
            raise RuntimeError("forward_image_cached is for evaluation; call model.eval() first")
        hidden = self.embeddings(input_ids=input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        real = attention_mask.bool()
        # Only real tokens go through the layers (texts of 8-20 tokens padded to 30 do half the work).
        tokens = hidden[real]
        self_mask = _padding_mask(attention_mask)
        for layer, (keys, values) in zip(self.layers, keys_values):
            tokens = layer.forward_packed(tokens, real, self_mask, keys, values)
        hidden = hidden.new_zeros(hidden.shape)
        hidden[real] = tokens
        return hidden

    def _run(self, input_ids, attention_mask, inputs_embeds, mode, states, state_masks, layer_image_index, causal,
             cls_attention_layer, context_index=None, output_positions=None):
        if mode is None:
            mode = "multimodal" if states is not None else "text"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "multimodal" and states is None:
            raise ValueError("multimodal mode needs encoder_hidden_states (image tokens or, for MIM, text embeddings)")
        hidden = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        self_mask = _padding_mask(attention_mask)
        if output_positions is not None and (causal or cls_attention_layer is not None):
            raise ValueError("output_positions cannot be combined with a causal mask or [CLS] attention")
        if causal:
            length = hidden.shape[1]
            tri = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
            self_mask = tri if self_mask is None else self_mask & tri

        contexts: list[Tensor | None] = [None] * len(self.layers)
        context_masks: list[Tensor | None] = [None] * len(self.layers)
        if mode == "multimodal":
            if isinstance(states, Tensor):
                states, state_masks = [states], [state_masks]
            else:
                states = list(states)
                state_masks = list(state_masks) if state_masks is not None else [None] * len(states)
            if len(state_masks) != len(states):
                raise ValueError("encoder_attention_mask must have one entry per encoder_hidden_states tensor")
            if layer_image_index is None:
                layer_image_index = [i % len(states) for i in range(len(self.layers))]
            if len(layer_image_index) != len(self.layers):
                raise ValueError(f"layer_image_index needs {len(self.layers)} entries, got {len(layer_image_index)}")
            if context_index is not None:
                if len(states) != 1:
                    raise ValueError("context_index works with one encoder_hidden_states tensor")
                if context_index.shape != hidden.shape[:1]:
                    raise ValueError(f"context_index must have one entry per text ({hidden.shape[0]}), "
                                     f"got shape {tuple(context_index.shape)}")
                # A context mask follows its rows to the texts that use them.
                state_masks = [m if m is None else m.index_select(0, context_index) for m in state_masks]
            bool_masks = [_padding_mask(m) for m in state_masks]
            for i, j in enumerate(layer_image_index):
                contexts[i], context_masks[i] = states[j], bool_masks[j]

        cls_row = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            want = i == cls_attention_layer
            positions = output_positions if i == last else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, row = checkpoint(layer, hidden, self_mask, contexts[i], context_masks[i], want, context_index,
                                         positions, use_reentrant=False)
            else:
                hidden, row = layer(hidden, self_mask, contexts[i], context_masks[i], want, context_index, positions)
            if want:
                cls_row = row
        return hidden, cls_row


class MLMTransform(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """BERT's masked-LM head: transform, then a decoder tied to the word embeddings, plus its own bias.

    The decoder weight is passed in at call time rather than stored, so the tie needs no bookkeeping and a
    state dict never holds the same tensor twice (safetensors refuses shared tensors).
    """

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.transform = MLMTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.transform.dense.weight, std=0.02)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


# The report of `load_hf_bert_state` is the one report type of every weight import (formerly its own class).


# Keys of a BERT checkpoint that the shared encoder has no place for, by design.
_IGNORED_PREFIXES = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids", "cls.predictions.decoder.")


def _normalise_hf_key(key: str) -> str:
    key = key.removeprefix("bert.")
    # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def load_hf_bert_state(
    encoder: SharedEncoder, mlm_head: MLMHead | None, state: dict[str, Tensor], source: str
) -> LoadReport:
    """Copy a Hugging Face BERT state dict into the encoder (and MLM head); strict about everything else.

    Cross-attention weights are absent from BERT and keep their initialisation. Any other missing tensor,
    any unexpected tensor, and any shape mismatch is an error (never a silent drop).
    """
    report = LoadReport(source)
    targets = {f"encoder_module.{k}": v for k, v in encoder.state_dict().items()}
    if mlm_head is not None:
        targets.update({f"mlm_head.{k}": v for k, v in mlm_head.state_dict().items()})
    unexpected, mismatched = [], []
    seen = set()
    for raw_key, tensor in state.items():
        key = _normalise_hf_key(raw_key)
        if key.startswith(_IGNORED_PREFIXES):
            report.ignored.append(raw_key)
            continue
        if key.startswith("cls.predictions."):
            if mlm_head is None:
                report.ignored.append(raw_key)
                continue
            name = "mlm_head." + key.removeprefix("cls.predictions.")
        else:
            name = "encoder_module." + key
        if name not in targets:
            unexpected.append(raw_key)
            continue
        if targets[name].shape != tensor.shape:
            mismatched.append(f"{raw_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(targets[name].shape)}")
            continue
        with torch.no_grad():
            targets[name].copy_(tensor)
        seen.add(name)
        report.loaded.append(raw_key)
    report.missing = sorted(k.split(".", 1)[1] for k in targets if k not in seen)
    report.unexpected, report.mismatched = list(unexpected), list(mismatched)
    cross = sum("crossattention" in k for k in report.missing)
    if cross:
        report.notes.append(f"{cross} cross-attention tensors keep their fresh init (BERT has none)")
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {mismatched}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    other_missing = [k for k in report.missing if "crossattention" not in k]
    if mlm_head is not None and all(k.startswith("transform") or k == "bias" for k in other_missing):
        # A bare BertModel checkpoint has no MLM head; the head keeps its fresh init (reported).
        other_missing = [k for k in other_missing if not (k.startswith("transform") or k == "bias")]
    if other_missing:
        problems.append(f"missing keys: {other_missing}")
    if problems:
        raise ValueError(f"cannot initialise the text encoder from {source}: " + "; ".join(problems))
    logger.info("%s", report)
    return report
