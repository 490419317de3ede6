"""MedMoE (Chopra et al. 2025, arXiv 2506.08356) in one file: a contrastive image-text model whose
image side routes a Swin feature pyramid through modality-specialised expert branches.

Read top to bottom, it follows the data through the paper's Figure 2:
  pixels -> Swin backbone (Liu et al. 2021): patch embedding -> 4 stages of window attention
  (W-MSA and shifted SW-MSA alternating), patch merging between them -> hidden states 0..3 are
  the pyramid (56x56x96, 28x28x192, 14x14x384, 7x7x768 for Swin-T at 224 px)
  -> router (an MLP on the pooled final features, image only) picks ONE modality expert
  -> that expert fuses the pyramid into local features on the finest grid; their mean is the
  global image embedding
  caption -> BERT (Bio_ClinicalBERT) -> word pieces summed into words (last 4 layers summed)
  -> GLoRIA's local (word-to-region) and global losses + the router's modality cross-entropy.
The last parts load and save our checkpoints and use the model (zero-shot classification);
Hugging Face SwinModel / BertModel weights come in through convert.py, and match transformers
number for number (tests/test_swin_parity.py, test_bert_parity.py).

Reference code read for the semantics (facts only): GLoRIA, github.com/marshuang80/gloria, and
the MedMoE authors' release, github.com/shivangchopra11/MedMoE (src/models/components/swin.py,
text_encoder.py, src/losses.py, configs/model/med-moe*.yaml).
"""

import os
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import medmoe
from medmoe import Attention, FeedForward, data, kernels
from medmoe.files import MedMoEError, from_json, read_json, read_safetensors

KIND = "medmoe-contrastive"  # config.json's marker: a MedMoE (Swin + experts + BERT) checkpoint

# GLoRIA's temperatures (the spec: "temperatures 4, 5, 10"; global cosine similarity x 10)
TEMP1 = 4.0  # sharpens the word-to-region attention
TEMP2 = 5.0  # scales each word's similarity to its attended image context
TEMP3 = 10.0  # logit scale of both the local and the global InfoNCE
# total = 0.5 local + 0.5 global (+ 2.0 aux, added by the model); local and global are each the sum of
# both directions, as GLoRIA's calc_loss and MedMoE's configs/model/med-moe_pretraining.yaml weigh them
LOCAL_WEIGHT = 0.5
GLOBAL_WEIGHT = 0.5
AUX_WEIGHT = 2.0
# zero-shot classification: each class is the mean of these prompts' embeddings (a prompt ensemble)
PROMPTS = ("{}", "a {} image", "an image from a {}", "a {} of the body")


# ----------------------------------------------------------------------------- configs


@dataclass
class SwinConfig:
    """Defaults are Swin-T (microsoft/swin-tiny-patch4-window7-224) at 224 px."""

    image_size: int = 224  # what the preprocessing resizes to; the model itself takes any size
    patch_size: int = 4
    in_channels: int = 3
    embed_dim: int = 96  # channels of stage 1; each patch merging doubles them
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-5  # blocks and the final norm (HF's layer_norm_eps; its other norms keep 1e-5)
    mean: tuple = (0.485, 0.456, 0.406)  # ImageNet
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self):
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)  # JSON gives lists
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def num_features(self):
        return self.embed_dim * 2 ** (len(self.depths) - 1)


@dataclass
class TextConfig:
    """BERT-base as Bio_ClinicalBERT ships it (cased BioBERT vocabulary of 28996 word pieces)."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    act: str = "gelu"  # BERT's exact (erf) GELU
    max_tokens: int = 25  # captions are truncated to 25 word pieces, [CLS] and [SEP] included (spec)
    last_layers: int = 4  # word features = sum of the last 4 hidden states (GLoRIA last_n_layers, 'sum')


@dataclass
class ContrastiveConfig:
    """MedMoE: a Swin backbone, one expert branch per modality and a router, against a BERT text encoder."""

    swin: SwinConfig = field(default_factory=SwinConfig)
    text: TextConfig = field(default_factory=TextConfig)
    modalities: tuple = ("xray", "ct", "mri", "ultrasound", "pathology", "fundus")  # one expert each (the authors' code: 6)
    levels: int = 4  # the pyramid: Swin hidden states 0..3
    router_hidden: int = 128
    regions: int = 16  # side of the region grid the local loss attends over (see ContrastiveMedMoE.regions)
    kind: str = KIND

    def __post_init__(self):
        self.modalities = tuple(self.modalities)

    def to_dict(self):
        return asdict(self)


# Shapes for models trained from scratch on a CPU (no pretrained Swin or BERT offline): the tests
# and bench/contrastive_shared.py. vocab: the size their tokenizer is trained to.
PRESETS = {
    "tiny": dict(image=64, embed=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=4, text=64, text_layers=2, vocab=1000),
    "small": dict(image=96, embed=48, depths=(2, 2, 4, 2), heads=(2, 4, 8, 16), window=6, text=128, text_layers=4, vocab=2000),
}


def preset_config(name, modalities):
    """A Swin and a BERT at a preset's shapes; its vocab_size is the preset's until a tokenizer is trained."""
    if name not in PRESETS:
        raise MedMoEError(f"unknown preset {name!r} (choose {', '.join(PRESETS)})")
    p = PRESETS[name]
    swin = SwinConfig(image_size=p["image"], embed_dim=p["embed"], depths=p["depths"], num_heads=p["heads"], window_size=p["window"])
    text = TextConfig(vocab_size=p["vocab"], hidden_size=p["text"], num_layers=p["text_layers"], num_heads=max(1, p["text"] // 64),
                      intermediate_size=p["text"] * 4, max_positions=64)
    return ContrastiveConfig(swin=swin, text=text, modalities=tuple(modalities))


# ----------------------------------------------------------------------------- Swin backbone


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> embed_dim tokens, then LayerNorm."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim)  # HF leaves this one at the default eps

    def forward(self, pixels):
        """[B, 3, H, W] -> ([B, h*w, C], (h, w)). A side that is not a multiple of the patch is
        zero-padded at the bottom/right, so a partial patch still makes a token (as HF does)."""
        H, W = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, -W % self.patch_size, 0, -H % self.patch_size))
        x = self.proj(pixels)
        return self.norm(x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


def window_partition(x, window):
    """[B, H, W, C] -> [B * windows, window * window, C]; windows in row-major order, batch-major."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).transpose(2, 3)
    return x.reshape(-1, window * window, C)


def window_reverse(windows, window, H, W):
    """Inverse of window_partition: [B * windows, window * window, C] -> [B, H, W, C]."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C).transpose(2, 3)
    return x.reshape(-1, H, W, C)


def relative_position_index(window, device=None):
    """[w, w, w, w] long: entry (i, j, k, l) is the row of the bias table holding the offset
    (i - k, j - l) from key (k, l) to query (i, j); offsets run over [-(w-1), w-1] on each axis,
    so the table has (2w - 1)^2 rows (paper Sec. 3.2)."""
    r = torch.arange(window, device=device)
    dh = r[:, None, None, None] - r[None, None, :, None]
    dw = r[None, :, None, None] - r[None, None, None, :]
    return (dh + window - 1) * (2 * window - 1) + (dw + window - 1)


class RelativePositionBias(nn.Module):
    """B in softmax(QK^T / sqrt(d) + B): one learned scalar per head and relative offset."""

    def __init__(self, num_heads, window):
        super().__init__()
        self.window = window
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.reset_buffers()

    def reset_buffers(self, device=None):
        # a function of the window alone: built, never stored in a checkpoint
        self.register_buffer("index", relative_position_index(self.window, device), persistent=False)

    def forward(self, window):
        """[heads, N, N] for a window x window window (N = window^2). A window clamped below the
        configured one (a stage smaller than the window) sees only the smaller offsets, and reads
        them from the same table; HF cannot run that case (its bias keeps the configured size)."""
        N = window * window
        index = self.index[:window, :window, :window, :window].reshape(N, N)
        return self.table[index].permute(2, 0, 1)


def shift_mask(H, W, window, shift, dtype, device=None):
    """[windows, N, N] additive mask for shifted-window attention (paper Sec. 3.2, Fig. 4).
    After the cyclic shift, a window at the bottom/right edge holds tokens from up to 3x3
    regions that are not neighbours in the image; each token attends only within its region.
    -100 rather than -inf, as in the paper's code and HF: exp(-100) is 0 in fp32 anyway."""

    def regions(n):  # 0: [0, n - window), 1: [n - window, n - shift), 2: [n - shift, n)
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    label = regions(H)[:, None] * 3 + regions(W)[None, :]
    label = window_partition(label[None, :, :, None], window).squeeze(-1)  # [windows, N]
    same = label[:, :, None] == label[:, None, :]
    return torch.where(same, 0.0, -100.0).to(dtype)


class SwinBlock(nn.Module):
    """x + (S)W-MSA(LN(x)), then x + MLP(LN(x)) (paper Eq. 3)."""

    def __init__(self, cfg: SwinConfig, dim, num_heads):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, num_heads, num_heads, dim // num_heads, cfg.qkv_bias, True)
        self.position_bias = RelativePositionBias(num_heads, cfg.window_size)
        self.ffn_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(dim, int(cfg.mlp_ratio * dim), cfg.act, gated=False, bias=True)

    def forward(self, x, size, window, shift, mask):
        """x [B, H*W, C] on an H x W grid; mask: shift_mask for this shift, or None when 0."""
        (H, W), (B, _, C) = size, x.shape
        h = self.attn_norm(x).view(B, H, W, C)
        # pad to whole windows: the zero tokens are attended to (not masked), as in HF and the paper's code
        h = F.pad(h, (0, 0, 0, -W % window, 0, -H % window))
        Hp, Wp = h.shape[1:3]
        h = torch.roll(h, (-shift, -shift), (1, 2))  # cyclic shift toward the top-left (Fig. 4)
        bias = self.position_bias(window)
        if mask is not None:  # windows are batch-major: repeat the per-window mask for each image
            bias = (bias + mask[:, None]).repeat(B, 1, 1, 1)
        h = self.attn(window_partition(h, window), mask=bias)
        h = torch.roll(window_reverse(h, window, Hp, Wp), (shift, shift), (1, 2))
        x = x + h[:, :H, :W].reshape(B, H * W, C)
        return x + self.ffn(self.ffn_norm(x))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens -> one: concatenate (4C), LayerNorm, linear to 2C (paper Sec. 3.1)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)  # HF leaves this one at the default eps
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, size):
        (H, W), (B, _, C) = size, x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))  # odd side: a zero row/column
        # the order of the paper's code and HF: top-left, bottom-left, top-right, bottom-right
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(B, -1, 4 * C))), ((H + 1) // 2, (W + 1) // 2)


class Stage(nn.Module):
    """depth blocks alternating W-MSA and SW-MSA, then a patch merging (all stages but the last)."""

    def __init__(self, cfg: SwinConfig, i):
        super().__init__()
        dim = cfg.embed_dim * 2**i
        self.window_size = cfg.window_size
        self.blocks = nn.ModuleList(SwinBlock(cfg, dim, cfg.num_heads[i]) for _ in range(cfg.depths[i]))
        self.merge = PatchMerging(dim) if i < len(cfg.depths) - 1 else None

    def forward(self, x, size):
        H, W = size
        # HF's set_shift_and_window_size: when the shorter side fits in one window (Swin-T's 7x7
        # last stage), the window shrinks to that side and nothing is shifted
        fits = min(H, W) <= self.window_size
        window = min(H, W) if fits else self.window_size
        shift = 0 if fits else self.window_size // 2
        mask = shift_mask(H + (-H % window), W + (-W % window), window, shift, x.dtype, x.device) if shift else None
        for i, block in enumerate(self.blocks):
            odd = i % 2 == 1  # the odd blocks are the shifted ones (Fig. 3b)
            x = block(x, size, window, shift if odd else 0, mask if odd else None)
        return self.merge(x, size) if self.merge is not None else (x, size)


class SwinOutput(NamedTuple):
    hidden_states: list  # [B, h*w, C] each: the patch embedding, then every stage's output (after its merging)
    last_hidden_state: torch.Tensor  # [B, h*w, num_features]: last stage's output, after the final LayerNorm
    pooled: torch.Tensor  # [B, num_features]: average of last_hidden_state over tokens (HF's pooler_output)
    sizes: list  # (h, w) of each hidden state, to view it as a [B, h, w, C] map


class Swin(nn.Module):
    """The backbone: hidden_states and outputs as HF's SwinModel(output_hidden_states=True)."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.stages = nn.ModuleList(Stage(cfg, i) for i in range(len(cfg.depths)))
        self.norm = nn.LayerNorm(cfg.num_features, eps=cfg.norm_eps)

    def forward(self, pixels):
        """pixels: [B, 3, H, W] normalised with cfg.mean/std; any H, W (padded as needed)."""
        x, size = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))
        hidden_states, sizes = [x], [size]
        for stage in self.stages:
            x, size = stage(x, size)
            hidden_states.append(x)
            sizes.append(size)
        x = self.norm(x)
        return SwinOutput(hidden_states, x, x.mean(dim=1), sizes)


# ----------------------------------------------------------------------------- modality experts and router


class Expert(nn.Module):
    """One modality's branch over the Swin pyramid (SPEC B): per scale a 1x1 projection to `width`
    + ReLU, every scale upsampled to the finest grid, a per-token scale-attention MLP
    (width -> width/2 -> 1) with a softmax over the scales, and the weighted sum of the scales.
    (The authors' code upsamples the flattened token sequence with 1-D linear interpolation, which
    mixes the end of one row with the start of the next; here each scale is upsampled as the 2-D
    map it is.)"""

    def __init__(self, channels, width):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(c, width) for c in channels)  # a 1x1 convolution on tokens
        self.scale_attn = nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, 1))

    def forward(self, pyramid, sizes):
        """pyramid: [B, h_s * w_s, C_s] per scale -> local features [B, H * W, width] on the finest grid (H, W)."""
        H, W = sizes[0]
        scales = []
        for x, (h, w), proj in zip(pyramid, sizes, self.proj):
            x = F.relu(proj(x)).transpose(1, 2).unflatten(2, (h, w))  # [B, width, h, w]
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False) if (h, w) != (H, W) else x
            scales.append(x.flatten(2).transpose(1, 2))
        scales = torch.stack(scales, dim=2)  # [B, H*W, S, width]
        weights = self.scale_attn(scales).softmax(dim=2)  # each token chooses its own mix of scales
        return (weights * scales).sum(dim=2)


class Router(nn.Module):
    """Image-only modality classifier on the pooled final Swin features: MLP 768 -> 128 -> K
    (SPEC B). No label or text is needed at inference; trained only by the auxiliary cross-entropy."""

    def __init__(self, dim, hidden, num_experts):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, num_experts)

    def forward(self, pooled):
        return self.fc2(F.relu(self.fc1(pooled)))


# ----------------------------------------------------------------------------- BERT text encoder


class TextBlock(nn.Module):
    """Post-LN transformer layer (BERT): normalise after each residual sum, not before."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn = Attention(d, cfg.num_heads, cfg.num_heads, d // cfg.num_heads, True, True)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ffn = FeedForward(d, cfg.intermediate_size, cfg.act, gated=False, bias=True)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)

    def forward(self, x, mask):
        x = self.attn_norm(x + self.attn(x, mask=mask))
        return self.ffn_norm(x + self.ffn(x))


class TextEncoder(nn.Module):
    """BERT encoder (no pooler: GLoRIA reads hidden states only) plus GLoRIA's word/sentence readout.
    No dropout: the spec freezes the text encoder, so it only ever runs as in evaluation."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.pos_embed = nn.Embedding(cfg.max_positions, d)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.num_layers))

    def hidden_states(self, ids, attention_mask=None, token_type_ids=None):
        """num_layers + 1 tensors [B, T, D]: the embeddings, then each layer's output (HF's hidden_states)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.embed_norm(self.tok_embed(ids) + self.pos_embed(positions) + self.type_embed(types))
        # padding keys are masked out (True = attend); padding queries still compute, and are ignored later
        mask = "full" if attention_mask is None else attention_mask.bool()[:, None, None, :]
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return states

    def forward(self, ids, attention_mask, pieces):
        """ids, attention_mask, pieces: [B, T] from `encode_captions` (pieces: True at '##' word pieces).
        Returns words [B, T, D] (word w of caption b at [b, w], zeros past its last word), word_mask [B, T]
        (the words GLoRIA's local loss uses) and sentence [B, D]."""
        h = sum(self.hidden_states(ids, attention_mask)[-self.cfg.last_layers:])
        # GLoRIA sums the layers after aggregating words; both are sums, so the order does not matter
        words, num_words = aggregate_words(h, attention_mask.bool(), pieces)
        # GLoRIA's cap_lens (#words not starting with '[' + 1) keep [CLS] and the words, not [SEP]: slots
        # 0 .. num_words - 2. (GLoRIA also leaves out words such as '[UNK]' from that count, and then
        # cuts the caption's *last* word instead; we drop only [SEP], the intent of its code.)
        word_mask = torch.arange(h.shape[1], device=h.device) < (num_words - 1)[:, None]
        # Spec: "sentence = mean over words", [CLS] and [SEP] included as in GLoRIA. GLoRIA divides by the
        # padded length instead of the word count: a per-caption scale that the cosine of the global loss ignores.
        sentence = words.sum(1) / num_words[:, None].to(h.dtype)
        return words, word_mask, sentence


def aggregate_words(h, valid, pieces):
    """GLoRIA's aggregate_tokens, vectorised: a '##' piece is added to the word before it, any other
    token ([CLS] and [SEP] included) starts a word; tokens past [SEP] (padding) are dropped.
    h [B, T, D], valid and pieces [B, T] bool -> (words [B, T, D], num_words [B])."""
    starts = valid & ~pieces
    word = (starts.cumsum(1) - 1).clamp(min=0)  # index of the word each token belongs to
    h = h.masked_fill(~valid[..., None], 0)
    words = h.new_zeros(h.shape).scatter_add(1, word[..., None].expand_as(h), h)
    return words, starts.sum(1)


# ----------------------------------------------------------------------------- the model


class ImageFeatures(NamedTuple):
    local: torch.Tensor  # [B, H*W, D]: the chosen expert's fused pyramid on the finest grid
    grid: tuple  # (H, W)
    embedding: torch.Tensor  # [B, D]: the mean of the local features (SPEC B: "global = their mean")
    router_logits: torch.Tensor  # [B, K]
    expert: torch.Tensor  # [B]: the expert each image went through


class ContrastiveMedMoE(nn.Module):
    """MedMoE's Figure 2: Swin pyramid -> router picks one modality expert per image -> local and
    global image features, contrasted with BERT's word and sentence features (GLoRIA)."""

    unused_parameters = True  # in a batch, the experts no image chose get no gradient (the trainer tells DDP)

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        self.cfg = cfg
        self.swin = Swin(cfg.swin)
        channels = [cfg.swin.embed_dim * 2**i for i in range(cfg.levels)]  # hidden state i has embed_dim * 2^i channels
        self.router = Router(cfg.swin.num_features, cfg.router_hidden, len(cfg.modalities))
        self.experts = nn.ModuleList(Expert(channels, cfg.text.hidden_size) for _ in cfg.modalities)
        self.text = TextEncoder(cfg.text)

    def blocks(self):
        """The repeated blocks: what the trainer compiles (and shards) one by one."""
        return [block for stage in self.swin.stages for block in stage.blocks] + list(self.text.layers)

    def encode_image(self, pixels, expert=None):
        """expert: [B] modality index per image to use instead of the router's choice (training on
        labelled images; -1 where unlabelled). Only the chosen expert runs on each image."""
        out = self.swin(pixels)
        logits = self.router(out.pooled)
        chosen = logits.argmax(-1)  # hard top-1
        if expert is not None:
            chosen = torch.where(expert >= 0, expert, chosen)
        levels = self.cfg.levels
        local = kernels.dispatch_samples(self.experts, chosen, out.hidden_states[:levels], out.sizes[:levels])
        return ImageFeatures(local, out.sizes[0], local.mean(1), logits, chosen)

    def regions(self, img: ImageFeatures):
        """The local loss attends over `cfg.regions`^2 average-pooled regions, not every finest-grid
        token: the authors pool to 256 (16 x 16); the loss's memory grows with the region count."""
        x = img.local.transpose(1, 2).unflatten(2, img.grid)
        return F.adaptive_avg_pool2d(x, min(self.cfg.regions, *img.grid)).flatten(2).transpose(1, 2)

    def forward(self, pixels, ids, attention_mask, pieces, modality):
        """The training loss: GLoRIA's 0.5 local + 0.5 global, plus 2.0 x the router's cross-entropy
        on the modality labels (modality [B], -1 where unlabelled)."""
        img = self.encode_image(pixels, modality)
        words, word_mask, sentence = self.text(ids, attention_mask, pieces)
        loss = gloria_loss(self.regions(img), img.embedding, words, word_mask, sentence)
        if bool((modality >= 0).any()):
            loss = loss + AUX_WEIGHT * F.cross_entropy(img.router_logits.float(), modality, ignore_index=-1)
        return loss

    @torch.no_grad()
    def embed_texts(self, tokenizer, texts):
        """Sentence embeddings [N, D], unit length."""
        device = self.text.tok_embed.weight.device
        return F.normalize(self.text(*[t.to(device) for t in encode_captions(tokenizer, texts)])[2], dim=-1)


# ----------------------------------------------------------------------------- GLoRIA losses


def cosine(a, b, eps=1e-8):
    """GLoRIA's cosine similarity (last dim): the product of the norms is clamped, not each norm."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=eps)


def global_loss(img_emb, text_emb, temp=TEMP3):
    """Bidirectional InfoNCE on cosine similarity x temp (GLoRIA's global_loss).
    img_emb, text_emb [B, D], pair i = (image i, caption i). Returns (image->text, text->image)."""
    norms = img_emb.norm(dim=1)[:, None] * text_emb.norm(dim=1)[None]
    scores = img_emb @ text_emb.T / norms.clamp(min=1e-8) * temp  # [B images, B captions]
    labels = torch.arange(len(scores), device=scores.device)
    return F.cross_entropy(scores, labels), F.cross_entropy(scores.T, labels)


def local_scores(regions, words, word_mask, temp1=TEMP1, temp2=TEMP2):
    """log sum_w exp(temp2 * cos(word w, its attended context)) for every (caption i, image j): [B, B].
    GLoRIA computes one caption against all images at a time; here all pairs at once."""
    # attention_fn: dot products of the caption's words with the image's regions ...
    attn = torch.einsum("iwd,jnd->ijwn", words, regions)  # [captions, images, words, regions]
    # ... softmax over the caption's words first (for each region; padding words take no part) ...
    attn = attn.masked_fill(~word_mask[:, None, :, None], float("-inf")).softmax(dim=2)
    # ... then, sharpened by temp1, over the regions (for each word)
    attn = (attn * temp1).softmax(dim=3)
    context = torch.einsum("ijwn,jnd->ijwd", attn, regions)  # each word's attention-weighted region context
    sim = cosine(words[:, None], context) * temp2  # [captions, images, words]
    # GLoRIA: log(sum(exp(.))) over the caption's words ('sum' aggregation); logsumexp is that, stably
    return sim.masked_fill(~word_mask[:, None], float("-inf")).logsumexp(dim=-1)


def local_loss(regions, words, word_mask, temp1=TEMP1, temp2=TEMP2, temp3=TEMP3):
    """GLoRIA's local (word-to-region) contrastive loss. regions [B, N, D] (N image sub-regions),
    words [B, W, D], word_mask [B, W] (True at the words used). Returns (image->text, text->image).
    Memory grows as B^2 * W * N, as for GLoRIA's loop once autograd keeps every caption's graph."""
    scores = local_scores(regions, words, word_mask, temp1, temp2) * temp3  # [captions, images]
    labels = torch.arange(len(scores), device=scores.device)
    return F.cross_entropy(scores.T, labels), F.cross_entropy(scores, labels)


def gloria_loss(regions, img_emb, words, word_mask, sentence):
    """0.5 local + 0.5 global with each the sum of its two directions; the model adds 2.0 * aux."""
    local = sum(local_loss(regions, words, word_mask))
    return LOCAL_WEIGHT * local + GLOBAL_WEIGHT * sum(global_loss(img_emb, sentence))


# ----------------------------------------------------------------------------- weights: our checkpoints


def load_config(directory):
    path = os.path.join(directory, "config.json")
    d = read_json(path)
    if d.get("kind") != KIND:
        raise MedMoEError(f"{directory}: not a MedMoE contrastive checkpoint (make one with `medmoe init --kind contrastive` "
                          "or `medmoe convert --swin DIR --bert DIR`)")
    return from_json(ContrastiveConfig, d, path)


def load_model(directory, dtype=None, device="cpu"):
    """config.json + model.safetensors -> an eval-mode ContrastiveMedMoE (tensors memory-mapped)."""
    cfg = load_config(directory)
    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        raise MedMoEError(f"{directory}: missing weights file model.safetensors")
    with torch.device("meta"):
        model = ContrastiveMedMoE(cfg)
    load_tensors(model, medmoe.cast_tensors(read_safetensors(path), dtype), path)
    return model.to(device).eval()


def load_tensors(model, tensors, where):
    """Check (one line per problem) and load a complete state dict; rebuild the non-persistent buffers."""
    medmoe.check_tensors(model, tensors, where)
    model.load_state_dict(tensors, assign=True)
    medmoe.reset_buffers(model)
    return model


def save_model(model, directory, tokenizer_json=None):
    medmoe.save_checkpoint(model.cfg, model.state_dict(), directory, tokenizer_json)


# ----------------------------------------------------------------------------- tokenizers


def load_wordpiece(directory, max_tokens=TextConfig.max_tokens):
    """The BERT tokenizer of a directory: its tokenizer.json, else built from vocab.txt as transformers'
    BertTokenizer does (lowercasing unless tokenizer_config.json says do_lower_case: false; Bio_ClinicalBERT
    has no such file, so its captions are lowercased, as GLoRIA lowercases them too). Captions come out
    as [CLS] ... [SEP], truncated to max_tokens and padded to the longest in the batch (as MedMoE's release)."""
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        tok = Tokenizer.from_file(path)
    else:
        vocab_path = os.path.join(directory, "vocab.txt")
        if not os.path.isfile(vocab_path):
            raise MedMoEError(f"{directory}: no tokenizer.json or vocab.txt")
        with open(vocab_path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if special not in vocab:
                raise MedMoEError(f"{vocab_path}: no {special} token")
        tc = read_json(os.path.join(directory, "tokenizer_config.json"), required=False) or {}
        tok = bert_wordpiece(vocab, handle_chinese_chars=tc.get("tokenize_chinese_chars", True), strip_accents=tc.get("strip_accents"),
                             lowercase=tc.get("do_lower_case", True))
    pad = tok.token_to_id("[PAD]")
    if pad is None:
        raise MedMoEError(f"{directory}: the tokenizer has no [PAD] token")
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=pad, pad_token="[PAD]")
    return tok


def encode_captions(tokenizer, captions):
    """ids [B, T] int64, attention_mask [B, T] bool and pieces [B, T] bool (True at '##' word pieces,
    which GLoRIA adds into the word before them)."""
    enc = tokenizer.encode_batch(list(captions))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
    pieces = torch.tensor([[t.startswith("##") for t in e.tokens] for e in enc], dtype=torch.bool)
    return ids, mask, pieces


def init_model(out, captions, modalities, preset="tiny", seed=0):
    """A randomly initialised MedMoE at a preset's shapes (PRESETS) with a WordPiece vocabulary
    fitted to `captions`."""
    cfg = preset_config(preset, modalities)
    os.makedirs(out, exist_ok=True)
    tok = train_wordpiece(captions, cfg.text.vocab_size, os.path.join(out, "tokenizer.json"))
    cfg.text.vocab_size = tok.get_vocab_size()
    torch.manual_seed(seed)
    model = ContrastiveMedMoE(cfg)
    save_model(model, out)
    return model


def bert_wordpiece(vocab=None, **normalizer):
    """BERT's WordPiece pipeline (BertNormalizer with `normalizer` options, BertPreTokenizer, '##' pieces,
    [CLS] ... [SEP] around each caption); vocab None: an empty vocabulary, to be trained."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(**normalizer)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    if vocab is not None:
        add_cls_sep(tok)
    return tok


def add_cls_sep(tok):
    from tokenizers import processors

    specials = [(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=specials)


def train_wordpiece(texts, vocab_size, path):
    """A lowercasing BERT WordPiece tokenizer fitted to texts, saved to path."""
    from tokenizers import trainers

    tok = bert_wordpiece(lowercase=True)
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    add_cls_sep(tok)
    tok.save(path)
    return tok


# ----------------------------------------------------------------------------- using the model: zero-shot, router, linear probe


def labelled_images(paths, images=None, field="modality"):
    """(image paths, labels): each distinct image of VQA/LLaVA JSON(L) files with its `field` label
    (images without one are left out), or the images of folders of class subfolders."""
    pairs = {}
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if os.path.isdir(path):
            for c in sorted(os.listdir(path)):
                if os.path.isdir(os.path.join(path, c)):
                    pairs.update((os.path.join(path, c, f), c) for f in sorted(os.listdir(os.path.join(path, c))))
            continue
        for ex in data.load_examples(path, images):
            label = getattr(ex, field, None) or ex.extra.get(field)
            if ex.image and label:
                pairs.setdefault(ex.image, label)
    if not pairs:
        raise MedMoEError(f"{', '.join(map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths))}: "
                          f"no labelled images (label field {field!r})")
    return list(pairs), list(pairs.values())


@torch.no_grad()
def embed_images(model, paths, image_mode="pad", batch_size=32, progress=True):
    """Global image embeddings [N, D] and the expert each image was routed to [N]."""
    device = model.router.fc1.weight.device
    embeddings, experts = [], []
    for i in tqdm(range(0, len(paths), batch_size), desc="images", disable=not progress):
        pixels = torch.stack([data.load_pixels(p, model.cfg.swin, image_mode) for p in paths[i : i + batch_size]]).to(device)
        img = model.encode_image(pixels)
        embeddings.append(img.embedding.float().cpu())
        experts.append(img.expert.cpu())
    return torch.cat(embeddings), torch.cat(experts)


def class_names(labels):
    """How a zero-shot prompt names each class: modality labels in words ("xray" -> "x-ray")."""
    return [data.MODALITY_WORDS.get(label, label) for label in labels]


@torch.no_grad()
def zero_shot_scores(model, tokenizer, embeddings, labels, prompts=PROMPTS):
    """Zero-shot class probabilities [N, C] for image embeddings [N, D]: each class is a prompt ensemble
    (the mean of its prompts' unit sentence embeddings); softmax over cosine similarity x TEMP3."""
    classes = torch.stack([model.embed_texts(tokenizer, [p.format(name) for p in prompts]).mean(0) for name in class_names(labels)])
    return (F.normalize(embeddings, dim=-1) @ F.normalize(classes.cpu().float(), dim=-1).T * TEMP3).softmax(-1)


def classify(model, tokenizer, paths, names, truth, image_mode="pad", progress=False):
    """Zero-shot classification of images into `names`, with the expert each image was routed to.
    truth: each image's label or None; over the labelled ones, the zero-shot accuracy and (for
    labels that are the model's modalities) the router's. Returns ranked [(name, p), ...] per
    image, experts (modality names), and the accuracies with their counts (None: nothing to judge)."""
    embeddings, experts = embed_images(model, paths, image_mode, progress=progress)
    probs = zero_shot_scores(model, tokenizer, embeddings, names)
    routed_to = [model.cfg.modalities[int(e)] for e in experts]
    labelled = [i for i, t in enumerate(truth) if t is not None]
    routable = [i for i in labelled if truth[i] in model.cfg.modalities]
    share = lambda hits, among: sum(hits) / len(among) if among else None
    return {
        "ranked": [sorted(zip(names, p.tolist()), key=lambda kv: -kv[1]) for p in probs],
        "experts": routed_to,
        "accuracy": share([names[int(probs[i].argmax())] == truth[i] for i in labelled], labelled), "labelled": len(labelled),
        "router_accuracy": share([routed_to[i] == truth[i] for i in routable], routable), "routed": len(routable),
    }
