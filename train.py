"""Training Med-MoE in its three stages (SPEC: released scripts), and MedMoE contrastively, on
one process or many.

    stage 1      align      projector only                  template `plain`   lr 1e-3
    stage 2      instruct   LLM + projector                 chat template      lr 2e-5
                 then the router is fitted as a modality classifier on the FFN inputs
    stage 3      MoE        upcycle; experts + meta expert  chat template      lr 2e-5
                 (the stage-2 router loaded frozen into every MoE layer)
    contrastive  MedMoE     Swin + experts + router         image-caption pairs lr 5e-5, clip 0.25
                 (+ the text encoder with --train-text)

A stage (VQAStage, ContrastiveStage) says what is trained on what; one loop runs them all:
AdamW, cosine schedule with warmup, gradient accumulation and clipping; one process or
`torchrun` (DDP, or FSDP2 with --fsdp). A Med-MoE step's loss is the mean over every answer
token of every micro-batch on every process, so the split of a global batch never changes it.
Checkpoints hold model, optimizer, schedule, RNG and data position: --resume continues the
very same trajectory.
"""

import functools
import json
import math
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import medmoe
from medmoe import data, files, plots
from medmoe.files import MedMoEError

STAGE_LR = {1: 1e-3, 2: 2e-5, 3: 2e-5, "contrastive": 5e-5}  # contrastive: MedMoE's Adam lr (SPEC B)
STAGE_CLIP = {1: 1.0, 2: 1.0, 3: 1.0, "contrastive": 0.25}


@dataclass
class TrainArgs:
    stage: int | str  # 1, 2, 3 or "contrastive" (MedMoE)
    model: str  # checkpoint to start from: converted (stage 1), stage-1 output (2), stage-2 output (3)
    data: list
    out: str
    images: str | None = None
    val_data: str | None = None
    epochs: int = 1
    max_steps: int | None = None  # stop (and end the schedule) after this many optimizer steps
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr: float | None = None  # default: STAGE_LR
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of the steps
    clip: float | None = None  # gradient-norm clip, 0: off; default STAGE_CLIP
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on GPUs that have it) | fp32 | bf16
    grad_checkpointing: bool = False
    compile: bool = False
    template: str | None = None  # default: plain (stage 1), else the model's
    image_mode: str | None = None  # default: crop (stage 1), pad (stages 2-3)
    train_vision: bool = False  # for towers trained from scratch (the demo); frozen in the paper
    train_text: bool = False  # contrastive: also train the text encoder (one trained from scratch); frozen in the paper
    save_every: int = 0  # steps; 0: only at the end (and on interrupt)
    eval_every: int = 0
    keep: int = 2  # checkpoints kept
    resume: bool = False
    fsdp: bool = False
    workers: int = 0
    log_every: int = 1
    # stage 2: the router as a modality classifier
    moe_layers: str = "sparse"
    num_experts: int = 4
    router_steps: int = 300
    router_tokens: int = 64  # FFN inputs sampled per record and layer
    # stage 3
    top_k: int = 1
    meta_expert: bool = True
    router: str | None = None  # default: MODEL/router.safetensors
    learned_router: bool = False  # ablation: train the router (with the aux loss) instead
    aux_loss_coef: float = 0.0
    quiet: bool = False


# ----------------------------------------------------------------------------- a model from scratch

def init_model(out, data_files, images=None, preset="small", template="phi", seed=0):
    """A randomly initialised Med-MoE at a preset's shapes (medmoe.PRESETS) with a byte-level BPE
    tokenizer trained on the questions and answers of `data_files`."""
    cfg = medmoe.preset_config(preset, template)
    examples = [ex for path in data_files for ex in data.load_examples(path, images)]
    texts = [data.SYSTEM] + [f"{q} {a or ''}" for ex in examples for q, a in ex.turns]
    os.makedirs(out, exist_ok=True)
    tok = data.train_tokenizer(texts, cfg.llm.vocab_size, os.path.join(out, "tokenizer.json"))
    cfg.llm.vocab_size, cfg.llm.eos_ids = tok.get_vocab_size(), [tok.token_to_id("<|endoftext|>")]
    torch.manual_seed(seed)
    model = medmoe.MedMoE(cfg)
    medmoe.save_model(model, out)
    return model


# ----------------------------------------------------------------------------- processes


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0

    def sum(self, *values):
        """All-reduce a few floats (a no-op on one process)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_dist():
    """One process, or the group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


# ----------------------------------------------------------------------------- model and trainable set


def build_model(a: TrainArgs, source, fresh):
    """Load `source`; a fresh stage 3 upcycles it and installs the stage-2 router."""
    model = medmoe.load_model(source, dtype=torch.float32)
    if model.cfg.quant is not None:
        raise MedMoEError(f"{source}: a quantized checkpoint is for inference only: train from its float checkpoint")
    if a.stage == 3 and fresh:
        if model.cfg.moe is not None:
            raise MedMoEError(f"{source}: already a MoE model; stage 3 starts from a dense stage-2 model")
        moe = medmoe.MoEConfig(num_experts=a.num_experts, top_k=a.top_k, layers=a.moe_layers, meta_expert=a.meta_expert,
                               renormalize=a.top_k > 1, aux_loss_coef=a.aux_loss_coef)
        model.upcycle(moe)
        if not a.learned_router:
            weight, bias, modalities = load_router(a.router or os.path.join(a.model, "router.safetensors"), a.num_experts)
            moe.modalities = modalities
            with torch.no_grad():
                for layer in model.llm.moe_layers():
                    layer.router.weight.copy_(weight)
                    layer.router.bias.copy_(bias)
    return model


def set_trainable(model, a: TrainArgs):
    """Exactly the stage's trainable set (SPEC); everything else gets requires_grad False."""
    model.requires_grad_(False)
    if a.stage in (1, 2):
        model.projector.requires_grad_(True)
        if a.stage == 2:
            model.llm.requires_grad_(True)
        if a.train_vision:
            model.vision.requires_grad_(True)
    else:
        for layer in model.llm.moe_layers():
            layer.experts.requires_grad_(True)
            if layer.meta_expert is not None:
                layer.meta_expert.requires_grad_(True)
            layer.router.requires_grad_(a.learned_router)
    return [p for p in model.parameters() if p.requires_grad]


def wrap(model, a: TrainArgs, d: Dist):
    for m in model.modules():  # Med-MoE's LLM recomputes its blocks in backward when asked
        if hasattr(m, "checkpointing"):
            m.checkpointing = a.grad_checkpointing
    if a.compile:  # per block: one graph per block shape, reused across layers
        for block in model.blocks():
            block.compile(dynamic=True)
    if d.world == 1:
        return model
    if a.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks():
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    # MedMoE routes whole images: an expert no image of a batch chose gets no gradient, which DDP must be told
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                   find_unused_parameters=getattr(model, "unused_parameters", False))


def autocast(a: TrainArgs, device):
    bf16 = a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def cosine_with_warmup(total, warmup_frac):
    warm = max(1, round(total * warmup_frac)) if warmup_frac > 0 else 0

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------- the router as a modality classifier


def load_router(path, num_experts):
    """(weight [E, H], bias [E], modalities) from our router.safetensors or a Med-MoE router .pth."""
    if not os.path.isfile(path):
        raise MedMoEError(f"{path}: no router file; stage 3 needs the stage-2 router (or --router FILE, or --learned-router)")
    if path.endswith(".pth"):  # Med-MoE's phi_router.pth / stablelm_router.pth: {fc1.weight, fc1.bias}
        sd = torch.load(path, map_location="cpu", weights_only=True)
        weight, bias, modalities = sd["fc1.weight"], sd["fc1.bias"], None
    else:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
            modalities = json.loads((f.metadata() or {}).get("modalities", "null"))
    if weight.shape[0] != num_experts:
        raise MedMoEError(f"{path}: router has {weight.shape[0]} outputs but --num-experts is {num_experts}")
    return weight.float(), bias.float(), modalities


@torch.no_grad()
def collect_ffn_inputs(model, run, dataset, batches, layer_ids, tokens, seed):
    """FFN inputs of the given layers for every record in `batches`: per record and layer up to
    `tokens` randomly chosen positions from the image on (image and text). Returns features [N, H],
    record index [N]."""
    store = {}
    hooks = [model.llm.layers[i].ffn.register_forward_pre_hook(lambda m, args, i=i: store.__setitem__(i, args[0]))
             for i in layer_ids]
    g = torch.Generator().manual_seed(seed)
    feats, owners = [], []
    # eager: a compiled block would keep calling the hook it was traced with, in every layer
    with torch.compiler.set_stance("force_eager"):
        try:
            for batch in batches:
                b = data.collate([dataset[i] for i in batch])
                if not b.index:
                    continue
                run(b.input_ids, b.pixels)
                for row, i in enumerate(b.index):
                    # from the image on: tokens before it (the system prompt) cannot know the modality (causal attention)
                    ids = dataset.encoded[i][0]
                    start = ids.index(medmoe.IMAGE_TOKEN) if medmoe.IMAGE_TOKEN in ids else 0
                    for layer in layer_ids:
                        pick = start + torch.randperm(max(0, dataset.lengths[i] - start), generator=g)[:tokens]
                        feats.append(store[layer][row, pick].float().cpu())
                        owners += [i] * len(pick)
        finally:
            for h in hooks:
                h.remove()
    return (torch.cat(feats) if feats else torch.zeros(0, model.cfg.llm.hidden_size)), torch.tensor(owners, dtype=torch.long)


def fit_router(feats, labels, owners, held_out, num_classes, steps, seed):
    """A linear classifier Linear(H, E) on FFN inputs (cross-entropy, AdamW, full batch):
    Med-MoE's router, trained beforehand on modality labels (paper Fig. 6: a 1-layer linear
    router works best). Returns the layer and held-out token / record accuracy."""
    torch.manual_seed(seed)
    router = torch.nn.Linear(feats.shape[1], num_classes)
    train = ~held_out
    scale = feats[train].std().clamp(min=1e-6)  # only to pick a learning rate that fits the features' scale
    opt = torch.optim.AdamW(router.parameters(), lr=1e-2 / float(scale), weight_decay=0.0)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(router(feats[train]), labels[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        probs = router(feats).softmax(-1)
    acc = {"train_loss": loss.item()}
    if held_out.any():
        acc["token_acc"] = float((probs[held_out].argmax(-1) == labels[held_out]).float().mean())
        hits = []
        for o in owners[held_out].unique():
            rows = owners == o
            hits.append(int(probs[rows].mean(0).argmax()) == int(labels[rows][0]))
        acc["record_acc"], acc["held_out_records"] = sum(hits) / len(hits), len(hits)
    return router, acc


def linear_probe(train_x, train_y, test_x, test_y, steps=500, seed=0):
    """Accuracy of a linear classifier fitted on frozen embeddings (fit_router, the router fit: full-batch
    AdamW cross-entropy) on held-out ones."""
    classes = sorted(set(train_y))
    unknown = sorted(set(test_y) - set(classes))
    if unknown:
        raise MedMoEError(f"test label {unknown[0]!r} never occurs in the probe's training images")
    feats = torch.cat([train_x, test_x])
    labels = torch.tensor([classes.index(y) for y in list(train_y) + list(test_y)])
    held = torch.arange(len(feats)) >= len(train_x)
    _, acc = fit_router(feats, labels, torch.arange(len(feats)), held, len(classes), steps, seed)
    return acc["record_acc"]


def train_router(model, run, dataset, a: TrainArgs, d: Dist, log):
    """After stage 2: fit the router on the records that carry a modality label, hold out a
    tenth of their images, report accuracy, and return (router, modalities, report)."""
    labelled = [i for i, ex in enumerate(dataset.examples) if ex.modality]
    if not labelled:
        log("no record has a 'modality' label: no router fitted (stage 3 will need --learned-router)")
        return None
    modalities = sorted({dataset.examples[i].modality for i in labelled})
    if len(modalities) > a.num_experts:
        raise MedMoEError(f"{len(modalities)} modalities {modalities} but {a.num_experts} experts: raise --num-experts")
    images = sorted({dataset.examples[i].image or str(i) for i in labelled})
    rng = random.Random(a.seed)
    held_images = set(rng.sample(images, max(1, len(images) // 10))) if len(images) > 1 else set()
    layer_ids = medmoe.moe_layer_ids(medmoe.MoEConfig(layers=a.moe_layers), model.cfg.llm.num_layers)
    batches = [labelled[j : j + a.batch_size * d.world] for j in range(0, len(labelled), a.batch_size * d.world)]
    mine = [b[d.rank :: d.world] for b in batches if len(b) >= d.world]
    feats, owners = collect_ffn_inputs(model, run, dataset, tqdm(mine, desc="router features", disable=a.quiet or not d.main),
                                       layer_ids, a.router_tokens, a.seed + d.rank)
    if d.world > 1:  # every process fits the same router on everything (cheap, deterministic)
        parts = [None] * d.world
        dist.all_gather_object(parts, (feats, owners))
        feats, owners = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    label_of = {m: k for k, m in enumerate(modalities)}
    labels = torch.tensor([label_of[dataset.examples[int(o)].modality] for o in owners], dtype=torch.long)
    held = torch.tensor([(dataset.examples[int(o)].image or str(int(o))) in held_images for o in owners], dtype=torch.bool)
    router, report = fit_router(feats, labels, owners, held, a.num_experts, a.router_steps, a.seed)
    report.update(modalities=modalities, records=len(labelled), layers=layer_ids)
    return router, modalities, report


def save_router(router, modalities, path):
    from safetensors.torch import save_file

    tensors = {"weight": router.weight.detach().contiguous(), "bias": router.bias.detach().contiguous()}
    files.atomic_write(path, lambda p: save_file(tensors, p, metadata={"modalities": json.dumps(modalities)}))


# ----------------------------------------------------------------------------- checkpoints
#
# The lifecycle keeps one promise: at every moment checkpoints/ holds a complete checkpoint for
# --resume (or none yet). A checkpoint is written under a temporary name and renamed whole;
# `latest` moves only after that; an old one is renamed away before it is deleted, so none is
# ever seen half gone; what a killed process left half-written is cleared on the next start.


def checkpoint_dir(out, step):
    return os.path.join(out, "checkpoints", f"step-{step:07d}")


def complete_checkpoints(out):
    """step-N directories (never a temporary or half-deleted one), oldest first."""
    folder = os.path.join(out, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in sorted(n for n in names if re.fullmatch(r"step-\d+", n))]


def latest_checkpoint(out):
    path = os.path.join(out, "checkpoints", "latest")
    if os.path.isfile(path):
        with open(path) as f:
            full = os.path.join(out, "checkpoints", f.read().strip())
        if os.path.isdir(full):
            return full
    found = complete_checkpoints(out)  # killed between replacing a step's checkpoint and moving `latest`
    return found[-1] if found else None


def clear_leftovers(out):
    """Remove what killed runs left behind: temporary and half-deleted checkpoints (a full
    checkpoint's worth of disk each) and temporary files of the published model."""
    folder = os.path.join(out, "checkpoints")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.fullmatch(r"step-\d+\.(tmp|trash)\d+", name):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    for name in os.listdir(out):
        if re.fullmatch(rf"({'|'.join(map(re.escape, PUBLISHED))}|train_args\.json|train_log\.jsonl)\.tmp\d+", name):
            os.remove(os.path.join(out, name))


def remove_dir(path):
    """Rename, then delete: a kill midway leaves a .trash directory, never a half checkpoint."""
    trash = f"{path}.trash{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def full_state(wrapped, opt):
    """The model and optimizer state as plain full tensors on CPU, from any wrapping (DDP, FSDP2);
    a collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(wrapped, options=opts), get_optimizer_state_dict(wrapped, opt, options=opts)


def save_training_checkpoint(r, state):
    """step-N/ = a loadable model directory + trainer.pt; then `latest` moves and the oldest
    beyond --keep go. A step this run saved already (the end of a run that checkpointed its last
    step) is not written twice. Returns the checkpoint's path."""
    a, d = r.a, r.d
    final = checkpoint_dir(a.out, state["step"])
    if final == r.saved:
        return final
    model_sd, opt_sd = full_state(r.wrapped, r.opt)
    if d.main:
        tmp = f"{final}.tmp{os.getpid()}"
        keys = medmoe.expected_tensors(r.task.model)
        medmoe.save_checkpoint(r.task.model.cfg, {k: v for k, v in model_sd.items() if k in keys}, tmp, r.task.tokenizer_json)
        trainer = {"optimizer": opt_sd, "scheduler": r.sched.state_dict(), "state": state, "rng": torch.get_rng_state(),
                   "python_rng": random.getstate()}
        torch.save(trainer, os.path.join(tmp, "trainer.pt"))
        if os.path.isdir(final):  # an earlier run's checkpoint of this step
            remove_dir(final)
        os.rename(tmp, final)
        files.atomic_write(os.path.join(a.out, "checkpoints", "latest"), lambda p: files.write_bytes(p, os.path.basename(final).encode()))
        for old in complete_checkpoints(a.out)[: -a.keep]:
            remove_dir(old)
    d.barrier()
    r.saved = final
    return final


def load_trainer_state(path, wrapped, opt, sched):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    trainer = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
    set_optimizer_state_dict(wrapped, opt, trainer["optimizer"], options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    random.setstate(trainer["python_rng"])
    return trainer["state"]


PUBLISHED = ("config.json", "model.safetensors", "tokenizer.json")  # the finished model, at the top of OUT


def publish_model(checkpoint, a: TrainArgs, step):
    """Make OUT the finished model (`medmoe ask --model OUT` finds it there): each file linked
    atomically, then train_args.json, written last, marks the run complete at `step`."""
    for name in PUBLISHED:
        if os.path.exists(os.path.join(checkpoint, name)):
            publish(os.path.join(checkpoint, name), os.path.join(a.out, name))
    record = json.dumps({**asdict(a), "completed_step": step}, indent=2).encode()
    files.atomic_write(os.path.join(a.out, "train_args.json"), lambda p: files.write_bytes(p, record))


def completed_step(out):
    """The step a finished run published its model at (None: not finished, or published partly)."""
    record = files.read_json(os.path.join(out, "train_args.json"), required=False)
    return record.get("completed_step") if isinstance(record, dict) else None


def publish(src, dst):
    """Make dst the same file as src (a hard link: no copy of a large file), atomically."""
    if os.path.exists(dst) and os.path.samefile(src, dst):  # published before a kill: renaming a link onto itself does nothing
        return
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ----------------------------------------------------------------------------- logging


class Log:
    """train_log.jsonl (one line per step / evaluation) and loss.png, written by process 0."""

    def __init__(self, out, main, resume_step=None):
        self.path, self.png, self.main = os.path.join(out, "train_log.jsonl"), os.path.join(out, "loss.png"), main
        self.rows = []
        if main and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:  # keep what happened up to the checkpoint; later lines are redone
                self.rows = [r for r in map(json.loads, f) if r.get("step", 0) <= resume_step]
        if main:
            files.atomic_write(self.path, lambda p: files.write_bytes(p, "".join(json.dumps(r) + "\n" for r in self.rows).encode()))

    def write(self, **row):
        if self.main:
            self.rows.append(row)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def plot(self, title):
        if not self.main:
            return
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        series = {"train loss": tuple(zip(*train))} if train else {}
        if val:
            series["validation loss"] = tuple(zip(*val))
        if series:
            plots.line_plot(self.png, series, title, "optimizer step", "cross-entropy")


# ----------------------------------------------------------------------------- what a stage trains on


class VQAStage:
    """Stages 1-3: (image, conversation) records; a step's loss is the mean over its answer tokens.
    The trainer's loop asks a stage for its model, data and the loss of a micro-batch; the MedMoE
    contrastive stage (ContrastiveStage, below) answers the same questions."""

    def __init__(self, a: TrainArgs, source, fresh, say):
        self.a = a
        self.model = model = build_model(a, source, fresh)
        if model.vision is None:
            raise MedMoEError(f"{a.model}: the model has no vision tower")
        self.tokenizer_json = os.path.join(a.model, "tokenizer.json")
        tok = data.load_tokenizer(a.model)
        template = a.template or ("plain" if a.stage == 1 else model.cfg.template)
        image_mode = a.image_mode or ("crop" if a.stage == 1 else "pad")
        self.max_len = model.cfg.llm.max_seq_len

        def dataset(paths):
            examples = [ex for p in paths for ex in data.load_examples(p, a.images)]
            return data.VQADataset(examples, tok, template, model.cfg.vision, image_mode, self.max_len)

        self.train_set = dataset(a.data)
        self.val_set = dataset([a.val_data]) if a.val_data else None
        if len(self.train_set) == 0:
            raise MedMoEError("no training records")
        unsupervised = sum(data.count_targets([labels], self.max_len) == 0 for _, labels in self.train_set.encoded)
        if unsupervised == len(self.train_set):
            raise MedMoEError(f"no record has an answer within the context length ({self.max_len} tokens): nothing to train on")
        if unsupervised:
            say(f"warning: {unsupervised} of {len(self.train_set)} records have no answer token within the context length ({self.max_len})")

    collate = staticmethod(data.collate)
    rate = "tok_s"  # the progress bar's throughput: input tokens per second

    def trainable(self):
        return set_trainable(self.model, self.a)

    def units(self, b):
        """What the loss averages over: every answer token of the step, on every process, weighs the same."""
        return data.count_targets(b.labels, self.max_len)

    def inputs(self, b):
        """Input tokens (image features included): the throughput unit."""
        return sum(self.train_set.lengths[i] for i in b.index)

    def loss(self, run, b, units):
        """The micro-batch's summed loss divided by the step's `units`."""
        return run(b.input_ids, b.pixels, b.labels, units)[1]

    def val_loss(self, run, d):
        return evaluate(run, self.val_set, self.a, d, self.max_len)

    def finish(self, run, d, say):
        """After stage 2: the router, fitted as a modality classifier."""
        if self.a.stage != 2:
            return {}
        self.model.eval()
        fitted = train_router(self.model, run, self.train_set, self.a, d, say)
        if not fitted:
            return {}
        router, modalities, report = fitted
        if d.main:
            save_router(router, modalities, os.path.join(self.a.out, "router.safetensors"))
        say(f"router (modality classifier over {', '.join(modalities)}): held-out record accuracy "
            f"{report.get('record_acc', float('nan')):.1%} on {report.get('held_out_records', 0)} records, "
            f"token accuracy {report.get('token_acc', float('nan')):.1%}")
        return {"router": report}


class ContrastiveStage:
    """MedMoE's contrastive training (SPEC B): (image, caption) pairs, each image once per epoch;
    a step's loss is the mean over its images of GLoRIA's loss plus the router's cross-entropy.
    Trains the Swin backbone, experts and router; the text encoder only with --train-text (the
    paper freezes its pretrained Bio_ClinicalBERT; one trained from scratch must learn)."""

    def __init__(self, a: TrainArgs, source, fresh, say):
        from medmoe import contrastive

        self.a = a
        self.model = model = contrastive.load_model(source, dtype=torch.float32)
        self.tokenizer_json = os.path.join(a.model, "tokenizer.json")
        tok = contrastive.load_wordpiece(a.model, model.cfg.text.max_tokens)
        encode = functools.partial(contrastive.encode_captions, tok)

        def dataset(paths):
            examples = [ex for p in paths for ex in data.load_examples(p, a.images)]
            return data.CaptionDataset(examples, encode, model.cfg.swin, model.cfg.modalities, a.image_mode or "pad", a.seed)

        self.train_set = dataset(a.data)
        self.val_set = dataset([a.val_data]) if a.val_data else None
        if len(self.train_set) < 2:
            raise MedMoEError(f"contrastive training needs at least 2 distinct images (found {len(self.train_set)})")
        if all(m < 0 for m in self.train_set.modality):
            say(f"warning: no image has a modality label among {', '.join(model.cfg.modalities)}: the router will not learn")

    def collate(self, items):
        return self.train_set.collate(items)

    def trainable(self):
        self.model.requires_grad_(True)
        self.model.text.requires_grad_(self.a.train_text)
        return [p for p in self.model.parameters() if p.requires_grad]

    def units(self, b):
        return len(b.index)

    inputs = units  # throughput is counted in images
    rate = "img_s"

    def loss(self, run, b, units):
        return run(b.pixels, b.ids, b.mask, b.pieces, b.modality) * (len(b.index) / units)

    @torch.no_grad()
    def val_loss(self, run, d):
        total, count = 0.0, 0
        n, size = len(self.val_set), self.a.batch_size
        for start in range(0, n, size):
            b = self.val_set.collate([self.val_set[i] for i in range(start, min(start + size, n))][d.rank :: d.world])
            if len(b.index) > 1:
                total, count = total + float(run(b.pixels, b.ids, b.mask, b.pieces, b.modality)) * len(b.index), count + len(b.index)
        total, count = d.sum(total, count)
        return total / max(count, 1)

    def finish(self, run, d, say):
        return {}


# ----------------------------------------------------------------------------- the loop


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit (a second Ctrl-C aborts at once)."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


@dataclass
class Run:
    """What a training run holds while it loops; the functions below take it explicitly (and the
    trainer state, a dict saved in every checkpoint, beside it)."""

    a: TrainArgs
    d: Dist
    task: VQAStage | ContrastiveStage
    wrapped: torch.nn.Module  # the model under DDP or FSDP2 (the model itself on one process)
    params: list
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total: int  # optimizer steps in the whole run
    logbook: Log
    say: Callable
    saved: str | None  # the checkpoint this run wrote (or resumed from) last

    def forward(self, *inputs):
        inputs = [x.to(self.d.device) if isinstance(x, torch.Tensor) else x for x in inputs]
        with autocast(self.a, self.d.device):
            return self.wrapped(*inputs)


def train(a: TrainArgs, log=print):
    """Run one stage. Returns a summary dict (steps, losses, router report, paths)."""
    if a.stage not in STAGE_LR:
        raise MedMoEError(f"unknown stage {a.stage!r} (1, 2, 3 or contrastive)")
    d = setup_dist()
    say = log if d.main and not a.quiet else (lambda *m: None)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    resume_from = latest_checkpoint(a.out) if a.resume else None
    if d.main:
        clear_leftovers(a.out)
        if not resume_from and os.path.exists(os.path.join(a.out, "train_args.json")):
            os.remove(os.path.join(a.out, "train_args.json"))  # an earlier run's mark of completion
    d.barrier()
    if a.resume and resume_from is None:
        say(f"no checkpoint in {a.out}/checkpoints: starting from {a.model}")
    r, state = start(a, d, resume_from, say)
    summary = {"stage": a.stage, "steps": r.total, "out": a.out, "main": d.main}
    if resume_from and r.total <= state["step"] == completed_step(a.out):
        say(f"the run in {a.out} is already complete ({state['step']} steps): its model is there")
        return {**summary, "complete": True, "losses": [row["loss"] for row in r.logbook.rows if "loss" in row]}
    stopped = loop(r, state)
    if stopped:
        return {**summary, "interrupted": True, "step": state["step"], "checkpoint": stopped}
    return finish(r, state, summary)


def start(a: TrainArgs, d: Dist, resume_from, say):
    """The stage's model (wrapped for the processes) and data, its optimizer and schedule, and
    the trainer state: the resumed checkpoint's, or a fresh one."""
    task = (ContrastiveStage if a.stage == "contrastive" else VQAStage)(a, resume_from or a.model, resume_from is None, say)
    task.trainable()
    task.model.to(d.device).train()
    wrapped = wrap(task.model, a, d)
    params = [p for p in task.model.parameters() if p.requires_grad]  # after wrapping: FSDP2 swaps in sharded parameters
    lr = a.lr if a.lr is not None else STAGE_LR[a.stage]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=a.weight_decay, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(epoch_batches(task.train_set, a, d, 0)) / a.grad_accum)
    total = steps_per_epoch * a.epochs if a.max_steps is None else min(a.max_steps, steps_per_epoch * a.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, a.warmup))
    state = {"step": 0, "epoch": 0, "micro": 0, "skipped": {}, "tokens": 0, "records": 0}
    if resume_from:
        state = load_trainer_state(resume_from, wrapped, opt, sched)
        say(f"resuming from {resume_from} (step {state['step']})")
    logbook = Log(a.out, d.main, state["step"] if resume_from else None)
    return Run(a, d, task, wrapped, params, opt, sched, total, logbook, say, resume_from), state


def epoch_batches(train_set, a: TrainArgs, d: Dist, epoch):
    """This process's micro-batches of one epoch: global batches (batch_size x processes) in
    the repeatable length-grouped order, each split across processes."""
    glob = data.length_grouped_batches(train_set.lengths, a.batch_size * d.world, a.seed, epoch)
    return [b[d.rank :: d.world] for b in glob if len(b) >= d.world]


def loop(r: Run, state):
    """Optimizer steps up to the run's total, a checkpoint every --save-every steps. Ctrl-C or
    SIGTERM ends it after the current step with a checkpoint, whose path it returns (None when
    the run reached its total)."""
    a, train_set = r.a, r.task.train_set
    bar = tqdm(total=r.total, initial=state["step"], desc=f"stage {a.stage}", unit="step", disable=a.quiet or not r.d.main,
               dynamic_ncols=True)
    clock = (time.perf_counter(), state["tokens"])  # throughput counts from here
    try:
        with StopRequest() as stop:
            while state["step"] < r.total:
                batches = epoch_batches(train_set, a, r.d, state["epoch"])[state["micro"] :]
                if hasattr(train_set, "set_epoch"):  # e.g. a caption per image that changes every epoch
                    train_set.set_epoch(state["epoch"])
                # no batches left: the epoch ended exactly at the checkpoint resumed
                loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=r.task.collate,
                                                     num_workers=a.workers) if batches else ()
                for micro in chunks(loader, a.grad_accum):
                    loss, grad_norm = step(r, micro, state)
                    report(r, state, loss, grad_norm, clock, bar)
                    stop_now = r.d.sum(1.0 if stop.signal else 0.0)[0] > 0
                    if (a.save_every and state["step"] % a.save_every == 0) or stop_now:
                        path = save_training_checkpoint(r, state)
                        r.logbook.plot(f"stage {a.stage}")
                        if stop_now:
                            bar.close()
                            r.say(f"interrupted ({stop.signal or 'signal'}) at step {state['step']}: checkpoint saved to {path}; "
                                  "continue with --resume")
                            return path
                    if state["step"] >= r.total:
                        break
                else:  # the epoch is done
                    state["epoch"], state["micro"] = state["epoch"] + 1, 0
                if state.get("records") == 0 and state["skipped"]:  # (older checkpoints do not count them)
                    raise MedMoEError(f"no usable record: every image was unreadable ({len(state['skipped'])} file(s), listed above)")
    finally:
        bar.close()
    return None


def chunks(iterable, n):
    """Consecutive lists of n items (the last may be shorter): the micro-batches of each step."""
    it = iter(iterable)
    while chunk := [x for _, x in zip(range(n), it)]:
        yield chunk


def step(r: Run, micro, state):
    """One optimizer step over this process's micro-batches; returns (mean loss, gradient norm)
    and advances the trainer state."""
    d = r.d
    note_skipped(micro, state, d)
    n_units, n_inputs, n_records = d.sum(sum(r.task.units(b) for b in micro), sum(r.task.inputs(b) for b in micro),
                                         sum(len(b.index) for b in micro))
    loss_sum = torch.zeros((), device=d.device)  # summed on the device: no host sync per micro-batch
    for k, b in enumerate(micro):
        if not b.index:
            continue
        sync = k == len(micro) - 1 or not hasattr(r.wrapped, "no_sync")  # DDP: all-reduce gradients once per step
        with nullcontext() if sync else r.wrapped.no_sync():
            loss = r.task.loss(r.forward, b, max(n_units, 1) / d.world)
            loss.backward()
        loss_sum += loss.detach()
    (loss,) = d.sum(float(loss_sum) / d.world)
    clip = STAGE_CLIP[r.a.stage] if r.a.clip is None else r.a.clip
    grad_norm = float(torch.nn.utils.clip_grad_norm_(r.params, clip if clip > 0 else float("inf")))
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            last = latest_checkpoint(r.a.out)
            where = f"; the last good checkpoint is {last}" if last else ""
            raise MedMoEError(f"stage {r.a.stage}: {what} is {value} at step {state['step'] + 1}: stopped{where} (try a lower --lr)")
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    r.sched.step()
    state["step"], state["micro"], state["tokens"] = state["step"] + 1, state["micro"] + len(micro), state["tokens"] + int(n_inputs)
    if "records" in state:
        state["records"] += int(n_records)
    return loss, grad_norm


def note_skipped(micro, state, d: Dist):
    """Warn once about each unreadable image the loader skipped (the state remembers them)."""
    for b in micro:
        for s in b.skipped:
            if s.path not in state["skipped"]:
                state["skipped"][s.path] = s.reason
                if d.main:
                    tqdm.write(f"warning: skipped {s.reason}")


def report(r: Run, state, loss, grad_norm, clock, bar):
    """The step in train_log.jsonl and on the progress bar; the validation loss every --eval-every steps."""
    elapsed = time.perf_counter() - clock[0]
    rate = (state["tokens"] - clock[1]) / max(elapsed, 1e-9)
    lr = r.sched.get_last_lr()[0]
    if state["step"] % r.a.log_every == 0 or state["step"] == r.total:
        r.logbook.write(step=state["step"], epoch=state["epoch"], loss=loss, lr=lr, grad_norm=grad_norm, tokens=state["tokens"],
                        tokens_per_s=rate, elapsed_s=elapsed)
    bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", r.task.rate: f"{rate:,.0f}"})
    bar.update(1)
    if r.task.val_set and r.a.eval_every and state["step"] % r.a.eval_every == 0:
        r.logbook.write(step=state["step"], val_loss=r.task.val_loss(r.forward, r.d))


def finish(r: Run, state, summary):
    """After the last step: the validation loss, the stage's own ending (stage 2 fits the
    router), the final checkpoint, and the finished model published at the top of OUT."""
    if r.task.val_set:
        summary["val_loss"] = r.task.val_loss(r.forward, r.d)
        r.logbook.write(step=state["step"], val_loss=summary["val_loss"])
    if state["skipped"]:
        r.say(f"skipped {len(state['skipped'])} unreadable image file(s) (listed above)")
    summary.update(skipped=len(state["skipped"]), losses=[row["loss"] for row in r.logbook.rows if "loss" in row])
    summary.update(r.task.finish(r.forward, r.d, r.say))
    final = save_training_checkpoint(r, state)
    if r.d.main:
        publish_model(final, r.a, state["step"])
        r.logbook.plot(f"stage {r.a.stage}")
    r.d.barrier()
    return summary


@torch.no_grad()
def evaluate(run, dataset, a: TrainArgs, d: Dist, max_len):
    """Token-weighted mean cross-entropy of the answers over a validation set (all processes)."""
    glob = [list(range(i, min(i + a.batch_size * d.world, len(dataset)))) for i in range(0, len(dataset), a.batch_size * d.world)]
    total, count = 0.0, 0
    for batch in glob:
        b = data.collate([dataset[i] for i in batch[d.rank :: d.world]])
        if not b.index:
            continue
        n = data.count_targets(b.labels, max_len)
        _, loss = run(b.input_ids, b.pixels, b.labels, num_tokens=1.0)  # the summed cross-entropy
        total, count = total + float(loss), count + n
    total, count = d.sum(total, count)
    return total / max(count, 1)
