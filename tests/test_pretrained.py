"""load_pretrained: a real HTTP server on 127.0.0.1, the cache, file://, converted dir, workdir."""
import functools
import http.server
import io
import json
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sparseformer_jax import load_pretrained
from sparseformer_jax.trainer import checkpointing
from sparseformer_jax.weights import pretrained

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PTH = "sf_v1_tiny_library_format.pth"
TINY = dict(conv_dim=32, num_tokens=16, focusing_width=64, cortex_width=128, cortex_depth=3,
            num_classes=10, drop_path_rate=0.0)


@functools.lru_cache(maxsize=None)
def reference():
  with np.load(FIXTURES / "sf_v1_tiny_reference_square.npz") as z:
    return np.transpose(z["image_nchw"], (0, 2, 3, 1)), z["logits_library_format"]


# One compilation for every model of the same config (flax modules hash by their fields).
_forward = jax.jit(lambda model, variables, images: model.apply(variables, images, train=False),
                   static_argnums=0)


def assert_reference_logits(model, variables):
  images, logits = reference()
  np.testing.assert_allclose(_forward(model, variables, images), logits, atol=1e-4, rtol=0)


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves tests/fixtures/*.pth; /cut/<name> sends half the bytes it announces, then closes;
  /slow/<name> waits 3 s first."""
  requests = []

  def do_GET(self):  # pylint: disable=invalid-name
    self.requests.append(self.path)
    if self.path.startswith("/slow/"):
      time.sleep(3)
    name = self.path.rsplit("/", 1)[-1]
    if not (FIXTURES / name).is_file():
      self.send_error(404, "Not Found")
      return
    data = (FIXTURES / name).read_bytes()
    self.send_response(200)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data[:len(data) // 2] if self.path.startswith("/cut/") else data)

  def log_message(self, *args):
    del args


@pytest.fixture
def server():
  _Handler.requests = []
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_port}", _Handler.requests
  httpd.shutdown()
  httpd.server_close()


def test_http_download_is_cached_and_the_second_call_makes_no_request(server, tmp_path):
  url, requests = server
  for _ in range(2):
    model, variables = load_pretrained("sparseformer_v1_tiny", f"{url}/{PTH}",
                                       cache_dir=str(tmp_path), **TINY)
    assert_reference_logits(model, variables)
  assert requests == [f"/{PTH}"]
  cached = pretrained._cache_name(f"{url}/{PTH}")  # pylint: disable=protected-access
  assert [p.name for p in tmp_path.iterdir()] == [cached]


def test_the_cache_dir_comes_from_the_environment(server, tmp_path, monkeypatch):
  url, _ = server
  monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
  path = pretrained.download(f"{url}/{PTH}")
  assert Path(path).parent == tmp_path / "cache"
  assert Path(path).read_bytes() == (FIXTURES / PTH).read_bytes()


def test_a_download_cut_off_midway_raises_and_leaves_nothing_in_the_cache(server, tmp_path):
  url, _ = server
  with pytest.raises(pretrained.DownloadError, match="closed after") as error:
    load_pretrained("sparseformer_v1_tiny", f"{url}/cut/{PTH}", cache_dir=str(tmp_path), **TINY)
  assert "by hand" in str(error.value)
  assert list(tmp_path.iterdir()) == []


def test_http_404_names_the_url_the_status_and_the_manual_way(server, tmp_path):
  url, _ = server
  with pytest.raises(pretrained.DownloadError) as error:
    load_pretrained("sparseformer_v1_tiny", f"{url}/missing.pth", cache_dir=str(tmp_path))
  message = str(error.value)
  assert f"{url}/missing.pth" in message and "HTTP 404" in message and "curl" in message
  assert list(tmp_path.iterdir()) == []


def test_a_server_that_does_not_answer_times_out_with_the_url(server, tmp_path, monkeypatch):
  url, _ = server
  monkeypatch.setattr(pretrained, "DOWNLOAD_TIMEOUT_S", 0.5)
  with pytest.raises(pretrained.DownloadError, match="download failed .*timed out") as error:
    pretrained.download(f"{url}/slow/{PTH}", str(tmp_path))
  assert f"{url}/slow/{PTH}" in str(error.value) and list(tmp_path.iterdir()) == []


def test_progress_line_shows_bytes_rate_and_eta(monkeypatch):
  out = io.StringIO()
  monkeypatch.setattr("sys.stderr", out)
  show = pretrained._progress_printer("w.pth", 8_000_000)  # pylint: disable=protected-access
  show(2_000_000, final=False)
  show(8_000_000, final=True)
  first, last = out.getvalue().split("\r")[1:]
  assert first.startswith("w.pth: 2.0/8.0 MB, ") and " MB/s, ETA " in first
  assert last.startswith("w.pth: 8.0/8.0 MB, ") and last.endswith(" MB/s\n")


def test_file_url_and_local_path(tmp_path):
  model, variables = load_pretrained("sparseformer_v1_tiny", (FIXTURES / PTH).as_uri(),
                                     cache_dir=str(tmp_path), **TINY)
  assert model.config.flavor == "library" and not model.config.grad_clamp
  assert_reference_logits(model, variables)
  assert_same_params(load_pretrained("sparseformer_v1_tiny", str(FIXTURES / PTH), **TINY)[1],
                     variables)
  assert list(tmp_path.iterdir()) == []  # local files are read in place


def test_official_urls_and_unknown_names():
  assert len(pretrained.PRETRAINED_URLS) == 7
  assert pretrained.PRETRAINED_URLS["sparseformer_v1_tiny"] == (
      "https://github.com/showlab/sparseformer/releases/download/v2.0.0-refactor/"
      "sparseformer_v1_tiny_converted.pth")
  with pytest.raises(ValueError, match="Known models: .*sparseformer_v1_base"):
    load_pretrained("sparseformer_v1_huge")


def test_a_converted_directory_remembers_its_model(tmp_path):
  model, variables = load_pretrained("sparseformer_v1_tiny", FIXTURES / PTH, **TINY)
  checkpoints = checkpointing.Checkpoints(str(tmp_path / "converted"), keep=1)
  checkpoints.save(0, {"params": variables["params"]}, wait=True)
  checkpoints.close()
  pretrained.write_model_file(str(tmp_path / "converted"), "sparseformer_v1_tiny",
                              {**TINY, "flavor": "library", "grad_clamp": False})
  loaded, loaded_variables = load_pretrained(source=tmp_path / "converted")
  assert loaded.config == model.config
  assert_same_params(loaded_variables, variables)
  with pytest.raises(ValueError, match="holds 'sparseformer_v1_tiny' weights"):
    load_pretrained("sparseformer_v1_small", tmp_path / "converted")


def fake_workdir(path: Path):
  """A main.py-shaped workdir: config.json and a step whose EMA params differ from the params
  (the fixture's)."""
  overrides = dict(TINY, num_classes=None)
  config = {"model": {"name": "sparseformer_v1_tiny", "overrides": overrides},
            "dataset": "synthetic_objects", "input": {"image_size": 64, "crop_pct": 0.875,
                                                      "mean": [0.5] * 3, "std": [0.25] * 3}}
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  params = load_pretrained("sparseformer_v1_tiny", FIXTURES / PTH, **TINY)[1]["params"]
  checkpoints = checkpointing.Checkpoints(str(path / "checkpoints"), keep=1)
  checkpoints.save(3, {"params": params, "ema_params": jax.tree.map(lambda x: x * 0.5, params),
                       "step": np.asarray(3)}, wait=True)
  checkpoints.close()
  return params


def test_a_training_workdir_gives_its_params_or_its_ema(tmp_path):
  params = fake_workdir(tmp_path / "run")
  model, variables = load_pretrained(source=str(tmp_path / "run"))
  _, ema = load_pretrained("sparseformer_v1_tiny", str(tmp_path / "run"), ema=True)
  assert model.config.num_classes == 10 and model.config.cortex_depth == 3
  kernel = params["head"]["kernel"]
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], kernel)
  np.testing.assert_array_equal(ema["params"]["head"]["kernel"], kernel * 0.5)
  with pytest.raises(ValueError, match="trained 'sparseformer_v1_tiny', not 'sparseformer_v1_b"):
    load_pretrained("sparseformer_v1_base", str(tmp_path / "run"))
  with pytest.raises(ValueError, match="does not fit"):
    load_pretrained(source=str(tmp_path / "run"), num_classes=5)
