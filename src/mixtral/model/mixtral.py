"""MixtralModel (the decoder stack) and the four task heads, with Transformers' forward arguments."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cache import DynamicCache
from ..config import MixtralConfig
from .attention import causal_mask
from .base import MixtralPreTrainedModel
from .layer import DecoderLayer
from .linear import Linear
from .losses import (causal_lm_loss, infer_problem_type, load_balancing_loss, question_answering_loss,
                     sequence_classification_loss, token_classification_loss)
from .norm import RMSNorm
from .outputs import (MoeCausalLMOutputWithPast, MoeModelOutputWithPast, QuestionAnsweringModelOutput,
                      SequenceClassifierOutputWithPast, TokenClassifierOutput)
from .rope import RotaryEmbedding


def _as_cache(past_key_values: Any, cache: Any) -> DynamicCache | None:
    past = past_key_values if past_key_values is not None else cache
    if past is None or isinstance(past, DynamicCache):
        return past
    if isinstance(past, (tuple, list)):
        return DynamicCache.from_legacy_cache(past)
    raise TypeError(f"past_key_values must be a mixtral DynamicCache or a tuple of (key, value) pairs, "
                    f"got {type(past).__name__}")


class MixtralModel(MixtralPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns the last hidden state."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_size, config.rope_theta)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        cache: DynamicCache | None = None,
    ) -> MoeModelOutputWithPast | tuple:
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation in backward cannot replay cache writes
        past = _as_cache(past_key_values, cache)
        if use_cache and past is None:
            past = DynamicCache(cfg.num_hidden_layers)
        if inputs_embeds is None:
            self.check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3:
            raise ValueError(f"expected (batch, seq_len) input_ids or (batch, seq_len, hidden) inputs_embeds, "
                             f"got inputs_embeds of shape {tuple(inputs_embeds.shape)}")
        b, s, _ = inputs_embeds.shape
        past_len = past.get_seq_length() if past is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=inputs_embeds.device)[None]  # (1, S)
        mask = causal_mask(attention_mask, s, past_len, cfg.sliding_window, inputs_embeds.device)
        cos, sin = self.rotary_emb(position_ids, inputs_embeds.dtype)  # (B|1, S, D)

        x = inputs_embeds
        all_hidden, all_attn, all_router = [x], [], []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, probs, router_logits = checkpoint(layer, x, cos, sin, mask, None, bool(output_attentions),
                                                     use_reentrant=False)
            else:
                x, probs, router_logits = layer(x, cos, sin, mask, past if use_cache else None,
                                                bool(output_attentions))
            all_hidden.append(x)
            all_attn.append(probs)
            all_router.append(router_logits)
        x = self.norm(x)
        all_hidden[-1] = x  # Transformers' convention: the last hidden state is the normed one

        out = MoeModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(all_router) if output_router_logits else None,
        )
        return out if return_dict is not False else out.to_tuple()

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty: there must be at least one token")
        if bool(((input_ids < 0) | (input_ids >= self.config.vocab_size)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")


class _WithBackbone(MixtralPreTrainedModel):
    """A head on top of `self.model`, the attribute name Transformers uses (so checkpoint keys match)."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        self.model = MixtralModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens


class MixtralForCausalLM(_WithBackbone):
    """The language model: backbone + lm_head, with the LM loss and the router's load-balancing loss."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = None  # generate()'s defaults; from_pretrained reads generation_config.json
        self.post_init()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Transformers' generate(): greedy or sampled continuation, prompt included (see mixtral.generation)."""
        from ..generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        cache: DynamicCache | None = None,
    ) -> MoeCausalLMOutputWithPast | tuple:
        cfg = self.config
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, output_router_logits, cache=cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = causal_lm_loss(logits, labels) if labels is not None else None
        aux_loss = None
        if output_router_logits:
            token_mask = attention_mask if attention_mask is None or attention_mask.dim() == 2 else None
            aux_loss = load_balancing_loss(out.router_logits, cfg.num_local_experts, cfg.num_experts_per_tok,
                                           token_mask)  # a 4-D mask does not say which tokens are padding
            if loss is not None:
                loss = loss + cfg.router_aux_loss_coef * aux_loss.to(loss.device)
        result = MoeCausalLMOutputWithPast(loss, aux_loss, logits, out.past_key_values, out.hidden_states,
                                           out.attentions, out.router_logits)
        return result if return_dict is not False else result.to_tuple()


class MixtralForSequenceClassification(_WithBackbone):
    """Scores every position, pools at the last non-pad token, loss by config.problem_type."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: DynamicCache | None = None,
    ) -> SequenceClassifierOutputWithPast | tuple:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache=cache)
        logits = self.score(out.last_hidden_state)  # (B, S, num_labels)
        b = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and b != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id to find each row's "
                             "last token")
        if pad is None or input_ids is None:
            last = torch.full((b,), -1, device=logits.device)  # inputs_embeds: padding cannot be seen
        else:  # the rightmost non-pad token: right and left padding both work
            non_pad = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * non_pad).argmax(-1)
        pooled = logits[torch.arange(b, device=logits.device), last]  # (B, num_labels)

        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                self.config.problem_type = infer_problem_type(self.config.num_labels, labels)
            loss = sequence_classification_loss(pooled, labels, self.config.problem_type)
        result = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()


class MixtralForTokenClassification(_WithBackbone):
    """A label per token (dropout, then a linear layer with bias), cross-entropy ignoring -100."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        extra = config.extra
        p = extra.get("classifier_dropout", extra.get("hidden_dropout"))
        self.dropout = nn.Dropout(0.1 if p is None else p)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=extra.get("token_classification_bias",
                                                                                     True))
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: DynamicCache | None = None,
    ) -> TokenClassifierOutput | tuple:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache=cache)
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = token_classification_loss(logits, labels) if labels is not None else None
        result = TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()


class MixtralForQuestionAnswering(_WithBackbone):
    """Start and end logits per token for extractive QA; span loss with clamped positions."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: DynamicCache | None = None,
    ) -> QuestionAnsweringModelOutput | tuple:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, False,
                         output_attentions, output_hidden_states, cache=cache)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(dim=-1)  # (B, S) each
        start_logits, end_logits = start_logits.contiguous(), end_logits.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        result = QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()
