"""The training curves as a PNG: train loss (a line) and held-out loss (markers) against iterations, on a log-scale
loss axis, drawn with Pillow so that plotting needs no dependency. train.py redraws it at every evaluation.
"""
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw


def nice_ticks(low: float, high: float, log: bool) -> list[float]:
    """Round axis values between low and high: 1-2-5 steps (log: 1, 2, 5 x 10^k, or every digit when the range
    is less than a decade)."""
    if log:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
            ticks = [m * 10.0 ** d for d in decades for m in mantissas if low <= m * 10.0 ** d <= high]
            if len(ticks) >= 3:
                return ticks
        return ticks or [low, high]
    raw = (high - low) / 5 or 1.0
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(low / step), math.floor(high / step) + 1)]


def plot_curves(log_path: Path, png_path: Path, size=(720, 440)) -> None:
    """Training loss (line) and held-out loss (markers) against iterations on a log-scale loss axis, drawn with
    Pillow (no plotting dependency). Log scale because the loss falls by orders of magnitude early on."""
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_pts = [(r["iter"], r["loss"]) for r in rows if "loss" in r and r["loss"] > 0]
    val_pts = [(r["iter"], r["val_loss"]) for r in rows if "val_loss" in r and r["val_loss"] > 0]
    points = train_pts + val_pts
    if len(points) < 2:
        return
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    (x0, y0), (x1, y1) = (70, 20), (size[0] - 20, size[1] - 60)
    xmax = max(1, max(p[0] for p in points))
    low, high = min(p[1] for p in points), max(p[1] for p in points)
    low, high = (low / 1.5, high * 1.5) if high / low < 1.5 else (low / 1.1, high * 1.1)
    def xy(p):
        y = (math.log(p[1]) - math.log(low)) / (math.log(high) - math.log(low))
        return x0 + (x1 - x0) * p[0] / xmax, y1 - (y1 - y0) * y
    for v in nice_ticks(low, high, log=True):  # horizontal grid lines with their loss values
        y = xy((0, v))[1]
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 8, y), f"{v:g}", fill="black", anchor="rm")
    for v in nice_ticks(0, xmax, log=False):
        x = xy((v, low))[0]
        draw.line((x, y0, x, y1), fill=(235, 235, 235))
        draw.text((x, y1 + 6), f"{v:g}", fill="black", anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    if len(train_pts) > 1:
        draw.line([xy(p) for p in train_pts], fill="steelblue", width=2)
    for p in val_pts:
        x, y = xy(p)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill="darkorange", outline="black")
    draw.text(((x0 + x1) / 2, y1 + 24), "iterations", fill="black", anchor="mt")
    draw.text((8, y0 - 14), "loss (log scale)", fill="black")
    legend = [("train loss", "steelblue", train_pts), ("held-out loss", "darkorange", val_pts)]
    for k, (name, colour, pts) in enumerate(legend):
        draw.text((x0 + 10 + 230 * k, y1 + 40), f"{name} (last {pts[-1][1]:.4g})" if pts else name, fill=colour)
    img.save(png_path)
