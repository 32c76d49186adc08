"""The authors' execution of a pretraining step: the baseline that simla's speed is measured against.

`ReferencePretraining` computes the same losses as `SimlaForPretraining` and overrides only the steps that
the authors' code runs differently:
  - every multimodal request (ITM, MLM student, MLM teacher, PSL vote) is a pass of its own over gathered
    image tokens, so each caption re-projects its image's cross-attention keys/values;
  - the captions enter every pass as ids, one word-embedding lookup per pass;
  - the MIM pass computes every patch's states in every layer;
  - the teachers always run, also with alpha = 0 (their targets are then weighted by zero);
  - dropout masks come from torch's sampler (the config's `objectives.execution` is "reference").
Without dropout both classes compute the same losses and gradients (tests/test_pretrain.py).

Selected by its class, `ReferencePretraining(config)`, or by a config with `objectives.execution =
"reference"` (`model_config.execution=reference`): the pretraining task names this class as its reference
model (`simla.tasks`), so `create_model`, `load_checkpoint` and `simla pretrain` then build it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import Tensor

from ..config import SimlaConfig
from .bert import SharedEncoder
from .pretrain import SimlaForPretraining, _caption_inputs, _MaskedPatches, _Step

__all__ = ["ReferencePretraining"]


class ReferencePretraining(SimlaForPretraining):
    """SimlaForPretraining in the authors' execution (see the module doc)."""

    def __init__(self, config: SimlaConfig) -> None:
        if config.objectives.execution != "reference":
            # The encoders read the field for their dropout sampler, and a saved checkpoint rebuilds this class.
            config = copy.deepcopy(config)
            config.objectives.execution = "reference"
        super().__init__(config)

    def _multimodal(self, encoder: SharedEncoder, image_tokens: Tensor | None,
                    requests: Mapping[str, tuple[Tensor, Tensor, Tensor]], cls_attention_for: str | None = None):
        """A pass per request over its gathered image tokens (the same results as the one shared pass)."""
        states: dict[str, Tensor] = {}
        cls_attention = None
        for name, (texts, masks, index) in requests.items():
            kwargs = dict(mode="multimodal", encoder_hidden_states=image_tokens[index], attention_mask=masks,
                          **_caption_inputs(texts))
            if name == cls_attention_for:
                states[name], cls_attention = encoder.forward_with_cls_attention(
                    layer=self.config.objectives.psl_layer, **kwargs)
            else:
                states[name] = encoder(**kwargs)
        return states, cls_attention

    def _caption_words(self, step: _Step) -> tuple[Tensor, Tensor | None]:
        """The captions as ids: every pass looks its words up itself."""
        return step.ids, step.masked_ids

    @staticmethod
    def _distills(alpha: float) -> bool:
        """The teachers always run."""
        return True

    @staticmethod
    def _masked_patches(patch_mask: Tensor) -> _MaskedPatches:
        """Every layer of the MIM pass runs on every patch; the masked ones are picked afterwards."""
        return _MaskedPatches(patch_mask, last_layer_only=False)
