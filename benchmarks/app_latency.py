"""The editing app's click-to-result time: `python -m benchmarks.app_latency [--quick]`.

One edit request through gradio_client (upload of the source and the brush layer, queue, preprocessing, the edit,
PNG encoding, download of the result and the PNG file) against ``Editor.edit`` called directly with the same
inputs in the same process, so the ratio is the app's overhead. Both on the built-in tiny model, the app on a free
loopback port. Writes benchmarks/results/app_latency.json and the app section of BENCHMARKS.md (not with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import machine  # noqa: E402
from edittuner.app import EditSession, build_app, mask_from_layers  # noqa: E402
from edittuner.images import ResizeConfig  # noqa: E402
from edittuner.sampling import Editor, SamplerConfig  # noqa: E402

SIZE = 256
STEPS = 8
START, END = "<!-- app:start -->", "<!-- app:end -->"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(work: Path) -> tuple[Path, Path]:
    from edittuner.demo import make_demo_dataset
    make_demo_dataset(work / "demo", size=SIZE)
    source = sorted((work / "demo/raw/source").glob("*.png"))[0]
    size = Image.open(source).size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).ellipse((size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4),
                                  fill=(255, 59, 141, 153))
    layer.save(work / "layer.png")
    return source, work / "layer.png"


def _interleaved(fns, repeats: int, warmup: int = 1) -> list[list[float]]:
    """Times of each function, run in turn (a, b, a, b, ...) so that drift in machine load hits both alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def bench_app(repeats: int) -> dict:
    from gradio_client import Client, handle_file

    work = Path(tempfile.mkdtemp(prefix="edittuner-bench-app-"))
    source, layer = _inputs(work)
    editor = Editor(resize=ResizeConfig(max_pixels=SIZE * SIZE))
    sampler = SamplerConfig(sampler="flow", steps=STEPS, guidance=4.0, seed=0)
    image = Image.open(source).convert("RGB")
    mask = mask_from_layers([Image.open(layer)], image.size)

    session = EditSession(editor, work / "train", output_dir=work / "out")
    demo = build_app(session)
    demo.queue()
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(work / "client"))

        def click():
            client.predict(source={"background": handle_file(str(source)), "layers": [handle_file(str(layer))],
                                   "composite": None},
                           reference_2=None, reference_3=None, prompt="Make it night", lora="none", strength=1.0,
                           sampler="flow", steps=STEPS, guidance=4.0, seed=0, negative_prompt=" ", stream="main",
                           api_name="/edit")

        app_times, direct_times = _interleaved(
            [click, lambda: editor.edit([image], "Make it night", sampler, mask)], repeats)
    finally:
        demo.close()
    app, direct = statistics.median(app_times), statistics.median(direct_times)
    return {"size": f"{image.width}x{image.height}", "steps": STEPS, "repeats": repeats, "app_click_to_result_s": app,
            "app_times_s": app_times, "editor_edit_s": direct, "editor_times_s": direct_times,
            "overhead_ratio": app / direct,
            "overhead_ms": (app - direct) * 1000}


def render(r: dict) -> str:
    return "\n".join([
        "Command: `python -m benchmarks.app_latency`  ",
        f"Machine: {r['machine']}  ",
        f"Date: {r['date']}  ",
        f"Model: the built-in tiny model; source {r['size']} with a brush mask, flow sampler, {r['steps']} steps, "
        f"guidance 4 (CFG), no LoRA; median of {r['repeats']} "
        f"after one warm-up, the two timed in turn.",
        "",
        "| figure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| app click to result (gradio_client: upload, queue, edit, PNG, download) | "
        f"{r['app_click_to_result_s'] * 1000:.0f} ms | `Editor.edit` called directly, same inputs: "
        f"{r['editor_edit_s'] * 1000:.0f} ms | {r['overhead_ratio']:.2f} |",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.app_latency")
    parser.add_argument("--quick", action="store_true", help="3 repeats, BENCHMARKS.md untouched")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    results = bench_app(3 if args.quick else 7)
    results.update(machine=machine(), date=datetime.date.today().isoformat())
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "app_latency.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    print(text)
    if not args.quick:
        path = ROOT / "BENCHMARKS.md"
        content = path.read_text()
        if START in content:
            before, _, rest = content.partition(START)
            content = before + START + "\n" + text + "\n" + END + rest.partition(END)[2]
        else:
            content = content.rstrip("\n") + "\n\n## The editing app (CPU, tiny model)\n\n" + START + "\n" + text + "\n" + END + "\n"
        path.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
