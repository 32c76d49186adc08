"""Visual question answering: the shared encoder reads the question over the image; a causal decoder answers.

Layout (the paper's): the ViT; the shared encoder in multimodal mode over the question tokens; a separate
causal answer decoder (`vqa.decoder_layers`, 6 for the paper model) whose every layer cross-attends to the
encoder's question states, with an LM head tied to its word embeddings; momentum copies of all four.

Initialisation from a pretraining checkpoint follows the reference's key remapping: the encoder takes every
pretrained layer, the decoder's layers take the TOP `decoder_layers` pretrained layers (6-11 -> 0-5), its
embeddings are the pretrained embeddings and its LM head the pretrained MLM head. The momentum copies are
then made from the loaded weights (never the other way round).

Answers are tokenised `[CLS] wordpieces [SEP]`: the reference appends "[SEP]" to every answer string, and
that [SEP] is the end-of-answer token the decoder learns to emit.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SimlaConfig
from ..task_objectives import answer_token_losses, weighted_answer_loss
from ..tokenizers.captions import pre_question
from ..tokenizers.text import tokenize_answers
from .bert import MLMHead, SharedEncoder
from .outputs import VQAOutput
from .simla import SimlaBackbone

VQA_BATCH_KEYS = ("image", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_weights",
                  "answer_counts")

# Pretrained encoder tensors that initialise the decoder, in our names and the reference's.
_LAYER_KEY = re.compile(r"^text_encoder(_m)?\.(bert\.)?encoder\.layer\.(\d+)\.(.+)$")
_EMBEDDING_KEY = re.compile(r"^text_encoder(_m)?\.(bert\.)?embeddings\.(.+)$")
_REFERENCE_HEAD_KEY = re.compile(r"^text_encoder(_m)?\.cls\.predictions\.(.+)$")
_HEAD_KEY = re.compile(r"^mlm_head(_m)?\.(.+)$")


def add_decoder_init(state: Mapping[str, Tensor], decoder_layers: int) -> dict[str, Tensor]:
    """The state dict plus the answer decoder's initial tensors, copied from the pretrained encoder.

    Pretrained layer n >= L - decoder_layers becomes decoder layer n - (L - decoder_layers) (self-attention,
    cross-attention and FFN), the embeddings become the decoder's, the MLM head becomes its LM head (moved,
    not copied); the same for the momentum copies. Works on our key names and on the reference's (`text_encoder.bert.*`, `.cls.*`),
    producing decoder keys in the same naming. A state that already has a decoder is returned unchanged.
    """
    if any(key.startswith("text_decoder") or key.startswith("answer_head") for key in state):
        return dict(state)
    layers = [int(m.group(3)) for key in state if (m := _LAYER_KEY.match(key))]
    if not layers:
        return dict(state)
    offset = max(layers) + 1 - decoder_layers
    if offset < 0:
        raise ValueError(f"the checkpoint's encoder has {max(layers) + 1} layers, fewer than the "
                         f"{decoder_layers} decoder layers to initialise from it")
    out = dict(state)
    for key, tensor in state.items():
        if m := _LAYER_KEY.match(key):
            momentum, bert, index, rest = m.group(1) or "", m.group(2) or "", int(m.group(3)), m.group(4)
            if index >= offset:
                out[f"text_decoder{momentum}.{bert}encoder.layer.{index - offset}.{rest}"] = tensor
        elif m := _EMBEDDING_KEY.match(key):
            out[f"text_decoder{m.group(1) or ''}.{m.group(2) or ''}embeddings.{m.group(3)}"] = tensor
        elif m := _REFERENCE_HEAD_KEY.match(key):  # moved: a VQA model has no MLM head of its own
            out[f"text_decoder{m.group(1) or ''}.cls.predictions.{m.group(2)}"] = out.pop(key)
        elif m := _HEAD_KEY.match(key):
            out[f"answer_head{m.group(1) or ''}.{m.group(2)}"] = out.pop(key)
    return out


@dataclass(frozen=True)
class AnswerCandidates:
    """A tokenised answer list: (A, L) ids `[CLS] wordpieces [SEP] [PAD]...` and their mask."""

    answers: tuple[str, ...]
    ids: Tensor
    mask: Tensor

    def to(self, device: torch.device) -> "AnswerCandidates":
        return dataclasses.replace(self, ids=self.ids.to(device), mask=self.mask.to(device))


class SimlaForVQA(SimlaBackbone):
    """ViT + shared encoder (question over image) + causal answer decoder, with momentum copies.

    Batch (a mapping):
      image            (B, 3, R, R)
      question_ids     (B, Lq), question_mask (B, Lq)
      answer_ids       (N, La) every answer of every question, `[CLS] a [SEP]`; answer_mask (N, La)
      answer_weights   (N,) float: each answer's weight (VQA: its share of the annotators; VG: 0.5)
      answer_counts    (B,) long: how many of the N answers belong to each question (in order)
    """

    TASK = "vqa"
    IGNORED_SOURCE_PREFIXES = SimlaBackbone.IGNORED_SOURCE_PREFIXES + (
        "vision_proj", "text_proj", "itm_head", "temp", "mlm_head_m",
    )
    MOMENTUM_MODULES = ("visual_encoder", "text_encoder", "text_decoder", "answer_head")

    def __init__(self, config: SimlaConfig) -> None:
        super().__init__(config)
        config = self.config
        t = config.text
        # The decoder's cross-attention reads the encoder's question states (text width), not image tokens.
        self.text_decoder = SharedEncoder(dataclasses.replace(t, num_layers=config.decoder_layers),
                                          encoder_width=t.hidden_size)
        self.text_decoder.set_uniform_dropout(config.objectives.execution == "simla")
        self.answer_head = MLMHead(t)
        self.build_momentum_teachers()

    # ------------------------------------------------------------------------------ checkpoints
    def prepare_source_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A pretraining checkpoint gains the decoder tensors it initialises (see `add_decoder_init`)."""
        return add_decoder_init(state, self.config.decoder_layers)

    # ---------------------------------------------------------------------------------- pieces
    def encode_question(self, image: Tensor, question_ids: Tensor, question_mask: Tensor,
                        momentum: bool = False) -> Tensor:
        """Question states (B, Lq, H): the shared encoder over the question, cross-attending to the image."""
        vision = self.visual_encoder_m if momentum else self.visual_encoder
        encoder = self.text_encoder_m if momentum else self.text_encoder
        return encoder(question_ids, question_mask, mode="multimodal", encoder_hidden_states=vision(image))

    def decode(self, states: Tensor, question_mask: Tensor, answer_ids: Tensor, answer_mask: Tensor,
               momentum: bool = False) -> Tensor:
        """Teacher-forced decoder hidden states (N, La, H); row i reads question states `states[i]`."""
        decoder = self.text_decoder_m if momentum else self.text_decoder
        return decoder(answer_ids, answer_mask, mode="multimodal", encoder_hidden_states=states,
                       encoder_attention_mask=question_mask, causal=True)

    def lm_logits(self, hidden: Tensor, momentum: bool = False) -> Tensor:
        """Vocabulary logits of decoder states (the LM head is tied to the decoder's word embeddings)."""
        decoder = self.text_decoder_m if momentum else self.text_decoder
        head = self.answer_head_m if momentum else self.answer_head
        return head(hidden, decoder.embeddings.word_embeddings.weight)

    def next_token_logits(self, states: Tensor, question_mask: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                          momentum: bool = False) -> Tensor:
        """(N, La - 1, V): position t's prediction of answer token t + 1. The last position predicts nothing,
        so the LM head (the costliest part of a small decoder: a full-vocabulary product) skips it."""
        hidden = self.decode(states, question_mask, answer_ids, answer_mask, momentum)
        return self.lm_logits(hidden[:, :-1], momentum)

    # ----------------------------------------------------------------------------------- training
    def forward(self, batch: Mapping[str, Tensor], alpha: float | None = None) -> VQAOutput:
        missing = [k for k in VQA_BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"VQA batch lacks {missing}; expected keys {list(VQA_BATCH_KEYS)}")
        alpha = self.config.objectives.alpha if alpha is None else float(alpha)
        image, q_ids, q_mask = batch["image"], batch["question_ids"], batch["question_mask"]
        a_ids, a_mask = batch["answer_ids"], batch["answer_mask"]
        counts = batch["answer_counts"].long()
        num_questions = image.shape[0]
        # The question of each answer, without a host sync (output_size is known).
        owner = torch.repeat_interleave(torch.arange(num_questions, device=counts.device), counts,
                                        output_size=a_ids.shape[0])
        states = self.encode_question(image, q_ids, q_mask)
        logits = self.next_token_logits(states[owner], q_mask[owner], a_ids, a_mask)
        teacher = None
        if alpha > 0:
            # Real distillation (the reference computes the momentum answer and never uses it); with
            # alpha = 0 no teacher runs at all.
            with torch.no_grad():
                if self.training and self.update_momentum:
                    self.update_momentum_teachers(self.config.objectives.momentum)
                states_m = self.encode_question(image, q_ids, q_mask, momentum=True)
                teacher = self.next_token_logits(states_m[owner], q_mask[owner], a_ids, a_mask, momentum=True)
        per_answer = answer_token_losses(logits, a_ids, a_mask, teacher, alpha)
        loss = weighted_answer_loss(per_answer, batch["answer_weights"], num_questions)
        return VQAOutput({"vqa": loss}, answer_losses=per_answer.detach())

    # ---------------------------------------------------------------------------------- inference
    def answer_candidates(self, answers: Sequence[str]) -> AnswerCandidates:
        """Tokenise an answer list once, for repeated `rank_answers` / `answer` calls."""
        if isinstance(answers, str) or not answers:
            raise ValueError("answer_list must be a non-empty list of answer strings")
        ids, mask = tokenize_answers(self.tokenizer, answers, self.config.text.sep_token_id,
                                     self.config.text.max_position_embeddings - 1)
        return AnswerCandidates(tuple(answers), ids, mask).to(self.device)

    @torch.no_grad()
    def rank_answers(self, states: Tensor, question_mask: Tensor, candidates: AnswerCandidates,
                     k: int | None = None, max_sequences: int = 1024) -> tuple[Tensor, Tensor]:
        """(indices (B, k), scores (B, k)) of each question's best candidates, best first.

        1. One decoder step from [CLS] gives every question's first-token distribution; each candidate is
           scored by its first token and the top k are kept (k: `vqa.k_test`, capped at the list size).
        2. The kept candidates are re-scored with the whole answer, teacher-forced, in batches that span
           questions: score = the sum of the log-probabilities of all its tokens ([SEP] included). With
           `vqa.answer_scoring: reference` the first token's log-probability is added once more, as the
           authors' ranking does.
        """
        k = min(k or self.config.vqa.k_test, len(candidates.answers))
        num_questions = states.shape[0]
        ids, mask = candidates.ids, candidates.mask
        start = ids[:1, :1].expand(num_questions, 1)
        first = self.lm_logits(self.decode(states, question_mask, start, torch.ones_like(start))[:, 0]).float()
        first_logprob = first.log_softmax(-1)[:, ids[:, 1]]  # (B, A)
        top_first, top_index = first_logprob.topk(k, dim=1)
        flat = top_index.reshape(-1)
        owner = torch.arange(num_questions, device=states.device).repeat_interleave(k)
        rest = []
        for start_row in range(0, flat.numel(), max_sequences):
            rows = slice(start_row, start_row + max_sequences)
            chosen, who = flat[rows], owner[rows]
            hidden = self.decode(states[who], question_mask[who], ids[chosen], mask[chosen])
            # The decoder is causal, so position 0 ([CLS]) is step 1's state again: its prediction of the first
            # token is `top_first` already, and the full-vocabulary head runs on positions 1.. only.
            logits = self.lm_logits(hidden[:, 1:-1])
            rest.append(-answer_token_losses(logits, ids[chosen, 1:], mask[chosen, 1:]))
        scores = top_first + torch.cat(rest).view(num_questions, k)
        if self.config.vqa.answer_scoring == "reference":
            scores = scores + top_first
        order = scores.argsort(dim=1, descending=True)
        return top_index.gather(1, order), scores.gather(1, order)

    @torch.no_grad()
    def answer(self, images, questions: Sequence[str], answer_list: Sequence[str] | AnswerCandidates,
               top: int = 5, k: int | None = None) -> list[list[tuple[str, float]]]:
        """The `top` answers of each question with their probabilities (softmax over the k ranked candidates).

        images: (B, 3, R, R) normalised pixels, or PIL images / image paths (resized as in evaluation).
        questions: B question strings (cleaned as the reference cleans questions).
        """
        pixels = self.prepare_pixels(images)
        if isinstance(questions, str):
            questions = [questions]
        if pixels.shape[0] != len(questions):
            raise ValueError(f"answer() pairs images with questions one to one: got {pixels.shape[0]} images, "
                             f"{len(questions)} questions")
        candidates = answer_list if isinstance(answer_list, AnswerCandidates) else self.answer_candidates(answer_list)
        q_ids, q_mask = self.tokenize([pre_question(q) for q in questions])
        was_training = self.training
        self.eval()
        try:
            states = self.encode_question(pixels, q_ids, q_mask)
            index, scores = self.rank_answers(states, q_mask, candidates, k=k)
        finally:
            self.train(was_training)
        probabilities = scores.softmax(-1)
        shown = min(top, index.shape[1])
        return [[(candidates.answers[i], float(p)) for i, p in zip(row[:shown].tolist(), prob[:shown].tolist())]
                for row, prob in zip(index, probabilities)]

