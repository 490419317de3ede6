"""PNG plots drawn with Pillow alone (no plotting library in the core): loss curves and
expert-load heatmaps, the pictures people look at after training."""

from PIL import Image, ImageDraw, ImageFont

from medmoe.files import atomic_write

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
W, H, MARGIN = 800, 500, 70


def _font():
    return ImageFont.load_default()


def _ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_plot(path, series, title, xlabel, ylabel):
    """series: {name: (xs, ys)} -> a PNG line chart with axes, ticks and a legend."""
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), _font()
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)]
    x0, x1 = (min(p[0] for p in pts), max(p[0] for p in pts)) if pts else (0, 1)
    y0, y1 = (min(p[1] for p in pts), max(p[1] for p in pts)) if pts else (0, 1)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, top, bottom = MARGIN, W - 20, 40, H - MARGIN
    sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    d.rectangle([left, top, right, bottom], outline="black")
    for v in _ticks(x0, x1):
        d.line([sx(v), bottom, sx(v), bottom + 5], fill="black")
        d.text((sx(v) - 12, bottom + 8), f"{v:.4g}", fill="black", font=font)
    for v in _ticks(y0, y1):
        d.line([left - 5, sy(v), left, sy(v)], fill="black")
        d.line([left, sy(v), right, sy(v)], fill=(230, 230, 230))
        d.text((5, sy(v) - 6), f"{v:.4g}", fill="black", font=font)
    d.text((W // 2 - 4 * len(title), 12), title, fill="black", font=font)
    d.text((W // 2 - 4 * len(xlabel), H - 30), xlabel, fill="black", font=font)
    d.text((5, top - 25), ylabel, fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        line = [(sx(x), sy(y)) for x, y in zip(xs, ys)]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        elif line:
            d.ellipse([line[0][0] - 3, line[0][1] - 3, line[0][0] + 3, line[0][1] + 3], fill=colour)
        d.line([right - 150, top + 15 + 15 * i, right - 130, top + 15 + 15 * i], fill=colour, width=3)
        d.text((right - 125, top + 9 + 15 * i), name, fill="black", font=font)
    atomic_write(path, lambda p: img.save(p, format="PNG"))


def heatmap(path, rows, row_labels, col_labels, title):
    """rows: list of lists of fractions in [0, 1] -> a PNG heatmap with the values printed."""
    cell_w, cell_h, left, top = 80, 28, 160, 50
    img = Image.new("RGB", (left + cell_w * len(col_labels) + 20, top + cell_h * len(row_labels) + 20), "white")
    d, font = ImageDraw.Draw(img), _font()
    d.text((10, 12), title, fill="black", font=font)
    for j, c in enumerate(col_labels):
        d.text((left + j * cell_w + 5, top - 16), str(c), fill="black", font=font)
    for i, (label, row) in enumerate(zip(row_labels, rows)):
        d.text((10, top + i * cell_h + 8), str(label), fill="black", font=font)
        for j, v in enumerate(row):
            shade = int(255 * (1 - v))
            box = [left + j * cell_w, top + i * cell_h, left + (j + 1) * cell_w - 2, top + (i + 1) * cell_h - 2]
            d.rectangle(box, fill=(shade, shade, 255))
            d.text((box[0] + 22, box[1] + 8), f"{v:.2f}", fill="black" if v < 0.6 else "white", font=font)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
