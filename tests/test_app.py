"""The Gradio editing app: served on a free loopback port, driven through gradio_client and a headless Chromium."""

import hashlib
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from conftest import TINY_PIXELS

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from edittuner.app import (NO_LORA, EditSession, build_app, build_parser, check_upload,  # noqa: E402
                           discover_loras, mask_from_layers, parse_auth)
from edittuner.errors import EditTunerError  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def served(trained_run, resize, tmp_path_factory):
    """The app on the tiny model with a train dir holding the trained LoRA and one from another model."""
    from edittuner.sampling import Editor
    out, _, _ = trained_run
    train_dir = tmp_path_factory.mktemp("train")
    (train_dir / "run1").mkdir()
    shutil.copy(out / "lora.safetensors", train_dir / "run1" / "lora.safetensors")
    (train_dir / "other").mkdir()
    save_file({"blocks.0.q.lora_A.weight": torch.zeros(4, 8), "blocks.0.q.lora_B.weight": torch.zeros(8, 4)},
              str(train_dir / "other" / "lora_foreign.safetensors"))
    editor = Editor(resize=resize)
    session = EditSession(editor, train_dir, output_dir=tmp_path_factory.mktemp("app-out"))
    base_digest = weights_digest(editor.dit)
    demo = build_app(session)
    demo.queue()
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                max_file_size=session.limits.max_bytes)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                      download_files=str(tmp_path_factory.mktemp("client")))
        yield {"session": session, "client": client, "url": f"http://127.0.0.1:{port}/", "base_digest": base_digest,
               "editor": editor}
    finally:
        demo.close()


@pytest.fixture(scope="module")
def source_path(demo_dir):
    return sorted((demo_dir / "raw" / "source").glob("*.png"))[0]


def stroke_layer(size, path: Path) -> Path:
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((10, 20, 60, 50), fill=(255, 59, 141, 153), width=14)
    layer.save(path)
    return path


def edit(client, source, layers=(), lora=NO_LORA, strength=1.0, prompt="Make it night", sampler="flow", steps=2,
         reference_2=None):
    from gradio_client import handle_file
    value = {"background": handle_file(str(source)) if source else None,
             "layers": [handle_file(str(p)) for p in layers], "composite": None}
    return client.predict(source=value, reference_2=handle_file(str(reference_2)) if reference_2 else None,
                          reference_3=None, prompt=prompt, lora=lora, strength=strength, sampler=sampler, steps=steps,
                          guidance=4.0, seed=0, negative_prompt=" ", stream="main", api_name="/edit")


def test_lora_discovery_and_helpers(served, tmp_path):
    assert served["session"].lora_choices() == [NO_LORA, "other/lora_foreign.safetensors", "run1/lora.safetensors"]
    assert discover_loras(tmp_path / "missing") == []
    assert parse_auth("me:secret") == ("me", "secret")
    with pytest.raises(EditTunerError, match="user:pass"):
        parse_auth("nopassword")
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model_dir, args.train_dir) == ("127.0.0.1", 7999, "tiny", "train")
    assert mask_from_layers([Image.new("RGBA", (8, 8))], (8, 8)) is None  # no strokes: edit the whole image
    with pytest.raises(EditTunerError, match="megapixels"):
        check_upload(_big_image(tmp_path), "source image")


def _big_image(folder: Path) -> Path:
    path = folder / "big.png"
    Image.new("1", (8000, 6000)).save(path)  # 48 megapixels, a small file
    return path


def test_edit_with_mask_and_lora_through_client(served, source_path, tmp_path):
    source = Image.open(source_path).convert("RGB")
    layer = stroke_layer(source.size, tmp_path / "layer.png")
    image_path, file_path, status = edit(served["client"], source_path, layers=[layer],
                                         lora="run1/lora.safetensors", strength=0.8)
    result = np.asarray(Image.open(image_path).convert("RGB"))
    downloaded = np.asarray(Image.open(file_path).convert("RGB"))
    assert Path(file_path).suffix == ".png" and np.array_equal(result, downloaded)
    assert result.shape == (96, 96, 3) and source.size[0] * source.size[1] <= TINY_PIXELS
    mask = np.asarray(Image.open(layer).getchannel("A")) > 0
    original = np.asarray(source)
    assert np.abs(result.astype(int) - original)[mask].mean() > 1  # the painted region changed
    assert np.array_equal(result[~mask], original[~mask])             # the rest is the source's own pixels
    assert "masked" in status and "round trip" in status and "LoRA run1/lora.safetensors at 0.8" in status


def test_switching_lora_never_reloads_and_none_restores_the_base(served, source_path):
    session, client = served["session"], served["client"]
    editor = session.editor
    base = np.asarray(Image.open(edit(client, source_path)[0]))
    loads = session.lora_loads
    with_lora = np.asarray(Image.open(edit(client, source_path, lora="run1/lora.safetensors")[0]))
    assert not np.array_equal(base, with_lora)
    edit(client, source_path, lora="run1/lora.safetensors")  # unchanged choice: set_lora is not called again
    assert session.lora_loads == loads + 1
    half = np.asarray(Image.open(edit(client, source_path, lora="run1/lora.safetensors", strength=0.5)[0]))
    assert session.lora_loads == loads + 2 and not np.array_equal(half, with_lora)
    again = np.asarray(Image.open(edit(client, source_path)[0]))
    assert np.array_equal(base, again)  # removing the LoRA restores the base exactly
    assert session.editor is editor is served["editor"]
    assert weights_digest(editor.dit) == served["base_digest"]  # the base weights were never written


def test_clear_errors_reach_the_client(served, source_path, tmp_path):
    from gradio_client.exceptions import AppError
    client = served["client"]
    with pytest.raises(AppError, match="no source image"):
        edit(client, None)
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"this is not a PNG")
    with pytest.raises(AppError, match="source image: unreadable file"):
        edit(client, unreadable)
    with pytest.raises(AppError, match="reference 2: unreadable file"):
        edit(client, source_path, reference_2=unreadable)
    with pytest.raises(AppError, match="over the limit of 40 megapixels"):
        edit(client, _big_image(tmp_path))
    with pytest.raises(AppError, match="instruction is empty"):
        edit(client, source_path, prompt="  ")
    with pytest.raises(AppError, match="other/lora_foreign.safetensors: .*another model"):
        edit(client, source_path, lora="other/lora_foreign.safetensors")
    # after a refused LoRA the app runs on the base model again
    assert served["session"].lora_key is None
    assert weights_digest(served["editor"].dit) == served["base_digest"]


def test_model_error_exits_2(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "app_gradio.py"), "--model_dir", str(tmp_path / "nope"),
                           "--port", str(free_port())], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "error: --model_dir" in done.stderr and "Traceback" not in done.stderr


# ---- a real browser ----------------------------------------------------------------------------------------------

def _browser():
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                    "`make install` installs them as root with apt-get")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service
    import tempfile
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1400",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='edittuner-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_edit_in_a_real_browser(served, source_path, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(served["url"])
        editor = wait.until(ec.presence_of_element_located((By.ID, "source")))
        editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(source_path))
        wait.until(lambda d: editor.find_elements(By.CSS_SELECTOR, "button[aria-label=Brush]"))
        time.sleep(1)  # the canvas draws the uploaded background
        editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
        canvas = editor.find_elements(By.TAG_NAME, "canvas")[-1]
        ActionChains(driver).move_to_element_with_offset(canvas, -30, -20).click_and_hold() \
            .move_by_offset(20, 10).move_by_offset(20, 10).move_by_offset(20, 10).release().perform()
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.send_keys("Make it night")
        steps = driver.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("2", Keys.TAB)
        clicked = time.perf_counter()
        driver.find_element(By.ID, "run").click()
        status = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value") or None)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img"))
        seconds = time.perf_counter() - clicked
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(tmp_path / "app.png"))
        print(f"browser click-to-result: {seconds:.2f} s; status: {status}")
        assert status.startswith("done in") and "flow 2 steps" in status, status
        assert "masked" in status, status  # the brush stroke reached the server as the mask
        assert (tmp_path / "app.png").stat().st_size > 10_000
    finally:
        driver.quit()
