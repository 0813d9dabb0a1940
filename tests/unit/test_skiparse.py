"""Skiparse index maps against the worked examples in docs/model.md ("Skiparse attention") and exact inversion."""

import pytest
import torch

from mindspeed_mm_osp.models.attention import attention
from mindspeed_mm_osp.models.predictor import (
    pad_to_skiparse,
    padded_length,
    skiparse_attention,
    skiparse_groups,
    skiparse_index,
    skiparse_inverse_index,
    skiparse_key_mask,
    skiparse_permute,
    skiparse_unpermute,
)

P10, P11 = None, None  # padding tokens (P in docs/model.md's examples)


@pytest.mark.parametrize("length,k,group,expected", [
    (16, 2, False, [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]]),
    (16, 2, True, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]),
    (16, 4, False, [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]),
    (16, 4, True, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]),
    (32, 4, True, [[0, 1, 2, 3, 16, 17, 18, 19], [4, 5, 6, 7, 20, 21, 22, 23],
                   [8, 9, 10, 11, 24, 25, 26, 27], [12, 13, 14, 15, 28, 29, 30, 31]]),
    (10, 2, False, [[0, 2, 4, 6, 8, P10], [1, 3, 5, 7, 9, P11]]),
    (10, 2, True, [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, P10, P11]]),
])
def test_worked_examples(length, k, group, expected):
    assert skiparse_groups(length, k, group) == expected


@pytest.mark.parametrize("length,k", [(16, 2), (16, 4), (32, 4), (10, 2), (18, 8), (64, 8), (37, 4)])
@pytest.mark.parametrize("group", [False, True])
def test_formulas_and_exact_inverse(length, k, group):
    lp = padded_length(length, k)
    assert lp % (k * k) == 0 and lp - length < k * k
    batch = 3
    # token value encodes (raster index, sample)
    x = (torch.arange(lp)[:, None] * 10 + torch.arange(batch)[None])[..., None].repeat(1, 1, 2)
    y = skiparse_permute(x, k, group)
    assert y.shape == (lp // k, k * batch, 2)
    for q in range(lp // k):
        for g in range(k):
            for b in range(batch):
                p = int(skiparse_inverse_index(k, group, g, q))
                assert y[q, g * batch + b, 0].item() == p * 10 + b  # batch index g*B + b
                assert skiparse_index(k, group, p) == (g, q)
    assert torch.equal(skiparse_unpermute(y, k, group), x)
    # vectorised formulas agree with the scalar ones
    p = torch.arange(lp)
    g, q = skiparse_index(k, group, p)
    assert torch.equal(skiparse_inverse_index(k, group, g, q), p)


def test_key_mask_worked_example():
    """L=10, k=2, token 3 invalid: single-skip key masks g0 [0,0,0,0,0,M], g1 [0,M,0,0,0,M], then the text mask."""
    video_valid = torch.ones(1, 10, dtype=torch.bool)
    video_valid[0, 3] = False
    text_valid = torch.tensor([[True, True, False]])
    mask = skiparse_key_mask(video_valid, text_valid, 2, group=False)
    ok, m = True, False
    assert mask.tolist() == [[ok, ok, ok, ok, ok, m, ok, ok, m],
                             [ok, m, ok, ok, ok, m, ok, ok, m]]


def test_permuted_mask_equals_mask_of_permuted_tokens():
    torch.manual_seed(0)
    b, length, k = 2, 37, 4
    valid = torch.rand(b, length) > 0.3
    text = torch.ones(b, 5, dtype=torch.bool)
    for group in (False, True):
        mask = skiparse_key_mask(valid, text, k, group)[:, :padded_length(length, k) // k]
        tokens = skiparse_permute(pad_to_skiparse(valid.t(), k, value=False), k, group).t()
        assert torch.equal(mask, tokens)


def test_attention_key_padding_mask_matches_explicit_removal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    valid = torch.tensor([[True] * 7, [True, True, False, True, False, True, True]])
    out = attention(q, k, v, valid)
    keep = valid[1]
    ref = torch.softmax(q[1] @ k[1][:, keep].transpose(-1, -2) / 8 ** 0.5, -1) @ v[1][:, keep]
    torch.testing.assert_close(out[1], ref)
    # a fully masked row stays finite (uniform weights), like the reference's finite bias
    assert torch.isfinite(attention(q, k, v, torch.zeros(2, 7, dtype=torch.bool))).all()


@pytest.mark.parametrize("length,k,group", [(18, 2, False), (18, 4, True), (18, 8, False), (18, 8, True),
                                            (16, 1, False)])
def test_skiparse_attention_equals_explicit_group_attention(length, k, group):
    """Video token a sees key b iff same group or b is text; text outputs are the mean over the k groups."""
    torch.manual_seed(0)
    b, s, h, d = 2, 5, 3, 8
    qx, kx, vx = (torch.randn(length, b, h, d) for _ in range(3))
    qc, kc, vc = (torch.randn(s, b, h, d) for _ in range(3))
    video_valid = torch.rand(b, length) > 0.2
    text_valid = torch.ones(b, s, dtype=torch.bool)
    text_valid[1, -2:] = False
    ox, oc = skiparse_attention(qx, kx, vx, qc, kc, vc, skiparse_key_mask(video_valid, text_valid, k, group), k, group)

    def attend(q, keys, values, valid):  # (n, h, d) queries over the valid keys
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q, keys[valid]) / d ** 0.5, -1)
        return torch.einsum("hqk,khd->qhd", w, values[valid])

    for bi in range(b):
        text_sum = torch.zeros(s, h, d)
        for members in skiparse_groups(length, k, group):
            idx = torch.tensor([m for m in members if m is not None], dtype=torch.long)
            keys, values = torch.cat([kx[idx, bi], kc[:, bi]]), torch.cat([vx[idx, bi], vc[:, bi]])
            valid = torch.cat([video_valid[bi, idx], text_valid[bi]])
            torch.testing.assert_close(ox[idx, bi], attend(qx[idx, bi], keys, values, valid))
            text_sum += attend(qc[:, bi], keys, values, valid)
        torch.testing.assert_close(oc[:, bi], text_sum / k)
