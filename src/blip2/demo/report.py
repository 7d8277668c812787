"""The demo's report: a Markdown table of results and a PNG figure (drawn with PIL, no plotting library).

The figure shows sample held-out test images with the model's caption and answers, then the loss
curves of every training phase.
"""

from __future__ import annotations

import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

METRICS = (
    ("retrieval_i2t_r1", "image -> text R@1 (ITC + ITM re-rank)"),
    ("retrieval_t2i_r1", "text -> image R@1 (ITC + ITM re-rank)"),
    ("retrieval_i2t_r1_itc", "image -> text R@1 (ITC only)"),
    ("retrieval_t2i_r1_itc", "text -> image R@1 (ITC only)"),
    ("caption_cider", "captioning CIDEr-D"),
    ("caption_attribute_accuracy", "caption attribute accuracy"),
    ("caption_exact", "captions with every attribute right"),
    ("vqa_accuracy", "VQA accuracy (exact match)"),
    ("vqa_accuracy_colour", "- colour questions"),
    ("vqa_accuracy_shape", "- shape questions"),
    ("vqa_accuracy_size", "- size questions"),
    ("vqa_accuracy_position", "- position questions"),
    ("vqa_accuracy_yesno", "- yes/no questions"),
)

QUICK_NOTE = (
    "**--quick only checks that every phase runs**: it trains far too little to caption or answer "
    "(its captions and answers are at or near the chance column, and retrieval is far from the full "
    "run's). Only the full run (`blip2 demo`) shows the method working."
)

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    """The results table, the timings and the data set, as Markdown."""
    m, c, a = report["metrics"], report["chance"], report["ablation_no_stage1"]
    u = report.get("heldout_scenes_only", {})
    lm = report.get("lm_from_true_description", {})
    d = report["dataset"]
    lines = [
        "# blip2 demo" + (" (--quick)" if report.get("quick") else ""),
        "",
        f"World: one object per 64 x 64 image; {len(d['shapes'])} shapes x {len(d['colours'])} colours x "
        f"{len(d['sizes'])} sizes x {len(d['positions'])} positions = **{d['distinct_captions']} distinct "
        f"captions**, {d['paraphrases_per_scene']} paraphrases each. {d['train_images']} training images; "
        f"{d['test_images']} held-out test images, {d['test_images_of_heldout_scenes']} of them of the "
        f"{len(d['heldout_scenes'])} scenes never seen in training (every pair of their attribute values "
        "occurs in other training scenes).",
        "",
        "| metric | BLIP-2 | unseen scenes only | stage 2 without stage 1 | chance | LM alone, true description |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in METRICS:
        cells = (m.get(key), u.get(key), a.get(key), c.get(key), lm.get(key))
        lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in cells) + " |")
    if report.get("quick"):
        lines += ["", QUICK_NOTE]
    lines += [
        "",
        "The last column is the frozen language model alone, given each test image's true description "
        "where the soft prompt goes: the most zero-shot VQA can reach through it.",
    ]
    s, cpu = report["seconds"], report.get("cpu_seconds", {})
    lines += ["", "| phase | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {cpu.get(k, 0.0):.1f} |" for k, v in s.items()]
    lines += [
        "",
        f"Seed {report['seed']}; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}; {_threads(report)}.",
        "",
        "Samples (held-out images):",
        "",
    ]
    for smp in report.get("samples", []):
        qa = "; ".join(f"{q} -> {got} ({want})" for q, got, want in smp["qa"])
        lines.append(f'- `{smp["image"]}`: "{smp["caption"]}" (truth: "{smp["truth"]}"); {qa}')
    return "\n".join(lines) + "\n"


def _threads(report: dict) -> str:
    t = report.get("threads", {})
    n = t.get("torch_threads", report["versions"]["cpu_threads"])
    return (
        f"{n} CPU threads, OMP_WAIT_POLICY={t.get('omp_wait_policy') or 'unset'}, "
        f"GOMP_SPINCOUNT={t.get('gomp_spincount') or 'unset'}"
    )


def write_markdown(report: dict, path: str) -> str:
    text = markdown(report)
    with open(path, "w") as f:
        f.write(text)
    return text


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _samples(report: dict, data_dir: str, cell: int = 200) -> Image.Image:
    samples = report.get("samples", [])
    font = _font(11)
    height = 128 + 12 * 9
    panel = Image.new("RGB", (max(1, len(samples)) * cell, height + 10), "white")
    draw = ImageDraw.Draw(panel)
    for i, smp in enumerate(samples):
        x = i * cell
        image = Image.open(os.path.join(data_dir, smp["image"] + ".png")).convert("RGB").resize((128, 128))
        panel.paste(image, (x + (cell - 128) // 2, 4))
        lines = textwrap.wrap(smp["caption"], 30)[:2]
        for q, got, want in smp["qa"]:
            lines += textwrap.wrap(f"{q} {got}" + ("" if got == want else f" (truth {want})"), 32)[:2]
        y = 136
        for j, line in enumerate(lines[:8]):
            draw.text((x + 6, y + 12 * j), line, fill=(0, 0, 0) if j < 2 else (60, 60, 140), font=font)
    return panel


def _curve_panel(title: str, curves: dict[str, list], size: tuple[int, int] = (400, 240)) -> Image.Image:
    w, h = size
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    font = _font(11)
    draw.text((8, 4), title, fill="black", font=_font(13))
    left, top, right, bottom = 44, 24, w - 10, h - 22
    draw.rectangle((left, top, right, bottom), outline=(150, 150, 150))
    points = [p for c in curves.values() for p in c]
    if not points:
        return panel
    x_max = max(1, max(p[0] for p in points))
    y_min = min(p[1] for p in points)
    y_max = max(p[1] for p in points)
    y_span = max(y_max - y_min, 1e-6)
    draw.text((4, top - 2), f"{y_max:.2f}", fill="black", font=font)
    draw.text((4, bottom - 10), f"{y_min:.2f}", fill="black", font=font)
    draw.text((right - 40, bottom + 4), f"step {x_max}", fill="black", font=font)
    for n, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[n % len(COLOURS)]
        xy = [
            (left + (right - left) * s / x_max, bottom - (bottom - top) * (v - y_min) / y_span)
            for s, v in curve
        ]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        draw.text((right - 110, top + 4 + 13 * n), name, fill=colour, font=font)
    return panel


def write_figure(report: dict, data_dir: str, path: str) -> None:
    """Samples on top, loss curves below; saved as PNG."""
    samples = _samples(report, data_dir)
    losses = report.get("losses", {})
    panels = [_curve_panel(name.replace("_", " "), curves) for name, curves in losses.items()]
    per_row = max(1, samples.width // 400)
    rows = [panels[i : i + per_row] for i in range(0, len(panels), per_row)]
    width = max(samples.width, per_row * 400)
    top = 24 if report.get("quick") else 0
    fig = Image.new("RGB", (width, top + samples.height + 240 * len(rows)), "white")
    if top:
        banner = (
            "blip2 demo --quick: too little training to caption or answer; run `blip2 demo` for the result"
        )
        ImageDraw.Draw(fig).text((8, 5), banner, fill=(200, 0, 0), font=_font(13))
    fig.paste(samples, (0, top))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            fig.paste(panel, (c * 400, top + samples.height + r * 240))
    fig.save(path)
