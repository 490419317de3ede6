"""demo.py: the offline demo data (packaged DICOM/NIfTI/PNG files -> PNGs + VQA records) and its held-out split."""

import hashlib
import json
import os
import random
from collections import Counter

import pytest
from PIL import Image

from medmoe import MedMoEError, data, demo


def packages_or_skip():
    for module in ("pydicom", "nibabel", "numpy"):
        pytest.importorskip(module)
    import importlib.util

    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image is not installed")
    from pydicom.data import get_testdata_file

    if get_testdata_file("RG1_UNCI.dcm", download=False) is None:
        pytest.skip("pydicom-data is not installed")
    import importlib.metadata

    for name in demo.NO_DEPS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed ({demo.INSTALL_NO_DEPS})")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    packages_or_skip()
    out = str(tmp_path_factory.mktemp("demo"))
    summary = demo.assemble(out, seed=0)
    records = {split: data.read_records(os.path.join(out, f"{split}.jsonl")) for split in ("train", "test")}
    return out, summary, records


def images_of(records):
    """One entry per image: the first record about it."""
    first = {}
    for r in records:
        first.setdefault(r["image"], r)
    return list(first.values())


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def test_every_modality_in_both_splits_and_roughly_balanced(built):
    _, summary, records = built
    for split, low in (("train", 60), ("test", 12)):
        counts = Counter(r["modality"] for r in images_of(records[split]))
        assert set(counts) == set(demo.MODALITIES)
        assert min(counts.values()) >= low and max(counts.values()) <= 3 * min(counts.values()), counts
        assert counts == {m: n for m, n in summary["images"][split].items()}


def test_held_out_files_give_no_training_image(built):
    """Issue 15: no held-out image shares a source file with a training image."""
    out, _, records = built
    train, test = images_of(records["train"]), images_of(records["test"])
    assert not any(r["augmented"] for r in test)  # test images are plain cuts of their files
    held_out = {s.file for s in demo.SOURCES if s.held_out}
    assert {r["source"] for r in test} == held_out
    assert {r["source"] for r in train} == {s.file for s in demo.SOURCES} - held_out
    assert {r["modality"] for r in test if r["source"] in held_out} == set(demo.MODALITIES)
    # and as files: no test PNG repeats a training PNG
    assert not {sha(os.path.join(out, r["image"])) for r in train} & {sha(os.path.join(out, r["image"])) for r in test}


def test_slices_and_crops_come_from_where_their_source_says(built):
    _, _, records = built
    for src in demo.SOURCES:
        same = lambda r: (r["source"], r["modality"], r["organ"]) == (src.file, src.modality, src.region)  # noqa: B023
        mine = [r for r in images_of(records["test" if src.held_out else "train"]) if same(r)]
        assert len(mine) == src.n  # the fixture's train_scale is 1
        if src.cut == "slices":
            views = demo.read_frames(src)
            first, stop = src.use or (0, len(views))
            assert all(first <= r["frame"] < stop for r in mine)
            # n slices as they are, spread evenly through the slices in use (all of them where there are no more), none
            # twice; training then adds augmented copies
            frames = [r["frame"] for r in mine if not r["augmented"]]
            assert frames == sorted(set(frames)) and len(frames) == min(src.n, stop - first)
            gaps = [b - a for a, b in zip([first, *frames], [*frames, stop])]  # before the first, between, after the last
            assert gaps[0] == 0 and max(gaps) <= -(-(stop - first) // len(frames)), (src.file, frames)
            assert len(mine) - len(frames) == (0 if src.held_out else src.n - len(frames))
            if src.modality == "xray":  # half the reconstructions' copies cut inside the body, as a collimated film is
                boxes = [(r["box"], views[r["frame"]].size) for r in mine if r["augmented"]]
                cut = [(box, size) for box, size in boxes if box != [0, 0, *size]]
                assert 0.3 * len(boxes) <= len(cut) <= 0.7 * len(boxes)
                for (x0, y0, x1, y1), (w, h) in cut:
                    side = x1 - x0
                    assert y1 - y0 == side and 0.6 * min(w, h) - 1 <= side <= 0.9 * min(w, h) + 1
                    assert (w - side) // 4 <= x0 <= w - side - (w - side) // 4 and 0 <= y0 <= h - side
        else:  # the whole field once (as it is), then square crops of it, their side `scale` of its short side
            w, h = demo.read_frames(src)[0].size
            field = [round(f * s) for f, s in zip(src.field, (w, h, w, h))]
            short = min(field[2] - field[0], field[3] - field[1])
            assert [r["box"] for r in mine if not r["augmented"]][:1] == [field]
            for r in mine[1:]:
                x0, y0, x1, y1 = r["box"]
                assert field[0] <= x0 and field[1] <= y0 and x1 <= field[2] and y1 <= field[3]
                assert x1 - x0 == y1 - y0 and src.scale[0] * short - 1 <= x1 - x0 <= src.scale[1] * short + 1


def test_radiographs_are_not_zoomed_out_onto_black():
    """augment zooms CT and MRI copies out onto black half the time, never a radiograph (a film's body fills its field):
    on a white image, an X-ray copy's only black is what turning and stretching it leaves in the corners."""
    white = Image.new("RGB", (64, 64), "white")
    black = {m: sum(sum(demo.augment(white, random.Random(i), m).convert("L").histogram()[:40]) for i in range(200)) / (200 * 64 * 64)
             for m in ("xray", "ct")}
    assert black["xray"] < 0.05 and black["ct"] > 0.1, black


def test_questions_and_balanced_yes_no(built):
    _, _, records = built
    for split, recs in records.items():
        per_image = Counter(r["image"] for r in recs)
        organ = {r["image"]: r["organ"] for r in recs}
        # modality and region, open and yes/no; modality only where the organ is not known (two H&E sources)
        assert {(n, organ[i] is None) for i, n in per_image.items()} == {(4, False), (2, True)}
        closed = [r for r in recs if r["answer_type"] == "CLOSED"]
        assert {r["answer"] for r in closed} == {"yes", "no"}
        for m in demo.MODALITIES:  # "yes" must not give the modality away
            answers = Counter(r["answer"] for r in closed if r["modality"] == m)
            assert abs(answers["yes"] - answers["no"]) <= 0.2 * sum(answers.values()), (split, m, answers)
        for r in closed:
            if r["question_type"] == "MODALITY":  # the question names the true modality exactly when the answer is yes
                assert (r["question"] == demo.IS_MODALITY[r["modality"]]) == (r["answer"] == "yes")
            else:
                assert (r["question"] == demo.IS_REGION.format(r["organ"])) == (r["answer"] == "yes")
                assert not (r["organ"] == "colon" and "abdomen" in r["question"])  # colon is in the abdomen: never a "no"
        for r in recs:
            if r["answer_type"] == "OPEN":
                assert r["answer"] == (demo.SAY[r["modality"]] if r["question_type"] == "MODALITY" else r["organ"])


def test_records_and_images_load(built):
    out, _, _ = built
    for split in ("train", "test"):
        examples = data.load_examples(os.path.join(out, f"{split}.jsonl"))
        assert examples and all(e.modality in demo.MODALITIES and e.answer_type in ("OPEN", "CLOSED") for e in examples)
        augmented = {os.path.join(out, r["image"]) for r in data.read_records(os.path.join(out, f"{split}.jsonl")) if r["augmented"]}
        for path in sorted({e.image for e in examples}):
            img = data.load_image(path)
            # long side to 64, shape kept (the model pads it square); a training copy cut to another aspect is shorter
            assert img.mode == "RGB" and (max(img.size) == 64 or (path in augmented and max(img.size) < 64))


def test_deterministic_for_a_seed(built, tmp_path):
    out, _, _ = built
    again = demo.assemble(str(tmp_path / "again"), seed=0, size=64)
    for split in ("train", "test"):
        with open(os.path.join(out, f"{split}.jsonl")) as a, open(tmp_path / "again" / f"{split}.jsonl") as b:
            assert a.read() == b.read()
    names = sorted(os.listdir(os.path.join(out, "images")))
    assert names == sorted(os.listdir(tmp_path / "again" / "images"))
    assert all(sha(os.path.join(out, "images", n)) == sha(tmp_path / "again" / "images" / n) for n in names)
    other = demo.assemble(str(tmp_path / "other"), seed=1, size=32)
    assert other["images"] == again["images"]  # the same counts, other crops
    with open(os.path.join(out, "train.jsonl")) as a, open(tmp_path / "other" / "train.jsonl") as b:
        assert a.read() != b.read()
    assert max(Image.open(tmp_path / "other" / "images" / "test-0000.png").size) == 32


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    packages_or_skip()
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "nibabel", None)  # what an import of a package that is not installed sees
    with pytest.raises(MedMoEError, match=r"nibabel package: pip install 'medmoe\[demo\]'"):
        demo.assemble(str(tmp_path / "out"))
    monkeypatch.undo()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(MedMoEError, match=r"scikit-image package: pip install 'medmoe\[demo\]'"):
        demo.assemble(str(tmp_path / "out"))
    monkeypatch.undo()
    import pydicom.data

    monkeypatch.setattr(pydicom.data, "get_testdata_file", lambda name, download=True: None)
    with pytest.raises(MedMoEError, match=r"pydicom-data package: pip install 'medmoe\[demo\]'"):
        demo.assemble(str(tmp_path / "out"))


# ----------------------------------------------------------------------------- reading: series, radiographs


def test_a_dicom_series_is_read_in_slice_order_with_its_spacing(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    np = pytest.importorskip("numpy")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # axial: the slice normal is +z, up
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope)
    # file names out of order on purpose: the order is the slices' height, and each slice is known by its intercept
    for name, z, intercept in (("a.dcm", 10.0, -1000), ("b.dcm", -5.0, -1024), ("c.dcm", 2.5, -1010)):
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.RescaleIntercept = intercept
        ds.save_as(tmp_path / name)
    stack, inverted, spacing = demo.read_dicom(str(tmp_path), "series")
    assert stack.shape == (3, ds.Rows, ds.Columns) and not inverted
    for frame, intercept in zip(stack, (-1024, -1010, -1000)):  # feet first: z -5, 2.5, 10
        assert np.array_equal(frame, hu + intercept)
    assert spacing == pytest.approx((0.661468, 0.661468, 5.0))


def test_radiographs_sum_attenuation_along_rays():
    np = pytest.importorskip("numpy")
    ct = np.full((40, 30, 20), -1000.0, np.float32)  # x 40, y 30, z 20 slices of air
    for x in range(10, 30):
        ct[x, : x - 9, 10:] = 0.0  # water, x - 9 voxels thick front to back, in the upper half (z up)
    default = demo.radiographs(ct, (1.0, 1.0, 2.0))
    assert len(default) == 9  # by default seven frontal angles and two lateral
    views = demo.radiographs(ct, (1.0, 1.0, 2.0), angles=(0,), lateral=(0,))
    front, side = views  # unturned, so each ray's sum can be counted by hand
    assert front.shape == (40, 40) and side.shape == (40, 30)  # 20 slices 2 mm apart: 40 rows of 1 mm, superior up
    assert (front[22:, :] == 0).all()  # the lower half is air all the way through (rows 19-20 blend the two)
    assert front[5, 10:30] == pytest.approx(np.arange(1, 21))  # water 1 per voxel: the thickness, column by column
    assert (front[5, :10] == 0).all() and (front[5, 30:] == 0).all()
    assert side[5, :20] == pytest.approx(np.arange(20, 0, -1)) and (side[5, 20:] == 0).all()  # at y, water where x > y + 9
    films = demo.films(default)
    assert all(f.mode == "L" and np.asarray(f).min() == 0 and np.asarray(f).max() == 255 for f in films)  # each its own stretch


def test_processing_evens_out_thickness_and_sharpens_edges():
    np = pytest.importorskip("numpy")
    assert demo.processed(np.full((32, 48), 3.0, np.float32)) == pytest.approx(np.full((32, 48), 0.75))  # keep 1/4 of a flat field
    step = np.zeros((64, 64), np.float32)
    step[:, 32:] = 1.0  # a step edge: the low-pass is 4 blocks of 16 columns (0, 0, 1, 1) blown up, a ramp from column 24 to 40
    out = demo.processed(step)
    assert out[:, :16] == pytest.approx(0.0) and out[:, 48:] == pytest.approx(0.25)  # plateaus: a quarter of the step
    assert out[:, 31] == pytest.approx(-0.75 * 7.5 / 16) and out[:, 32] == pytest.approx(1 - 0.75 * 8.5 / 16)  # the rims


# ----------------------------------------------------------------------------- source=<folder>


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def fake_folder(root):
    """A VQA-RAD-like and a PathVQA-like subfolder: labelled and unlabelled images, a test image that is also in
    train, and a test image whose bytes equal a train image's under another name."""
    (root / "rad" / "images").mkdir(parents=True)
    (root / "path" / "images").mkdir(parents=True)
    for name, colour, size in (("a", 40, (80, 60)), ("b", 90, (50, 50)), ("c", 140, (30, 70)), ("d", 200, (64, 64))):
        Image.new("L", size, colour).save(root / "rad" / "images" / f"{name}.png")
    (root / "rad" / "images" / "a_copy.png").write_bytes((root / "rad" / "images" / "a.png").read_bytes())
    for i in range(12):  # enough xray training images for the test top-up to move some
        Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(root / "rad" / "images" / f"x{i}.png")
    Image.new("RGB", (40, 30), (200, 120, 80)).save(root / "path" / "images" / "p1.png")
    Image.new("RGB", (40, 30), (180, 100, 90)).save(root / "path" / "images" / "p2.png")
    q = lambda image, modality, organ=None: {"image": f"images/{image}.png", "question": "q?", "answer": "yes", "modality": modality,
                                             "organ": organ}
    xrays = [q(f"x{i}", "xray", "chest") for i in range(12)]
    write_jsonl(root / "rad" / "train.jsonl", [q("a", "ct", "head"), q("a", "ct"), q("b", None, "chest"), *xrays])
    write_jsonl(root / "rad" / "test.jsonl", [q("a", "ct", "head"), q("a_copy", "ct", "head"), q("b", "mri", "chest"),
                                             q("c", "mri", "abdomen"), q("d", None, "head")])
    write_jsonl(root / "path" / "train.jsonl", [q("p1", "pathology")])
    write_jsonl(root / "path" / "test.jsonl", [q("p2", "pathology")])


def test_source_folder(tmp_path):
    fake_folder(tmp_path / "src")
    out = tmp_path / "out"
    summary = demo.assemble(str(out), source=str(tmp_path / "src"), size=32, seed=0)
    recs = {split: data.read_records(str(out / f"{split}.jsonl")) for split in ("train", "test")}
    train_src = {r["source"] for r in recs["train"]}
    test_src = {r["source"] for r in recs["test"]}
    # a (and its byte-identical copy) and b are in a train file: never test; d has no modality: nowhere
    assert {"rad/images/a.png", "path/images/p1.png"} <= train_src
    assert {"rad/images/c.png", "path/images/p2.png"} <= test_src
    assert not test_src & {"rad/images/a.png", "rad/images/a_copy.png", "rad/images/b.png", "rad/images/d.png"}
    assert not train_src & test_src and "rad/images/b.png" not in train_src
    # xray had no test image: some training images were moved over, and are then in no training record
    moved = {s for s in test_src if "/x" in s}
    assert len(moved) == summary["test_images"]["moved"]["xray"] == 2
    assert summary["test_images"]["dropped"] == 3  # a, a_copy, b
    # questions: region ones only where an organ is known (not for pathology here)
    for r in recs["test"] + recs["train"]:
        assert r["question_type"] == "MODALITY" or r["organ"] is not None
    assert Counter(r["image"] for r in recs["train"] if r["source"] == "path/images/p1.png").total() == 2
    for split in ("train", "test"):
        for e in data.load_examples(str(out / f"{split}.jsonl")):
            assert max(data.load_image(e.image).size) == 32
    again = tmp_path / "again"
    demo.assemble(str(again), source=str(tmp_path / "src"), size=32, seed=0)
    assert (out / "test.jsonl").read_text() == (again / "test.jsonl").read_text()


def test_source_folder_needs_both_splits(tmp_path):
    write_jsonl(tmp_path / "src" / "train.jsonl", [])
    with pytest.raises(MedMoEError, match=r"test\.jsonl"):
        demo.assemble(str(tmp_path / "out"), source=str(tmp_path / "src"))


def test_install_lines_name_every_data_package():
    """README's demo command and the Makefile install what demo.NO_DEPS reads (a package left off fails the demo)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    for name in ("README.md", "Makefile"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            assert demo.INSTALL_NO_DEPS.replace("pip install", "") in f.read(), name


def test_stage0_learns_each_distinct_image_once_with_its_modality_and_region(tmp_path):
    """demo.stage0_data: one row per distinct image (an image asked about twice is one row), modality labels in
    MODALITIES' order, region -1 where the organ is not known; nothing to learn from a single modality."""
    import torch

    from medmoe import medmoe

    vision = medmoe.preset_config("demo").vision
    shades = {"a.png": 0, "b.png": 120, "c.png": 250}
    for name, v in shades.items():
        Image.new("RGB", (20, 10), (v, v, v)).save(tmp_path / name)
    rows = [("a.png", "mri", "head"), ("a.png", "mri", "head"), ("b.png", "ct", "abdomen"), ("c.png", "pathology", None)]
    with open(tmp_path / "train.jsonl", "w") as f:
        for image, modality, organ in rows:
            f.write(json.dumps({"image": image, "question": "q", "answer": "a", "modality": modality, "organ": organ}) + "\n")
    x, y, names, regions = demo.stage0_data(str(tmp_path / "train.jsonl"), vision)
    assert names == ["ct", "mri", "pathology"]  # MODALITIES' order, not first-seen order
    assert x.shape == (3, 3, vision.image_size, vision.image_size)
    assert y.tolist() == [1, 0, 2]  # a (mri), b (ct), c (pathology)
    assert regions[0].tolist() == [1, 0, -1] and regions[1] == 2  # sorted organs: abdomen, head
    assert torch.equal(x[0], data.load_pixels(str(tmp_path / "a.png"), vision))
    with open(tmp_path / "one.jsonl", "w") as f:
        f.write(json.dumps({"image": "a.png", "question": "q", "answer": "a", "modality": "mri", "organ": "head"}) + "\n")
    assert demo.stage0_data(str(tmp_path / "one.jsonl"), vision) is None


def test_has_content_finds_the_patches_that_vary_in_the_towers_order():
    """demo.has_content on a 2 x 2 grid of 8 px patches worked out by hand: flat, a checkerboard (std 1), a faint ramp
    (std about 0.046, under the 0.1 threshold) and a black / white step (std 1), in row-major order as the patch
    embedding flattens them."""
    import torch

    x = torch.zeros(1, 3, 16, 16)
    x[..., :8, 8:] = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1  # row 0, col 1: -1 / +1
    x[..., 8:, :8] = torch.linspace(0, 0.14, 8)[None, :]  # row 1, col 0: a ramp of 0.14 over the patch
    x[..., 8:, 12:] = 1.0  # row 1, col 1: half 0, half 1
    x[..., 8:, 8:12] = -1.0
    assert demo.has_content(x, 8).tolist() == [[False, True, False, True]]
    assert demo.has_content(x, 8, threshold=0.04).tolist() == [[False, True, True, True]]
