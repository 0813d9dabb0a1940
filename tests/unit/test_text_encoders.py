"""Tiny T5 / CLIP folders, tokenizers and the frozen TextEncoders wrapper (docs/model.md, "Text encoders")."""

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from mindspeed_mm_osp.config import TextEncoderConfig, TokenizerConfig
from mindspeed_mm_osp.models.text import TextEncoders, load_text_encoder, load_tokenizer, tokenize
from mindspeed_mm_osp.models.text.tiny import write_tiny_clip, write_tiny_t5

PROMPTS = ["a red fox trots across a snowy meadow at sunrise", "a cat"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return write_tiny_t5(root / "t5", d_model=32), write_tiny_clip(root / "clip", hidden=32, projection_dim=24)


@pytest.fixture(scope="module")
def encoders(folders):
    t5, clip = folders
    return TextEncoders.from_config(TextEncoderConfig(str(t5)),
                                    TextEncoderConfig(str(clip), model_id="CLIPWithProjection"), dtype="fp32")


@pytest.fixture(scope="module")
def tokenizers(folders):
    t5, clip = folders
    return load_tokenizer(TokenizerConfig(str(t5))), load_tokenizer(TokenizerConfig(str(clip)))


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_writers_are_deterministic(tmp_path, folders):
    t5, clip = folders
    assert _files(write_tiny_t5(tmp_path / "t5", d_model=32)) == _files(t5)
    assert _files(write_tiny_clip(tmp_path / "clip", hidden=32, projection_dim=24)) == _files(clip)
    other = write_tiny_t5(tmp_path / "t5_seed1", d_model=32, seed=1)
    assert _files(other)["model.safetensors"] != _files(t5)["model.safetensors"]


def test_loaded_weights_equal_the_seeded_construction(folders):
    """from_pretrained(folder) gives exactly the model the writer built (nothing re-initialised)."""
    t5, clip = folders
    for folder, model_cls, config_cls in ((t5, T5EncoderModel, T5Config),
                                          (clip, CLIPTextModelWithProjection, CLIPTextConfig)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            built = model_cls(config_cls.from_pretrained(folder))
        loaded = model_cls.from_pretrained(folder, local_files_only=True)
        expected, got = built.state_dict(), loaded.state_dict()
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


def test_output_shapes_match_config(encoders, tokenizers):
    tok, tok2 = tokenizers
    ids, mask = tokenize(PROMPTS, tok, 16)
    ids2, mask2 = tokenize(PROMPTS, tok2, 77)
    hidden, out_mask, pooled = encoders.encode(ids, mask, ids2, mask2)
    assert hidden.shape == (2, 16, encoders.hidden_size) == (2, 16, 32)
    assert torch.equal(out_mask, mask)
    assert pooled.shape == (2, encoders.pooled_size) == (2, 24)
    assert hidden.dtype == pooled.dtype == torch.float32


def test_padding_does_not_change_valid_t5_outputs(encoders, tokenizers):
    tok, _ = tokenizers
    ids, mask = tokenize(PROMPTS, tok, 48)
    assert not mask[:, -1].any()  # both prompts fit, so both rows carry padding
    hidden, _, _ = _t5(encoders, ids, mask)
    # Scribble over the padded ids: the valid positions must not notice.
    noisy = torch.where(mask.bool(), ids, torch.randint_like(ids, 3, 40))
    hidden_noisy, _, _ = _t5(encoders, noisy, mask)
    valid = mask.bool()
    torch.testing.assert_close(hidden_noisy[valid], hidden[valid], rtol=0, atol=1e-6)
    # A longer padding length leaves the valid positions unchanged too.
    ids_long, mask_long = tokenize(PROMPTS, tok, 64)
    hidden_long, _, _ = _t5(encoders, ids_long, mask_long)
    torch.testing.assert_close(hidden_long[:, :48][valid], hidden[valid], rtol=0, atol=1e-5)


def _t5(encoders, ids, mask):
    t5_only = TextEncoders(encoders.t5)
    return t5_only.encode(ids, mask)


def test_clip_pool_ignores_the_mask(encoders, tokenizers):
    """CLIP is causal and pools the first EOS, so the reference's mask-less call is equivalent."""
    tok, tok2 = tokenizers
    ids, mask = tokenize(PROMPTS, tok, 16)
    ids2, mask2 = tokenize(PROMPTS, tok2, 77)
    _, _, with_mask = encoders.encode(ids, mask, ids2, mask2)
    _, _, without = encoders.encode(ids, mask, ids2, None)
    torch.testing.assert_close(with_mask, without, rtol=0, atol=1e-6)


def test_without_attention_mask_the_mask_is_all_ones(encoders, tokenizers):
    tok, _ = tokenizers
    ids, mask = tokenize(PROMPTS, tok, 16)
    _, out_mask, pooled = TextEncoders(encoders.t5, use_attention_mask=False).encode(ids, mask)
    assert torch.equal(out_mask, torch.ones_like(mask)) and pooled is None


def test_encoders_are_frozen(encoders):
    encoders.train()
    assert not encoders.training and not encoders.t5.training and not encoders.clip.training
    assert not any(p.requires_grad for p in encoders.parameters())


@pytest.mark.parametrize("dtype,expected", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_from_weight_dtype(folders, dtype, expected):
    t5, clip = folders
    model = load_text_encoder(TextEncoderConfig(str(t5)), dtype)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    # transformers keeps T5's `wo` in fp32 (`_keep_in_fp32_modules`).
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {expected}
    assert load_text_encoder(TextEncoderConfig(str(clip), model_id="CLIPWithProjection", dtype=dtype)).dtype == expected


def test_t5_tokenization(tokenizers):
    tok, _ = tokenizers
    ids, mask = tokenize("", tok, 512)
    assert ids.shape == mask.shape == (1, 512) and ids.dtype == mask.dtype == torch.int64
    assert ids[0, :2].tolist() == [tok.eos_token_id, tok.pad_token_id] == [1, 0]
    assert mask[0, :2].tolist() == [1, 0] and int(mask.sum()) == 1
    ids, mask = tokenize(PROMPTS[0], tok, 512)
    n = int(mask.sum())
    assert ids[0, n - 1] == tok.eos_token_id and not ids[0, n:].any()
    assert tok.decode(ids[0], skip_special_tokens=True) == PROMPTS[0]
    short, short_mask = tokenize(PROMPTS[0], tok, 6)  # truncation keeps the closing </s>
    assert short.shape == (1, 6) and short[0, -1] == tok.eos_token_id and short_mask.all()


def test_clip_tokenization(tokenizers):
    _, tok2 = tokenizers
    assert tok2.model_max_length == 77
    ids, mask = tokenize(PROMPTS, tok2, 77)
    assert ids.shape == mask.shape == (2, 77) and ids.dtype == torch.int64
    assert (ids[:, 0] == tok2.bos_token_id).all()
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[n - 1] == tok2.eos_token_id
    assert [tok2.decode(r, skip_special_tokens=True) for r in ids] == PROMPTS


def test_missing_folder_fails_without_network(tmp_path):
    with pytest.raises(OSError):
        load_text_encoder(TextEncoderConfig(str(tmp_path / "absent")))
    with pytest.raises(OSError):
        load_tokenizer(TokenizerConfig(str(tmp_path / "absent")))
