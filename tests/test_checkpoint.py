"""Our checkpoints, safetensors exports, and reference SIMLA/ALBEF import (docs/reference-behaviour.md)."""

from __future__ import annotations

import argparse

import pytest
import torch

import simla
from simla.checkpoint import (CheckpointError, CorruptCheckpointError, NotACheckpointError, UntrustedCheckpointError,
                              load_checkpoint, read_checkpoint, save_checkpoint, save_pretrained)
from simla.cli import main

from conftest import make_batch


def reference_pretrain_state(config, image_grid: int | None = None) -> dict[str, torch.Tensor]:
    """Random tensors under the reference pretraining names and shapes, at `config`'s size."""
    g = torch.Generator().manual_seed(0)
    v, t, o = config.vision, config.text, config.objectives
    grid = image_grid or config.grid_size
    D, H, V, E = v.width, t.hidden_size, t.vocab_size, o.embed_dim

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state: dict[str, torch.Tensor] = {}
    for X in ("visual_encoder", "visual_encoder_m"):
        state.update({f"{X}.cls_token": r(1, 1, D), f"{X}.pos_embed": r(1, 1 + grid * grid, D),
                      f"{X}.mask_token": r(1, 1, D), f"{X}.patch_embed.proj.weight": r(D, 3, v.patch_size, v.patch_size),
                      f"{X}.patch_embed.proj.bias": r(D), f"{X}.norm.weight": r(D), f"{X}.norm.bias": r(D)})
        for i in range(v.depth):
            b = f"{X}.blocks.{i}"
            hidden = int(D * v.mlp_ratio)
            state.update({f"{b}.norm1.weight": r(D), f"{b}.norm1.bias": r(D), f"{b}.attn.qkv.weight": r(3 * D, D),
                          f"{b}.attn.qkv.bias": r(3 * D), f"{b}.attn.proj.weight": r(D, D), f"{b}.attn.proj.bias": r(D),
                          f"{b}.norm2.weight": r(D), f"{b}.norm2.bias": r(D), f"{b}.mlp.fc1.weight": r(hidden, D),
                          f"{b}.mlp.fc1.bias": r(hidden), f"{b}.mlp.fc2.weight": r(D, hidden), f"{b}.mlp.fc2.bias": r(D)})
    for T in ("text_encoder", "text_encoder_m"):
        p = f"{T}.bert"
        words = r(V, H)
        state.update({f"{p}.embeddings.word_embeddings.weight": words,
                      f"{p}.embeddings.position_embeddings.weight": r(t.max_position_embeddings, H),
                      f"{p}.embeddings.LayerNorm.weight": r(H), f"{p}.embeddings.LayerNorm.bias": r(H),
                      f"{p}.embeddings.position_ids": torch.arange(t.max_position_embeddings)[None]})
        for i in range(t.num_layers):
            layer = f"{p}.encoder.layer.{i}"
            for att, kv in (("attention", H), ("crossattention", D)):
                state.update({f"{layer}.{att}.self.query.weight": r(H, H), f"{layer}.{att}.self.query.bias": r(H),
                              f"{layer}.{att}.self.key.weight": r(H, kv), f"{layer}.{att}.self.key.bias": r(H),
                              f"{layer}.{att}.self.value.weight": r(H, kv), f"{layer}.{att}.self.value.bias": r(H),
                              f"{layer}.{att}.output.dense.weight": r(H, H), f"{layer}.{att}.output.dense.bias": r(H),
                              f"{layer}.{att}.output.LayerNorm.weight": r(H), f"{layer}.{att}.output.LayerNorm.bias": r(H)})
            I = t.intermediate_size
            state.update({f"{layer}.intermediate.dense.weight": r(I, H), f"{layer}.intermediate.dense.bias": r(I),
                          f"{layer}.output.dense.weight": r(H, I), f"{layer}.output.dense.bias": r(H),
                          f"{layer}.output.LayerNorm.weight": r(H), f"{layer}.output.LayerNorm.bias": r(H)})
        bias = r(V)
        state.update({f"{T}.cls.predictions.bias": bias, f"{T}.cls.predictions.decoder.weight": words,
                      f"{T}.cls.predictions.decoder.bias": bias,
                      f"{T}.cls.predictions.transform.dense.weight": r(H, H), f"{T}.cls.predictions.transform.dense.bias": r(H),
                      f"{T}.cls.predictions.transform.LayerNorm.weight": r(H),
                      f"{T}.cls.predictions.transform.LayerNorm.bias": r(H)})
    for name, out_f, in_f in (("vision_proj", E, D), ("text_proj", E, H), ("mim_head", o.visual_vocab_size, H),
                              ("concept_head", V, E)):
        for suffix in ("", "_m"):
            state.update({f"{name}{suffix}.weight": r(out_f, in_f), f"{name}{suffix}.bias": r(out_f)})
    state.update({"itm_head.weight": r(2, H), "itm_head.bias": r(2), "temp": torch.tensor(0.05),
                  "image_queue": r(E, o.queue_size), "text_queue": r(E, o.queue_size),
                  "queue_ptr": torch.tensor([3])})
    return state


def reference_retrieval_state(config) -> dict[str, torch.Tensor]:
    """The reference retrieval layout: no `bert.` infix, no MLM/MIM/PSL heads or mask tokens, plus an id queue."""
    state = {k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m."): v
             for k, v in reference_pretrain_state(config).items()
             if ".cls." not in k and "mim_head" not in k and "concept_head" not in k and "mask_token" not in k}
    state["idx_queue"] = torch.arange(16)[None]
    return state


@pytest.fixture(scope="module")
def tiny_config():
    return simla.get_config("simla_tiny", queue_size=16)


def test_reference_pretraining_checkpoint_imports_strictly(tmp_path, tiny_config):
    state = reference_pretrain_state(tiny_config)
    path = tmp_path / "checkpoint_29.pth"
    torch.save({"model": state, "epoch": 29}, path)
    model = load_checkpoint(path)
    assert isinstance(model, simla.SimlaForPretraining)
    assert model.config.objectives.queue_size == 16 and model.config.vision.image_size == 64
    ours = model.state_dict()
    assert torch.equal(ours["text_encoder.encoder.layer.1.crossattention.self.key.weight"],
                       state["text_encoder.bert.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(ours["text_encoder_m.embeddings.word_embeddings.weight"],
                       state["text_encoder_m.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(ours["mlm_head.transform.dense.weight"], state["text_encoder.cls.predictions.transform.dense.weight"])
    assert torch.equal(ours["mlm_head_m.bias"], state["text_encoder_m.cls.predictions.bias"])
    assert torch.equal(ours["visual_encoder.mask_token"], state["visual_encoder.mask_token"])
    assert torch.equal(ours["concept_head_m.weight"], state["concept_head_m.weight"])
    assert torch.equal(ours["image_queue"], state["image_queue"]) and int(ours["queue_ptr"]) == 3
    # No token types in SIMLA checkpoints -> a zero table, so type 0 adds nothing.
    assert torch.count_nonzero(ours["text_encoder.embeddings.token_type_embeddings.weight"]) == 0
    # The momentum weights come from the file, not from the online ones.
    assert not torch.equal(ours["vision_proj_m.weight"], ours["vision_proj.weight"])
    out = model(make_batch(model))
    assert all(torch.isfinite(v) for v in out.values())


def test_reference_import_resamples_position_embeddings(tmp_path, tiny_config):
    state = reference_pretrain_state(tiny_config, image_grid=4)  # 32 px checkpoint into a 64 px model
    model = simla.build_model(simla.get_config("simla_tiny", queue_size=16))
    report = simla.checkpoint.load_state_into(model, state, source="grid4")
    assert "visual_encoder.pos_embed" in report.resampled and report.ok
    assert model.visual_encoder.pos_embed.shape == (1, 65, 128)


def test_missing_unexpected_and_mismatched_keys_are_reported(tiny_config):
    state = reference_pretrain_state(tiny_config)
    del state["itm_head.bias"]
    state["text_encoder.bert.pooler.dense.weight"] = torch.zeros(1)
    model = simla.build_model(simla.get_config("simla_tiny", queue_size=16))
    with pytest.raises(CheckpointError) as err:
        simla.checkpoint.load_state_into(model, state, source="ref")
    assert "itm_head.bias" in str(err.value) and "pooler.dense.weight" in str(err.value)
    report = simla.checkpoint.load_state_into(model, state, source="ref", strict=False)
    assert report.missing == ["itm_head.bias"] and report.unexpected == ["text_encoder.bert.pooler.dense.weight"]
    state = reference_pretrain_state(tiny_config)
    state["vision_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="vision_proj.weight"):
        simla.checkpoint.load_state_into(model, state, source="ref")


def test_albef_like_checkpoint_reports_missing_cross_attention(tiny_config):
    # ALBEF has cross-attention only in its fusion layers and keeps BERT's token-type table.
    state = reference_pretrain_state(tiny_config)
    state = {k: v for k, v in state.items() if ".layer.0.crossattention." not in k and "mim_head" not in k
             and "concept_head" not in k and "mask_token" not in k}
    types = torch.randn(2, tiny_config.text.hidden_size)
    for T in ("text_encoder", "text_encoder_m"):
        state[f"{T}.bert.embeddings.token_type_embeddings.weight"] = types
    model = simla.build_model(simla.get_config("simla_tiny", queue_size=16))
    with pytest.raises(CheckpointError, match="layer.0.crossattention"):
        simla.checkpoint.load_state_into(model, state, source="albef")
    report = simla.checkpoint.load_state_into(model, state, source="albef", strict=False)
    assert any("layer.0.crossattention" in k for k in report.missing)
    assert torch.equal(model.text_encoder.embeddings.token_type_embeddings.weight, types)


def test_pickled_config_needs_explicit_trust(tmp_path, tiny_config):
    path = tmp_path / "ref.pth"
    torch.save({"model": reference_pretrain_state(tiny_config), "config": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, trust_pickle=True), simla.SimlaForPretraining)


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=16)
    model(make_batch(model))  # moves queues and momentum weights away from their initial values
    path = save_checkpoint(model, tmp_path / "ckpt" / "last.pt")
    assert not (tmp_path / "ckpt" / "last.pt.tmp").exists()
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    model.eval(), loaded.eval()
    pixels = make_batch(model)["image"][:2]
    assert torch.allclose(model.encode_image(pixels), loaded.encode_image(pixels))


def test_safetensors_export_loads_and_rebuilds_training_state(tmp_path):
    model = simla.create_model("simla_tiny", queue_size=16)
    directory = save_pretrained(model, tmp_path / "release")
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    loaded = load_checkpoint(directory)
    assert torch.equal(loaded.vision_proj_m.weight, loaded.vision_proj.weight)  # teachers copied after load
    assert torch.equal(loaded.text_encoder.embeddings.word_embeddings.weight,
                       model.text_encoder.embeddings.word_embeddings.weight)
    again = simla.create_model("simla_tiny", queue_size=16, pretrained=str(directory))
    assert torch.equal(again.itm_head.weight, model.itm_head.weight)
    base = load_checkpoint(directory, task="base", strict=False)
    assert isinstance(base, simla.SimlaModel) and not hasattr(base, "mim_head")


def test_convert_command(tmp_path, tiny_config, capsys):
    source = tmp_path / "ref.pth"
    torch.save({"model": reference_pretrain_state(tiny_config)}, source)
    assert main(["convert", str(source), str(tmp_path / "ours.pt"), "--export", str(tmp_path / "release")]) == 0
    assert "ours.pt" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "ours.pt")
    assert torch.equal(model.itm_head.weight, reference_pretrain_state(tiny_config)["itm_head.weight"])


def test_reference_retrieval_checkpoint_imports(tmp_path, tiny_config):
    state = reference_retrieval_state(tiny_config)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state}, path)
    model = load_checkpoint(path, task="retrieval")
    assert isinstance(model, simla.SimlaForRetrieval)
    assert torch.equal(model.idx_queue, state["idx_queue"])
    assert torch.equal(model.text_encoder.encoder.layer[0].attention.self.query.weight,
                       state["text_encoder.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(model.text_encoder_m.embeddings.word_embeddings.weight,
                       state["text_encoder_m.embeddings.word_embeddings.weight"])


# ------------------------------------------------------------------------ damaged and foreign files
@pytest.fixture
def load_calls(monkeypatch):
    """Every weights_only value torch.load is called with (to prove full unpickling never happens)."""
    calls, real = [], torch.load

    def recording(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def pickled_reference(path, tiny_config, marker: torch.Tensor | None = None):
    state = reference_pretrain_state(tiny_config)
    if marker is not None:
        state["itm_head.bias"] = marker
    torch.save({"model": state, "config": argparse.Namespace(lr=1e-4)}, path)
    return path


def test_truncated_checkpoint_is_corrupt_and_never_unpickled_even_when_trusted(tmp_path, tiny_config, load_calls):
    whole = pickled_reference(tmp_path / "ref.pth", tiny_config).read_bytes()
    for name, data in (("half.pth", whole[: len(whole) // 2]), ("cut.pth", whole[:-100]), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(data)
        for trust in (False, True):
            with pytest.raises(CorruptCheckpointError, match="truncated or corrupt"):
                read_checkpoint(tmp_path / name, trust_pickle=trust)
    assert False not in load_calls


def test_damaged_tensor_bytes_in_a_trusted_file_are_caught_before_unpickling(tmp_path, tiny_config, load_calls):
    marker = torch.full((2,), 1234.5)  # raw bytes easy to find in the file
    path = pickled_reference(tmp_path / "ref.pth", tiny_config, marker)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(marker.numpy().tobytes())
    data[at:at + 4] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="zip"):
        read_checkpoint(path, trust_pickle=True)
    assert False not in load_calls


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes\n")
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    mapping = tmp_path / "dict.pt"
    torch.save({"epoch": 3, "lr": 0.1}, mapping)
    release = save_pretrained(simla.create_model("simla_tiny", queue_size=16), tmp_path / "release")
    for path, message in ((text, "not a PyTorch checkpoint"), (listing, "holds a list"),
                          (mapping, "without a 'model' entry"), (release / "model.safetensors", "safetensors file")):
        with pytest.raises(NotACheckpointError, match=message):
            read_checkpoint(path, trust_pickle=True)


def test_untrusted_pickle_is_told_apart_from_damage(tmp_path, tiny_config, load_calls):
    path = pickled_reference(tmp_path / "ref.pth", tiny_config)
    with pytest.raises(UntrustedCheckpointError, match=r"argparse\.Namespace.*trust_pickle=True"):
        read_checkpoint(path)
    assert load_calls == [True]
    assert set(read_checkpoint(path, trust_pickle=True)) == {"model", "config"}
    assert load_calls == [True, True, False]


# ------------------------------------------------------------------------------ strict=False
def test_strict_false_loads_the_rest_and_keeps_fresh_weights_for_mismatched_shapes(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = simla.build_model(simla.get_config("simla_tiny", queue_size=16))
    fresh_proj = model.vision_proj.weight.detach().clone()
    state = reference_pretrain_state(tiny_config)
    state["vision_proj.weight"] = torch.zeros(3, 3)
    del state["itm_head.bias"]
    with pytest.raises(CheckpointError, match=r"vision_proj\.weight.*\(3, 3\)"):
        simla.checkpoint.load_state_into(model, state, source="ref")
    report = simla.checkpoint.load_state_into(model, state, source="ref", strict=False)
    assert [line.split(" ")[0] for line in report.mismatched] == ["vision_proj.weight"]
    assert report.missing == ["itm_head.bias"] and not report.ok
    assert torch.equal(model.vision_proj.weight, fresh_proj)  # fresh, not zeros and not dropped silently
    assert torch.equal(model.itm_head.weight, state["itm_head.weight"])  # everything else loaded

    # The same for our own format (e.g. a checkpoint of another width for one head).
    ours = simla.create_model("simla_tiny", queue_size=16).state_dict()
    ours["itm_head.weight"] = torch.zeros(2, 5)
    target = simla.build_model(simla.get_config("simla_tiny", queue_size=16))
    fresh_itm = target.itm_head.weight.detach().clone()
    with pytest.raises(CheckpointError, match="itm_head.weight"):
        simla.checkpoint.load_state_into(target, ours, source="ours")
    report = simla.checkpoint.load_state_into(target, ours, source="ours", strict=False)
    assert report.mismatched == ["itm_head.weight: checkpoint (2, 5) vs model (2, 128)"]
    assert torch.equal(target.itm_head.weight, fresh_itm)
    assert torch.equal(target.vision_proj.weight, ours["vision_proj.weight"])


def test_convert_task_retrieval_keeps_teachers_and_queues(tmp_path, tiny_config):
    state = reference_retrieval_state(tiny_config)
    source = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state}, source)
    assert main(["convert", str(source), str(tmp_path / "plain.pt")]) == 0
    plain = load_checkpoint(tmp_path / "plain.pt")
    assert not hasattr(plain, "visual_encoder_m")  # the default for such a file keeps the online weights only
    assert main(["convert", str(source), str(tmp_path / "ret.pt"), "--task", "retrieval"]) == 0
    model = load_checkpoint(tmp_path / "ret.pt")
    assert isinstance(model, simla.SimlaForRetrieval)
    for key in ("visual_encoder_m.blocks.0.attn.qkv.weight", "text_encoder_m.encoder.layer.0.output.dense.weight",
                "vision_proj_m.weight", "image_queue", "text_queue", "queue_ptr", "idx_queue"):
        assert torch.equal(model.state_dict()[key], state[key]), key


# ------------------------------------------------------------------ the reference key list, by hand
# The reference pretraining layout, written out from its documented key patterns (block/layer 0 of a
# one-layer model), each with the name it must get here (None: no counterpart by design). Nothing in
# this table is derived from simla's own key map.
REFERENCE_VIT = ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                 "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
                 "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
                 "norm.weight", "norm.bias"]
REFERENCE_TEXT_LAYER = [
    "attention.self.query.weight", "attention.self.query.bias", "attention.self.key.weight",
    "attention.self.key.bias", "attention.self.value.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias", "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "crossattention.self.query.weight", "crossattention.self.query.bias", "crossattention.self.key.weight",
    "crossattention.self.key.bias", "crossattention.self.value.weight", "crossattention.self.value.bias",
    "crossattention.output.dense.weight", "crossattention.output.dense.bias",
    "crossattention.output.LayerNorm.weight", "crossattention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias"]
REFERENCE_TEXT = {  # under text_encoder / text_encoder_m, reference suffix -> ours
    "bert.embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
    "bert.embeddings.LayerNorm.weight": "embeddings.LayerNorm.weight",
    "bert.embeddings.LayerNorm.bias": "embeddings.LayerNorm.bias",
    "bert.embeddings.position_ids": None,
    **{f"bert.encoder.layer.0.{leaf}": f"encoder.layer.0.{leaf}" for leaf in REFERENCE_TEXT_LAYER},
}
REFERENCE_MLM_HEAD = {  # reference suffix under text_encoder{,_m}.cls.predictions -> ours under mlm_head{,_m}
    "bias": "bias", "transform.dense.weight": "transform.dense.weight", "transform.dense.bias": "transform.dense.bias",
    "transform.LayerNorm.weight": "transform.LayerNorm.weight", "transform.LayerNorm.bias": "transform.LayerNorm.bias",
    "decoder.weight": None, "decoder.bias": None}  # the decoder is tied to the word embeddings / head bias
REFERENCE_TOP = ["vision_proj.weight", "vision_proj.bias", "vision_proj_m.weight", "vision_proj_m.bias",
                 "text_proj.weight", "text_proj.bias", "text_proj_m.weight", "text_proj_m.bias", "temp",
                 "itm_head.weight", "itm_head.bias", "mim_head.weight", "mim_head.bias", "mim_head_m.weight",
                 "mim_head_m.bias", "concept_head.weight", "concept_head.bias", "concept_head_m.weight",
                 "concept_head_m.bias", "image_queue", "text_queue", "queue_ptr"]


def reference_key_table() -> dict[str, str | None]:
    table: dict[str, str | None] = {key: key for key in REFERENCE_TOP}
    for owner in ("visual_encoder", "visual_encoder_m"):
        table.update({f"{owner}.{leaf}": f"{owner}.{leaf}" for leaf in REFERENCE_VIT})
    for owner, head in (("text_encoder", "mlm_head"), ("text_encoder_m", "mlm_head_m")):
        table.update({f"{owner}.{ref}": (f"{owner}.{ours}" if ours else None) for ref, ours in REFERENCE_TEXT.items()})
        table.update({f"{owner}.cls.predictions.{ref}": (f"{head}.{ours}" if ours else None)
                      for ref, ours in REFERENCE_MLM_HEAD.items()})
    return table


def test_handwritten_reference_key_list_maps_onto_the_model_exactly():
    table = reference_key_table()
    for reference, ours in table.items():
        assert simla.checkpoint.map_reference_key(reference) == ours, reference
    config = simla.get_config("simla_tiny", queue_size=16,
                              **{"vision.depth": 1, "text.num_layers": 1, "objectives.psl_layer": 0})
    torch.manual_seed(0)
    model = simla.build_model(config)
    ours = model.state_dict()
    # The reference has no token-type table (it imports as zeros); every other tensor of ours is named.
    token_types = {f"{t}.embeddings.token_type_embeddings.weight" for t in ("text_encoder", "text_encoder_m")}
    assert {name for name in table.values() if name} == set(ours) - token_types
    g = torch.Generator().manual_seed(1)
    state = {ref: torch.randn(ours[name].shape, generator=g) if ours[name].is_floating_point() else ours[name] + 1
             for ref, name in table.items() if name}
    for owner in ("text_encoder", "text_encoder_m"):
        state[f"{owner}.bert.embeddings.position_ids"] = torch.arange(config.text.max_position_embeddings)[None]
        state[f"{owner}.cls.predictions.decoder.weight"] = state[f"{owner}.bert.embeddings.word_embeddings.weight"]
        state[f"{owner}.cls.predictions.decoder.bias"] = state[f"{owner}.cls.predictions.bias"]
    report = simla.checkpoint.load_state_into(model, state, source="handwritten")  # strict
    assert report.ok and sorted(report.zero_filled) == sorted(token_types)
    loaded = model.state_dict()
    for reference, name in table.items():
        if name:
            assert torch.equal(loaded[name], state[reference]), reference


def test_reference_config_inference_keeps_the_paper_fractions_and_says_what_it_assumes(tiny_config, caplog):
    from simla.checkpoint import infer_reference_config

    state = reference_pretrain_state(tiny_config)  # an 8x8 grid at 64 px
    with caplog.at_level("WARNING", logger="simla.checkpoint"):
        config = infer_reference_config(state)
    o = config.objectives
    # 75 of 256 patches in blocks of >= 16 in the paper: 19 of 64 in blocks of >= 4 here (not all 64).
    assert (o.mim_num_masked, o.mim_min_block) == (19, 4)
    assert (config.vision.image_size, config.vision.patch_size, config.grid_size) == (64, 8, 8)
    assert config.text.num_layers == tiny_config.text.num_layers and o.psl_layer == tiny_config.text.num_layers - 1
    assert "heads" in caplog.text and "assumed" in caplog.text  # what the weights cannot tell is said
    wide = infer_reference_config(state, head_dim=32)
    assert wide.text.num_heads == tiny_config.text.hidden_size // 32
