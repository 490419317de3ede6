"""Using a trained Med-MoE: answer questions about an image (streamed, or batched over a test
file in the authors' prediction format) and look at how tokens are routed to the experts.

The model, tokenizer and conversation template of a checkpoint directory travel together in an
`Assistant`; the CLI's ask, chat, eval and route commands are thin wrappers around it."""

import collections
import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import torch
from tqdm import tqdm

import medmoe
from medmoe import IMAGE_TOKEN, data, files, scorer
from medmoe.files import MedMoEError


def demo_dir():
    """Where `medmoe demo` saves its model, so that `ask` finds it with no arguments."""
    home = os.environ.get("MEDMOE_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "medmoe")
    return os.path.join(home, "demo", "model")


def find_model(path=None):
    """--model, else $MEDMOE_MODEL, else the demo model if it has been built."""
    path = path or os.environ.get("MEDMOE_MODEL")
    if path:
        return path
    if os.path.isfile(os.path.join(demo_dir(), "config.json")):
        return demo_dir()
    raise MedMoEError("no model: pass --model DIR, set MEDMOE_MODEL, or build the demo model with `medmoe demo`")


def pick_device(device=None, dtype=None, quantized=False):
    """Default: the GPU in bf16 when there is one, else the CPU in fp32 (bf16 for a quantized
    model: its kernels compute in bf16, and prefill dequantizes to the compute dtype)."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise MedMoEError(f"unknown device {device!r} (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedMoEError("--device cuda, but this machine has no usable CUDA GPU")
    if dtype is None:
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else quantized
        dtype = torch.bfloat16 if bf16 else torch.float32
    return device, dtype


class Detokenizer:
    """One answer's tokens -> its text, piece by piece as it grows: leading spaces dropped, a
    multi-byte character held back until all its tokens are there; done at a stop token."""

    def __init__(self, tok, stop):
        self.tok, self.stop, self.ids, self.shown, self.done = tok, stop, [], "", False

    def push(self, t):
        """The text token t adds ("" if none yet); at the stop token, whatever was held back."""
        if self.done:
            return ""
        if t in self.stop:
            self.done = True
            return self.rest()
        self.ids.append(t)
        text = self.text()
        return "" if text.endswith("\ufffd") else self.take(text)

    def rest(self):
        """The text not given out yet (at the end: also bytes that never became a character)."""
        return self.take(self.text())

    def text(self):
        return self.tok.decode(self.ids, skip_special_tokens=True).lstrip()

    def take(self, text):
        piece, self.shown = text[len(self.shown):], text
        return piece


class Assistant:
    """A checkpoint ready to answer: model, tokenizer, template and stop tokens.

    image_mode: "pad" (default) prepares images as Med-MoE trains on them (stages 2-3);
    "crop" is what the authors' evaluation script does (CLIP resize + centre crop)."""

    def __init__(self, directory, device=None, dtype=None, quant=None, image_mode="pad", compile=None, matrix_dtype=None):
        device, dtype = pick_device(device, dtype, quantized=quant is not None or medmoe.load_config(directory).quant is not None)
        # compiling the decode step pays off on a GPU; on a CPU its ~20 s first call buys nothing,
        # except under bf16 matrices: eager, every matrix is upcast for every token (3.4x slower)
        compile = (device.type == "cuda" or matrix_dtype is not None) if compile is None else compile
        self.model = medmoe.load_model(directory, dtype=dtype, device=device, quant=quant, matrix_dtype=matrix_dtype)
        self.tok = data.load_tokenizer(directory)
        self.template = data.get_template(self.model.cfg.template)
        self.stop = data.stop_ids(self.tok, self.template, self.model.cfg.llm.eos_ids)
        self.image_mode, self.compile = image_mode, compile
        self.directory = os.path.abspath(directory)
        self.name = os.path.basename(self.directory)
        if self.model.vision is None:
            raise MedMoEError(f"{directory}: a text-only model (no vision tower) cannot answer questions about images")

    def pixels(self, *paths):
        x = torch.stack([data.load_pixels(p, self.model.cfg.vision, self.image_mode) for p in paths])
        return x.to(self.model.llm.embed.weight)

    def prompt(self, turns):
        """[(question, answer), ..., (question, None)] -> prompt ids; the image goes first."""
        for q, _ in turns:
            if not q.replace("<image>", "").strip():
                raise MedMoEError("empty question")
            if any("\ud800" <= c <= "\udfff" for c in q):  # bytes that were not UTF-8 (Python's surrogateescape)
                raise MedMoEError("the question is not valid UTF-8 text")
        q0 = turns[0][0].replace("<image>", "").strip()
        turns = [("<image>\n" + q0, turns[0][1])] + list(turns[1:])
        ids = data.encode_conversation(self.tok, self.template, turns, self.model.cfg.vision.num_patches)[0]
        limit = self.model.cfg.llm.max_seq_len
        if len(ids) >= limit:  # checked here, before any image work, with a message about the question
            raise MedMoEError(f"question too long: with its image the prompt is {len(ids)} tokens, and the model's context is {limit}")
        return ids

    def token_steps(self, pixels, prompts, max_new_tokens=256, **sampling):
        """The model's next token for every prompt [B] per step, as one left-padded batch, ending at
        this checkpoint's stop tokens (sampling: temperature, top_p, generator; default greedy)."""
        return self.model.generate_stream(prompts, pixels, max_new_tokens=max_new_tokens, stop_ids=self.stop,
                                          compile=self.compile, vocab_size=self.tok.get_vocab_size(), **sampling)

    def stream(self, pixels, turns, max_new_tokens=256):
        """Yield the answer to the last turn as text pieces, as they are generated."""
        text = Detokenizer(self.tok, self.stop)
        for tok in self.token_steps(pixels, [self.prompt(turns)], max_new_tokens):
            piece = text.push(int(tok[0]))
            if piece:
                yield piece
            if text.done:
                return
        if piece := text.rest():
            yield piece

    def answer(self, pixels, turns, max_new_tokens=256):
        return "".join(self.stream(pixels, turns, max_new_tokens)).strip()

    def answer_batch(self, pixels, questions, max_new_tokens=256):
        """Greedy answers to one question per image, as one left-padded batch."""
        prompts = [self.prompt([(q, None)]) for q in questions]
        out = self.model.generate(prompts, pixels, max_new_tokens=max_new_tokens, stop_ids=self.stop, compile=self.compile,
                                  vocab_size=self.tok.get_vocab_size())
        return [self.tok.decode(ids, skip_special_tokens=True).strip() for ids in out]


# ----------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """Expert choices of one prompt, over the tokens from the image on (those that can see it):
    counts[layer][kind][expert] (kind 0 = image tokens, 1 = the text after the image) and the
    router's mean probabilities per layer, probs[layer][expert]."""

    counts: torch.Tensor  # [L, 2, E]
    probs: torch.Tensor  # [L, E]


def expert_names(model):
    moe = model.cfg.moe
    if moe is None or not model.llm.moe_layers():
        raise MedMoEError("this model has no MoE layers (it is a dense stage 1-2 model; stage 3 makes the experts)")
    return list(moe.modalities) if moe.modalities else [f"expert {e}" for e in range(moe.num_experts)]


def moe_layer_numbers(model):
    return [i for i, b in enumerate(model.llm.layers) if isinstance(b.ffn, medmoe.MoE)]


def token_kinds(ids, limit):
    """0 for each image-feature position of a prompt, 1 for each text token."""
    return (torch.tensor(ids[:limit]) != IMAGE_TOKEN).long()


@torch.inference_mode()
def route(assistant, pixels, prompts):
    """One forward pass over a batch of prompts, reading every MoE layer's router."""
    model = assistant.model
    expert_names(model)  # a dense model: say so before any work
    _, _, routers = model(prompts, pixels, router_logits=True)  # right-padded: row b's tokens come first
    layers = model.llm.moe_layers()
    B, E = len(prompts), layers[0].moe.num_experts
    T = routers[0].shape[0] // B
    out = []
    for b, ids in enumerate(prompts):
        kinds = token_kinds(ids, model.cfg.llm.max_seq_len)
        start = ids.index(IMAGE_TOKEN)  # tokens before the image (the system prompt) cannot know its modality: not counted
        kinds[:start] = -1
        counts, probs = torch.zeros(len(layers), 2, E), torch.zeros(len(layers), E)
        for j, (layer, router_logits) in enumerate(zip(layers, routers)):
            logits = router_logits.view(B, T, E)[b, : len(kinds)].float()
            chosen = logits.topk(layer.moe.top_k, -1).indices  # softmax is monotonic: same top-k as MoE.route
            for kind in (0, 1):
                counts[j, kind] = torch.bincount(chosen[kinds == kind].flatten(), minlength=E).float()
            probs[j] = logits[start:].softmax(-1).mean(0)
        out.append(Routing(counts, probs))
    return out


def route_answer(assistant, pixels, question, answer):
    """Routing of one question and the answer given to it (what `ask --show-routing` shows)."""
    return route(assistant, pixels, [assistant.prompt([(question, answer)])])[0]


def routing_dict(assistant, r: Routing):
    """What the router sees (mean probability per modality over the tokens from the image on and the MoE layers)
    and each MoE layer's share of image and text tokens per expert."""
    names = expert_names(assistant.model)
    shares = r.counts / r.counts.sum(-1, keepdim=True).clamp(min=1)
    return {"router_sees": dict(zip(names, r.probs.mean(0).tolist())),
            "layers": [{"layer": layer, "image": dict(zip(names, shares[j, 0].tolist())), "text": dict(zip(names, shares[j, 1].tolist()))}
                       for j, layer in enumerate(moe_layer_numbers(assistant.model))]}


def routing_table(assistant, r: Routing):
    """The text `ask --show-routing` prints."""
    d = routing_dict(assistant, r)
    seen = sorted(d["router_sees"].items(), key=lambda kv: -kv[1])
    lines = [f"router sees: {seen[0][0]} ({seen[0][1]:.0%}; " + ", ".join(f"{n} {p:.0%}" for n, p in seen[1:]) + ")",
             "layer  tokens " + " ".join(f"{n:>10}" for n in d["router_sees"])]
    for layer in d["layers"]:
        for kind in ("image", "text"):
            lines.append(f"{layer['layer']:>5}  {kind:<6} " + " ".join(f"{v:>10.0%}" for v in layer[kind].values()))
    return "\n".join(lines)


def routing_records(images=(), data_file=None, images_dir=None, limit=None, question=None):
    """What `medmoe route` routes: each image file with `question` (default: a generic one), then
    the first `limit` records of data_file."""
    examples = [data.Example(id=p, image=p, turns=[(question or "What is shown in this image?", None)]) for p in images]
    if data_file:
        examples += data.load_examples(data_file, images_dir)[:limit]
    return examples


def route_many(assistant, examples, batch_size=16, question=None, progress=True):
    """Routing of many (image, question) records; the question defaults to each record's first."""
    results = []
    for i in tqdm(range(0, len(examples), batch_size), desc="routing", disable=not progress):
        chunk = examples[i : i + batch_size]
        prompts = [assistant.prompt([(question or ex.turns[0][0], None)]) for ex in chunk]
        results += route(assistant, assistant.pixels(*[ex.image for ex in chunk]), prompts)
    return results


def routing_summary(assistant, examples, results):
    """Expert load per MoE layer (all records) and per labelled modality, and the router's
    modality accuracy on labelled records: the modality whose expert gets the highest mean
    router probability over the tokens from the image on, averaged over the MoE layers."""
    names = expert_names(assistant.model)
    layers = moe_layer_numbers(assistant.model)

    def load(rs):  # [L, E] fractions of the tokens from the image on (image and text)
        c = sum(r.counts.sum(1) for r in rs)
        return c / c.sum(-1, keepdim=True).clamp(min=1)

    groups = {"all": results}
    for m in sorted({ex.modality for ex in examples if ex.modality}):
        groups[m] = [r for ex, r in zip(examples, results) if ex.modality == m]
    rows, labels = [], []
    for g, rs in groups.items():
        for j, layer in enumerate(layers):
            rows.append(load(rs)[j].tolist())
            labels.append(f"{g} · layer {layer}")
    judged = [(ex.modality, names[int(r.probs.mean(0).argmax())]) for ex, r in zip(examples, results) if ex.modality in names]
    accuracy = sum(m == p for m, p in judged) / len(judged) if judged else None
    return {"rows": rows, "row_labels": labels, "experts": names, "router_accuracy": accuracy, "judged": len(judged)}


# ----------------------------------------------------------------------------- evaluation


def read_predictions(path, model):
    """question_id -> prediction record of an earlier (perhaps interrupted) run of this `model`
    (see model_record). A last line cut short by the interruption is dropped; that question is
    simply answered again. A file holding another model's answers is refused, never mixed in."""
    done = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    p = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(p, dict) and "question_id" in p:
                    done[str(p["question_id"])] = p
    other = next((p for p in done.values() if (p.get("metadata") or {}).get("model") != model), None)
    if other is not None:
        was = ((other.get("metadata") or {}).get("model") or {}).get("path") or other.get("model_id") or "an unknown model"
        raise MedMoEError(f"{path} holds answers of another model or setting ({was}): give another --out, or delete it to start afresh")
    return done


def model_record(assistant):
    """What makes answers this model's: its weights (by content), compute dtype, quantization
    and image preprocessing. Kept in every prediction so a resumed run never mixes in another's."""
    digest = hashlib.sha256()
    with open(os.path.join(assistant.directory, "model.safetensors"), "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    llm, quant = assistant.model.llm, assistant.model.cfg.quant
    matrices = llm.lm_head.weight.dtype  # narrower than the activations under weight-only bf16
    dtype = str(llm.dtype) + (f", matrices {matrices}" if matrices.is_floating_point and matrices != llm.dtype else "")
    return {"path": assistant.directory, "sha256": digest.hexdigest(), "dtype": dtype,
            "quant": f"int{quant.bits}/{quant.group_size}" if quant else None, "image_mode": assistant.image_mode}


def evaluate(assistant, examples, out, batch_size=16, max_new_tokens=64, progress=True):
    """Batched greedy answers to every record not already in `out` (resuming an interrupted
    run), appended as they come; then the file is rewritten in record order (the authors'
    scorer pairs answers with questions by position) and scored. Returns the scores."""
    for ex in examples:
        if ex.image is None or len(ex.turns) < 1 or ex.turns[0][1] is None:
            raise MedMoEError(f"record {ex.id}: evaluation needs an image, a question and its answer")
    repeated = [i for i, n in collections.Counter(ex.id for ex in examples).items() if n > 1]
    if repeated:  # answers are kept by question id: two records with one id would share an answer
        raise MedMoEError(f"record id {repeated[0]!r} appears more than once ({len(repeated)} repeated ids): ids must be unique")
    missing = [ex.image for ex in examples if not os.path.isfile(ex.image)]
    if missing:  # say so before loading anything, not after an hour of answering
        raise MedMoEError(f"{missing[0]}: no such image file ({len(missing)} of {len(examples)} records' images are missing)")
    model = model_record(assistant)
    done = read_predictions(out, model)
    todo = [ex for ex in examples if ex.id not in done]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(examples), initial=len(examples) - len(todo), desc="answering",
                                                     disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            questions = [ex.turns[0][0].replace("<image>", "").strip() for ex in chunk]
            answers = assistant.answer_batch(assistant.pixels(*[ex.image for ex in chunk]), questions, max_new_tokens)
            for ex, q, text in zip(chunk, questions, answers):
                done[ex.id] = {"question_id": ex.id, "prompt": q, "text": text, "answer_id": uuid.uuid4().hex,
                               "model_id": assistant.name, "metadata": {"model": model}}
                f.write(json.dumps(done[ex.id]) + "\n")
            f.flush()
            bar.update(len(chunk))
    lines = "".join(json.dumps(done[ex.id]) + "\n" for ex in examples).encode()
    files.atomic_write(out, lambda p: files.write_bytes(p, lines))
    return scorer.score((done[ex.id]["text"], ex.turns[0][1], ex.answer_type or "") for ex in examples)
