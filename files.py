"""What every file needs: the user-error type, JSON and atomic file writing, and reading and
writing safetensors files. Imports nothing of ours (see the README's Architecture section)."""

import ctypes
import json
import os

import torch


class MedMoEError(Exception):
    """A problem with the user's input: the CLI prints it as one line, never a traceback."""


def read_json(path, required=True):
    if not os.path.isfile(path):
        if required:
            raise MedMoEError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)}")
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise MedMoEError(f"{path}: invalid JSON ({e})") from None


def atomic_write(path, write):
    """Write to a temporary file then rename: a kill at any moment leaves the old file intact."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


# the writer's dtype names (safetensors' own)
SAFETENSORS_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def read_safetensors(path):
    """The tensors of a .safetensors file, memory-mapped by safetensors: views of the file read
    lazily by the OS, copy-on-write (training may update them without touching the file). The
    library checks the header (every tensor's byte span matches its dtype and shape, spans do not
    overlap and cover the data), so a corrupted file never loads."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    except SafetensorError as e:
        raise MedMoEError(f"{path}: not a safetensors file, or truncated or corrupt ({e})") from None


def read_weights(directory):
    """All tensors of a checkpoint directory: (sharded) safetensors, or PyTorch .bin as older
    releases ship them (loaded with mmap, weights only: no code from the file is run)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(directory, n))][:1]
    if not files:
        raise MedMoEError(f"{directory}: no model.safetensors or pytorch_model.bin (nor an index of shards)")
    tensors = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise MedMoEError(f"{path}: missing (listed in the shard index)")
        if name.endswith(".safetensors"):
            tensors.update(read_safetensors(path))
        else:
            try:
                tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:  # noqa: BLE001 -- torch raises many types for a bad zip/pickle
                raise MedMoEError(f"{path}: unreadable PyTorch weights ({type(e).__name__})") from None
    return tensors


def write_safetensors(path, tensors, get=None):
    """Write a .safetensors file tensor by tensor. tensors: name -> tensor, or a meta tensor
    (dtype and shape only) whose data get(name) makes when its turn comes. Written by hand
    because safetensors' save_file wants every tensor in memory at once: converting a 6B model
    would then need all of it (12.9 GB in bf16) besides its source.
    Every tensor whose size is a multiple of 64 bytes goes first, 64-byte aligned in the file, so
    that memory-mapped it is aligned as the quantized kernels need (they crash otherwise); the
    rest follow by falling element size, as safetensors orders them, to keep their alignment."""
    odd = lambda t: t.numel() * t.element_size() % 64 != 0
    order = sorted(tensors, key=lambda k: (odd(tensors[k]), -tensors[k].element_size() if odd(tensors[k]) else 0))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # the tensor data starts 64-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in order:
            spec = tensors[name]
            t = (get(name) if get else spec).detach().contiguous().cpu()
            if t.dtype != spec.dtype or t.shape != spec.shape:
                raise MedMoEError(f"{path}: tensor {name!r} came out {t.dtype} {tuple(t.shape)}, expected {spec.dtype} {tuple(spec.shape)}")
            if t.numel():
                f.write((ctypes.c_ubyte * (t.numel() * t.element_size())).from_address(t.data_ptr()))  # no copy


