"""The BERT text encoder and its tokenizer against transformers (the test-only reference): tiny random
checkpoints in every layout the converter accepts, fp32 hidden states within 1e-4, identical token ids."""

import json
import re

import pytest
import torch

import medmoe
from medmoe import contrastive as C
from medmoe import convert

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# a Bio_ClinicalBERT-like cased vocabulary in miniature, with '##' pieces for medical words
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-", "(", ")", "the", "a", "no", "is", "of", "and", "there",
         "left", "right", "small", "acute", "pleural", "eff", "##usion", "pneu", "##mo", "##thorax", "##nia", "card", "##io",
         "##megaly", "lung", "##s", "are", "clear", "heart", "size", "normal", "with", "mild", "b", "##ase", "##ilar", "at",
         "##ele", "##cta", "##sis", "caf", "##e", "The", "Heart", "CT", "No", "L", "##eft"]
CAPTIONS = ["The heart size is normal.", "Small left pleural effusion with bibasilar atelectasis",
            "No pneumothorax, no pneumonia; lungs are clear (CT) café",
            "Mild cardiomegaly and left effusion and right effusion and no acute pneumothorax at the left lung base."]
SMALL = dict(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, initializer_range=0.2)


def write_vocab(path, tokenizer_config=None):
    path.mkdir(exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, len(VOCAB), (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    return ids, mask, torch.tensor([[0] * 6 + [1] * 6, [0] * 12, [0] * 12])


def assert_hidden_states_match(ours, ref_bert):
    """Every hidden state (embeddings and each layer) and last_hidden_state, at the non-padded positions."""
    ids, mask, types = padded_batch()
    with torch.no_grad():
        want = ref_bert(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        got = ours.hidden_states(ids, mask, types)
    assert len(got) == len(want.hidden_states) == SMALL["num_hidden_layers"] + 1
    keep = mask.bool()
    diffs = [(g - w)[keep].abs().max().item() for g, w in zip(got, want.hidden_states)]
    diffs.append((got[-1] - want.last_hidden_state)[keep].abs().max().item())
    assert max(diffs) <= TOL, diffs
    return max(diffs)


def test_bert_model_hidden_states(tmp_path):
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()  # with its pooler, which we drop
    ref.save_pretrained(tmp_path)
    ours = convert.load_hf_bert(str(tmp_path))
    assert not any(p.requires_grad for p in ours.parameters())  # frozen (spec)
    assert_hidden_states_match(ours, ref)


def test_masked_lm_checkpoint(tmp_path):
    torch.manual_seed(1)
    ref = transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)).eval()
    ref.save_pretrained(tmp_path)
    assert_hidden_states_match(convert.load_hf_bert(str(tmp_path)), ref.bert)


def test_tf_era_pretraining_checkpoint(tmp_path):
    """As Bio_ClinicalBERT ships: BertForPreTraining in pytorch_model.bin, a config without model_type;
    LayerNorm saved as gamma/beta (older conversions from TensorFlow)."""
    torch.manual_seed(2)
    ref = transformers.BertForPreTraining(transformers.BertConfig(**SMALL)).eval()
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "hidden_act": "gelu", "type_vocab_size": 2}))
    assert_hidden_states_match(convert.load_hf_bert(str(tmp_path)), ref.bert)


def test_unknown_and_missing_tensors_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**SMALL)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(medmoe.MedMoEError, match=re.escape("unexpected tensor 'encoder.layer.0.attention.self.rotary.weight'")) as e:
        convert.load_hf_bert(str(tmp_path))
    assert "\n" not in str(e.value)
    save_file({k: v for k, v in tensors.items() if "layer.2.output.dense.weight" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(medmoe.MedMoEError, match=re.escape("missing tensor 'layers.2.ffn.down_proj.weight'")):
        convert.load_hf_bert(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "model_type": "roberta"}))
    with pytest.raises(medmoe.MedMoEError, match="not bert"):
        convert.load_hf_bert(str(tmp_path))


@pytest.mark.parametrize("lowercase", [True, False])
def test_tokenizer_from_vocab_matches_transformers(tmp_path, lowercase):
    """No tokenizer_config.json (as Bio_ClinicalBERT): lowercased, as transformers does; or do_lower_case false."""
    d = write_vocab(tmp_path / "tok", None if lowercase else {"do_lower_case": False})
    ref = transformers.BertTokenizer.from_pretrained(str(d))
    assert ref.do_lower_case == lowercase
    want = ref(CAPTIONS, truncation=True, max_length=25, padding="longest")
    ids, mask, pieces = C.encode_captions(C.load_wordpiece(str(d)), CAPTIONS)
    assert ids.tolist() == want["input_ids"]
    assert mask.long().tolist() == want["attention_mask"]
    assert ids.shape[1] == 25  # the long caption is cut to 25 pieces, [SEP] last
    assert ids[3, -1].item() == VOCAB.index("[SEP]")
    want_pieces = [[VOCAB[i].startswith("##") for i in row] for row in want["input_ids"]]
    assert pieces.tolist() == want_pieces and pieces.any()
    # the same tokenizer saved as tokenizer.json (what transformers writes) loads to the same ids
    ref.save_pretrained(str(tmp_path / "json"))
    assert C.encode_captions(C.load_wordpiece(str(tmp_path / "json")), CAPTIONS)[0].tolist() == want["input_ids"]


def test_gloria_readout_on_transformers_hidden_states(tmp_path):
    """End to end: tokens -> our encoder -> words equal the word-piece sums of transformers' last 4 layers."""
    torch.manual_seed(3)
    ref = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    ref.save_pretrained(tmp_path / "bert")
    ours = convert.load_hf_bert(str(tmp_path / "bert"))
    ids, mask, pieces = C.encode_captions(C.load_wordpiece(str(write_vocab(tmp_path / "bert"))), CAPTIONS)
    with torch.no_grad():
        words, word_mask, sentence = ours(ids, mask, pieces)
        h = sum(ref(ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-4:])
    for b in range(len(CAPTIONS)):
        tokens = [VOCAB[i] for i in ids[b][mask[b]]]
        spans, start = [], 0  # word spans from the token strings: a '##' piece extends the current word
        for t in range(1, len(tokens) + 1):
            if t == len(tokens) or not tokens[t].startswith("##"):
                spans.append((start, t))
                start = t
        want = torch.stack([h[b, s:e].sum(0) for s, e in spans])
        assert (words[b, :len(spans)] - want).abs().max().item() <= TOL
        assert int(word_mask[b].sum()) == len(spans) - 1  # all words but [SEP]
        assert (sentence[b] - want.mean(0)).abs().max().item() <= TOL
