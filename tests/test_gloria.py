"""GLoRIA's text readout and losses against hand-computed values and a literal per-caption
transcription of GLoRIA's published algorithm (gloria/loss/gloria_loss.py, models/text_model.py)."""

import math

import pytest
import torch

from medmoe import contrastive as C

# ----------------------------------------------------------------------------- words from word pieces


def test_aggregate_words_hand_case():
    """[CLS] pneu ##mo ##thorax is seen [SEP] [PAD]  and  [CLS] card ##io ##megaly [SEP] [PAD] [PAD] [PAD]."""
    h = torch.tensor([[[1.0, 0], [2, 0], [3, 0], [4, 0], [5, 0], [6, 0], [7, 0], [99, 99]],
                      [[0, 1.0], [0, 2], [0, 3], [0, 4], [0, 5], [99, 99], [99, 99], [99, 99]]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    pieces = torch.tensor([[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    words, num_words = C.aggregate_words(h, valid, pieces)
    assert num_words.tolist() == [5, 3]
    assert words[0].tolist() == [[1, 0], [2 + 3 + 4, 0], [5, 0], [6, 0], [7, 0], [0, 0], [0, 0], [0, 0]]
    assert words[1].tolist() == [[0, 1], [0, 2 + 3 + 4], [0, 5], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]]


def gloria_words_literal(h, tokens):
    """GLoRIA's aggregate_tokens and cap_lens, step by step, on token strings, for one caption."""
    words, names, bank, bank_names = [], [], [], []
    for emb, tok in zip(h, tokens):
        if tok == "[SEP]":
            words.append(torch.stack(bank).sum(0))
            names.append("".join(bank_names))
            words.append(emb)
            names.append(tok)
            break
        if tok.startswith("##"):
            bank.append(emb)
            bank_names.append(tok[2:])
        else:
            if bank:
                words.append(torch.stack(bank).sum(0))
                names.append("".join(bank_names))
            bank, bank_names = [emb], [tok]
    cap_len = len([w for w in names if not w.startswith("[")]) + 1
    return torch.stack(words), cap_len


def test_text_encoder_readout_matches_gloria():
    """Last 4 layers summed, pieces summed into words, [CLS] + words for the local loss, mean for the sentence."""
    torch.manual_seed(0)
    cfg = C.TextConfig(vocab_size=20, hidden_size=16, num_layers=5, num_heads=2, intermediate_size=32, max_positions=16)
    enc = C.TextEncoder(cfg).eval()
    tokens = [["[CLS]", "pneu", "##mo", "##thorax", "is", "seen", "[SEP]", "[PAD]", "[PAD]"],
              ["[CLS]", "mild", "card", "##io", "##megaly", "and", "eff", "##usion", "[SEP]"],
              ["[CLS]", "normal", "[SEP]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]", "[PAD]"]]
    vocab = {t: i for i, t in enumerate(sorted({t for row in tokens for t in row}))}
    ids = torch.tensor([[vocab[t] for t in row] for row in tokens])
    mask = ids != vocab["[PAD]"]
    pieces = torch.tensor([[t.startswith("##") for t in row] for row in tokens])
    with torch.no_grad():
        words, word_mask, sentence = enc(ids, mask, pieces)
        h = sum(enc.hidden_states(ids, mask)[-4:])
    for b, row in enumerate(tokens):
        want, cap_len = gloria_words_literal(h[b], row)
        n = len(want)
        torch.testing.assert_close(words[b, :n], want, rtol=0, atol=1e-5)
        assert words[b, n:].abs().max().item() == 0
        assert word_mask[b].tolist() == [w < cap_len for w in range(len(row))]
        # GLoRIA: mean over the padded slots; ours: over the words. Same direction, scaled by T / n.
        gloria_sentence = torch.cat([want, want.new_zeros(len(row) - n, want.shape[1])]).mean(0)
        torch.testing.assert_close(sentence[b], gloria_sentence * len(row) / n, rtol=1e-5, atol=1e-5)
    assert [int(m.sum()) for m in word_mask] == [4, 5, 2]  # [CLS] + 3 words, [CLS] + 4 words, [CLS] + 1 word


# ----------------------------------------------------------------------------- global loss


def cross_entropy_rows(scores):
    """mean over rows i of -log softmax(row i)[i], in plain Python."""
    return sum(math.log(sum(math.exp(v) for v in row)) - row[i] for i, row in enumerate(scores)) / len(scores)


def test_global_loss_2x2_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cos: img0-txt0 1, img0-txt1 1/sqrt2, img1-txt0 0, img1-txt1 1/sqrt2
    r = 10 / math.sqrt(2)
    i2t = (math.log(1 + math.exp(r - 10)) + math.log(1 + math.exp(0 - r))) / 2
    t2i = (math.log(1 + math.exp(0 - 10)) + math.log(2)) / 2
    got = C.global_loss(img, txt, temp=10.0)
    assert got[0].item() == pytest.approx(i2t, rel=1e-6)
    assert got[1].item() == pytest.approx(t2i, rel=1e-6)


def test_global_loss_3x3_explicit_loops():
    img = [[1.0, 2.0, 0.5], [-1.0, 0.3, 2.0], [0.2, -0.7, 1.1]]
    txt = [[0.9, 1.5, 0.0], [-0.5, 0.1, 1.0], [2.0, -1.0, 0.3]]
    norm = lambda v: math.sqrt(sum(x * x for x in v))
    cos = [[sum(a * b for a, b in zip(u, v)) / (norm(u) * norm(v)) for v in txt] for u in img]
    scores = [[10 * c for c in row] for row in cos]
    want_i2t = cross_entropy_rows(scores)
    want_t2i = cross_entropy_rows([list(col) for col in zip(*scores)])
    i2t, t2i = C.global_loss(torch.tensor(img, dtype=torch.float64), torch.tensor(txt, dtype=torch.float64))
    assert i2t.item() == pytest.approx(want_i2t, rel=1e-12)
    assert t2i.item() == pytest.approx(want_t2i, rel=1e-12)
    assert want_i2t != pytest.approx(want_t2i)  # the two directions really differ here
    # cosine similarity: rescaling any embedding changes nothing
    scaled = C.global_loss(torch.tensor(img, dtype=torch.float64) * torch.tensor([[3.0], [0.1], [7.0]], dtype=torch.float64),
                           torch.tensor(txt, dtype=torch.float64) * 5)
    assert scaled[0].item() == pytest.approx(want_i2t, rel=1e-12)


# ----------------------------------------------------------------------------- local loss


def gloria_local_literal(img_features, words_emb, cap_lens, temp1=4.0, temp2=5.0, temp3=10.0):
    """GLoRIA's local_loss transcribed step by step: img_features [B, D, H, W], words_emb [B, D, W]."""
    B = img_features.shape[0]
    columns = []
    for i in range(B):  # one caption against every image
        n = cap_lens[i]
        word = words_emb[i, :, :n].unsqueeze(0).repeat(B, 1, 1)  # [B, D, n]
        context = img_features.reshape(B, img_features.shape[1], -1)  # [B, D, S]
        attn = torch.bmm(context.transpose(1, 2), word)  # [B, S, n]
        attn = torch.softmax(attn, dim=-1)  # over the words, for each region
        attn = torch.softmax(attn.transpose(1, 2) * temp1, dim=-1)  # over the regions, for each word: [B, n, S]
        weighted = torch.bmm(context, attn.transpose(1, 2))  # [B, D, n]
        w, c = word.transpose(1, 2).reshape(B * n, -1), weighted.transpose(1, 2).reshape(B * n, -1)
        sim = (w * c).sum(1) / (w.norm(dim=1) * c.norm(dim=1)).clamp(min=1e-8)
        sim = torch.exp(sim.view(B, n) * temp2).sum(dim=1, keepdim=True).log()  # [B images, 1]
        columns.append(sim)
    sims = torch.cat(columns, 1) * temp3  # [images, captions]
    labels = torch.arange(B)
    return torch.nn.functional.cross_entropy(sims, labels), torch.nn.functional.cross_entropy(sims.T, labels)


def local_case(seed=0, B=3, D=8, H=3, W=4, max_words=6):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    words = torch.randn(B, max_words, D, generator=g, dtype=torch.float64)
    cap_lens = [4, 6, 2][:B]
    mask = torch.arange(max_words)[None] < torch.tensor(cap_lens)[:, None]
    return img, words, cap_lens, mask


def test_local_loss_matches_literal_gloria_loop():
    img, words, cap_lens, mask = local_case()
    want = gloria_local_literal(img, words.transpose(1, 2), cap_lens)
    regions = img.flatten(2).transpose(1, 2)  # [B, H*W, D]
    got = C.local_loss(regions, words, mask)
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w.item(), rel=1e-10)
    assert got[0].item() != pytest.approx(got[1].item())
    # other temperatures go to the right places
    want = gloria_local_literal(img, words.transpose(1, 2), cap_lens, temp1=2.0, temp2=3.0, temp3=7.0)
    got = C.local_loss(regions, words, mask, temp1=2.0, temp2=3.0, temp3=7.0)
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w.item(), rel=1e-10)


def test_padding_words_change_nothing():
    img, words, _, mask = local_case(seed=1)
    regions = img.flatten(2).transpose(1, 2)
    base = C.local_loss(regions, words, mask)
    garbage = torch.where(mask[..., None], words, 1e3 * torch.randn_like(words))
    wider = torch.cat([garbage, torch.randn(3, 5, 8, dtype=torch.float64)], 1)  # 5 more padding slots
    wider_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    for got in (C.local_loss(regions, garbage, mask), C.local_loss(regions, wider, wider_mask)):
        for g, b in zip(got, base):
            assert g.item() == pytest.approx(b.item(), rel=1e-12)


def test_gradients_flow_and_skip_padding():
    img, words, _, mask = local_case(seed=2)
    regions = img.flatten(2).transpose(1, 2).float().requires_grad_()
    words = (words * mask[..., None]).float().requires_grad_()  # zero padding words, as aggregate_words leaves them
    img_emb = torch.randn(3, 8, requires_grad=True)
    sentence = torch.randn(3, 8, requires_grad=True)
    loss = C.gloria_loss(regions, img_emb, words, mask, sentence)
    loss.backward()
    for t in (regions, words, img_emb, sentence):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert words.grad[~mask].abs().max().item() == 0
    l0, l1 = C.local_loss(regions, words, mask)
    g0, g1 = C.global_loss(img_emb, sentence)
    assert loss.item() == pytest.approx(0.5 * (l0 + l1).item() + 0.5 * (g0 + g1).item(), rel=1e-6)
    assert (C.TEMP1, C.TEMP2, C.TEMP3) == (4.0, 5.0, 10.0)
    assert (C.LOCAL_WEIGHT, C.GLOBAL_WEIGHT, C.AUX_WEIGHT) == (0.5, 0.5, 2.0)
