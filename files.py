"""What every file needs: the user-error type, JSON and atomic file writing, and reading and
writing safetensors files. Imports nothing of ours (see the README's Architecture section)."""

import ctypes
import dataclasses
import json
import os
import sys
import types
import typing

import torch


class MedMoEError(Exception):
    """A problem with the user's input: the CLI prints it as one line, never a traceback."""


def read_json(path, required=True, expect=dict):
    """A JSON file that must hold an `expect` (a JSON object unless told otherwise)."""
    if not os.path.isfile(path):
        if required:
            raise MedMoEError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)}")
        return None
    with open(path, "rb") as f:
        try:
            value = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MedMoEError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, expect):
        raise MedMoEError(f"{path}: expected {json_kind(expect)}, found {json_kind(type(value))}")
    return value


def json_kind(t):
    names = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false",
             type(None): "null", tuple: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in (t if isinstance(t, tuple) else (t,)))


def from_json(klass, d, where):
    """The dataclass klass from a JSON object, every field checked against its annotation, so a
    config that parses but holds the wrong shape or types (a list, a number written as a string,
    a missing field) is refused in one line naming the file and the field."""
    if not isinstance(d, dict):
        raise MedMoEError(f"{where}: expected {json_kind(dict)}, found {json_kind(type(d))}")
    hints = typing.get_type_hints(klass)
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise MedMoEError(f"{where}: unknown {klass.__name__} keys {unknown}")
    required = [f.name for f in dataclasses.fields(klass) if dataclasses.MISSING is f.default and dataclasses.MISSING is f.default_factory]
    missing = [name for name in required if name not in d]
    if missing:
        raise MedMoEError(f"{where}: {klass.__name__} needs {', '.join(missing)}")
    return klass(**{k: json_value(v, hints[k], f"{where}: {k}") for k, v in d.items()})


def json_value(v, annotation, where):
    """v as the annotation wants it (a nested dataclass built, a list made a tuple) or an error."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for t in options:
        base = typing.get_origin(t) or t
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            return from_json(t, v, where)
        if base in (list, tuple) and isinstance(v, list):
            return base(v)
        if type(v) is base or (base is float and type(v) is int):  # JSON's own types: true is no integer
            return v
    wanted = json_kind(tuple(typing.get_origin(t) or t for t in options if not dataclasses.is_dataclass(t)) or dict)
    raise MedMoEError(f"{where} is {json.dumps(v)[:40]}: expected {wanted}")


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


def release(t):
    """Hand a tensor's memory pages back to the OS once it has been read (Linux's MADV_PAGEOUT:
    a page of a memory-mapped file is dropped and read again if touched again; other memory goes
    to swap if there is any, so no data is ever lost). Converting reads each source tensor once:
    without this, every page of a memory-mapped source stays resident until the process ends
    (quantizing the StableLM shape from its 6.7 GiB bf16 checkpoint peaked at 7.8 GiB, 1.1 GiB
    with it). Python's mmap.madvise only takes mmap objects, and safetensors keeps its mapping
    to itself, hence ctypes."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start and _libc is not None:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)  # a hint: errors are ignored


# Linux 5.4+ (an older kernel refuses the advice and nothing happens); other systems number their advice differently
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_PAGEOUT = 21


def read_weights(directory):
    """All tensors of a checkpoint directory: (sharded) safetensors, or PyTorch .bin as older
    releases ship them (loaded with mmap, weights only: no code from the file is run)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
                raise MedMoEError(f"{index}: expected a weight_map object of tensor name -> shard file name")
            if any(os.path.basename(v) != v for v in weight_map.values()):
                raise MedMoEError(f"{index}: shard names must be file names in {directory}")
            files = sorted(set(weight_map.values()))
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


