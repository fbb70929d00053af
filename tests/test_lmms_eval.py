"""lmms-eval (the ``[eval]`` extra) runs the shipped shapes LLaVA through ``libra_llava_hf`` and gets
``benchmarks/fidelity.py``'s answers, in one process and data-parallel in two.

The extra is installed the way the README says, ``pip install -e ".[eval]"``, into a virtual environment
of its own that reuses this one's torch and transformers (``--system-site-packages``, both pinned);
lmms-eval's torchvision and timm are uninstalled after (the PyPI torchvision is built for a CUDA torch
and breaks ``import transformers`` on a CPU one). The environment is kept, per version of the extra,
under ``~/.cache/libra-fx`` (``$XDG_CACHE_HOME``): the first run installs it, later runs only point its
editable install at this checkout.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import site
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import libra_fx
from libra_fx import shapes_task as st
from libra_fx.lmms_eval.settings import EvalSettings, parse_layers
from libra_fx.lmms_eval.shapes_task import rows
from libra_fx.lmms_eval.visual_tokens import VisualTokenCounter
from libra_fx.shapes_task.processor import picture, shapes_processor

REPO = Path(__file__).resolve().parents[1]
N = 32  # questions; libra at R=0.5 after layers 2 and 5 misses 2 of them, the uncompressed model none
LAYERS = (2, 5)


# ------------------------------------------------------------------------------ without lmms-eval
def test_settings_from_model_args():
    args = {"pretrained": "x", "ratio": 0.25, "layers": "7-15-23", "method": "turbo", "lam": 0.5, "compiler": "eager"}
    settings = EvalSettings.pop_from(args)
    assert args == {"pretrained": "x"}  # the rest goes to lmms-eval's class
    assert (settings.config.ratio, settings.config.layers, settings.compiler) == (0.25, (7, 15, 23), "eager")
    assert settings.config.spec == libra_fx.method("turbo", lam=0.5)
    assert settings.counted_layers(20) == (0, 8, 16) and settings.stages == 3
    assert parse_layers(4) == (4,) and parse_layers("none") == ()
    vision = EvalSettings.pop_from({"method": "prumerge", "order": "attention"})
    assert vision.stages == 1 and vision.counted_layers(8) == (0,)
    baseline = EvalSettings.pop_from({"ratio": 0})
    assert not baseline.config.active and baseline.metrics() == {"libra_ratio": 0.0, "libra_stages": 0.0}
    for bad, message in (({"layers": "7,15"}, "joined by '-'"), ({"layers": 1.5}, "joined by '-'"),
                         ({"tau": 0.5, "method": "fastv"}, "takes no options"), ({"ratio": 1}, r"\[0, 1\)"),
                         ({"compiler": "tvm"}, "compiler must be"), ({"strict": "yes"}, "strict must be")):
        with pytest.raises(ValueError, match=message):
            EvalSettings.pop_from(bad)


def test_shipped_processor_gives_the_task_inputs(tmp_path):
    """The processor beside the checkpoint is ``shapes_processor()``'s and turns a picture and its question
    into the task's 150 tokens (chat messages or llava_hf's plain "<image>\\n…" turn) and the picture's
    8-bit pixel values."""
    from transformers import AutoProcessor

    shapes_processor().save_pretrained(tmp_path)
    for name in os.listdir(tmp_path):
        made, shipped = (tmp_path / name).read_text(), (st.checkpoint_path() / name).read_text()
        assert (json.loads(made) == json.loads(shipped)) if name.endswith(".json") else made == shipped, name
    processor = AutoProcessor.from_pretrained(str(st.checkpoint_path()))
    data, task = st.heldout(8), rows(8)
    for i in range(8):
        image = picture(data["pixel_values"][i])
        eight_bit = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        for turn in ([{"type": "image"}, {"type": "text", "text": task["question"][i]}], "<image>\n" + task["question"][i]):
            text = processor.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                                  add_generation_prompt=True)
            inputs = processor(images=[image], text=text, return_tensors="pt")
            assert torch.equal(inputs["input_ids"][0], data["input_ids"][i]), text
        assert torch.equal(inputs["pixel_values"][0], (eight_bit / 255 - st.PIXEL_MEAN) / st.PIXEL_STD)
        assert (inputs["pixel_values"][0] - data["pixel_values"][i]).abs().max() < 0.1  # rounding and clamping
        assert task["answer"][i] == st.VOCAB[data["answer"][i]]


def test_visual_token_counter_reads_the_caches():
    model = st.load_shapes_lvlm()
    counter = VisualTokenCounter(model, (0, 3, 6))
    with torch.no_grad():
        model.generate(**st.model_inputs(st.heldout(2)), max_new_tokens=2, do_sample=False)
    assert counter.means() == {"libra_prefills": 1.0, "libra_visual_tokens_prompt": 144.0,
                               "libra_visual_tokens_layer_0": 144.0, "libra_visual_tokens_layer_3": 144.0,
                               "libra_visual_tokens_layer_6": 144.0}


# --------------------------------------------------------------------------------- with lmms-eval
def eval_requirements() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return next(line for line in text.splitlines() if line.startswith("eval = "))


def eval_python() -> Path:
    """The Python of the kept environment with the ``[eval]`` extra, installed on first use."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "libra-fx"
    key = hashlib.sha256("|".join((eval_requirements(), sys.version, torch.__version__,
                                   transformers.__version__)).encode()).hexdigest()[:12]
    venv, python = cache / f"eval-venv-{key}", cache / f"eval-venv-{key}" / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"eval-venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / "installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
            if sys.prefix != sys.base_prefix:  # run from a virtual environment: its packages too, after the new one's
                inner = glob.glob(str(venv / "lib" / "python*" / "site-packages"))[0]
                Path(inner, "outer-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
            pins = venv / "constraints.txt"  # this environment's torch (its CPU build: never a download) and transformers
            pins.write_text(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\n")
            pip(python, "install", "-c", str(pins), "-e", f"{REPO}[eval]")
            pip(python, "uninstall", "-y", "torchvision", "timm")
            (venv / "installed").write_text(eval_requirements())
        else:  # entry points and the editable install of this checkout
            pip(python, "install", "--no-deps", "-e", str(REPO))
    return python


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, timeout=1200)


def lmms_eval(python: Path, out: Path, task: Path, processes: int) -> dict[str, dict]:
    """One lmms-eval command over two configurations (uncompressed through the simple class, libra through
    the chat class); returns each one's results JSON with its per-question answers."""
    checkpoint = st.checkpoint_path()
    configs = {
        "uncompressed": dict(model_args=f"pretrained={checkpoint},ratio=0,layers=2-5", force_simple=True),
        "libra": dict(model_args=f"pretrained={checkpoint},ratio=0.5,layers=2-5,method=libra,compiler=eager"),
    }
    entries = [dict(model="libra_llava_hf", tasks="shapes_vqa", include_path=str(task), device="cpu", batch_size=1,
                    log_samples=True, output_path=str(out / name), **config) for name, config in configs.items()]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(entries))  # YAML is a superset of JSON
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    command = [str(python), *(launcher if processes > 1 else []), "-m", "lmms_eval", "--config", str(out / "config.json")]
    log = subprocess.run(command, env=subprocess_env(out), capture_output=True, text=True, timeout=900)
    results = {}
    for name in configs:  # lmms-eval exits 0 even when a run failed: its results say whether it ran
        found = glob.glob(str(out / name / "*" / "*_results.json"))
        assert found, f"lmms-eval wrote no results for {name} (exit {log.returncode}):\n{log.stdout[-3000:]}\n{log.stderr[-3000:]}"
        results[name] = json.loads(Path(found[0]).read_text())
        samples = [json.loads(line) for line in open(glob.glob(str(out / name / "*" / "*_samples_shapes_vqa.jsonl"))[0])]
        results[name]["answers"] = [s["filtered_resps"].strip() for s in sorted(samples, key=lambda s: s["doc_id"])]
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package, its entry points
    env.update(OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=str(out / "inductor"), HF_HOME=str(out / "hf"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return env


def harness_answers(pictures) -> dict[str, list[str]]:
    """benchmarks/fidelity.py on the task's questions and pictures: the uncompressed model's answers
    (``answer_logits``, the harness's baseline) and libra's (``fidelity.evaluate``)."""
    from transformers import AutoProcessor

    sys.path.insert(0, str(REPO / "benchmarks"))
    import fidelity

    model = st.load_shapes_lvlm()
    data = st.heldout(N)
    data["pixel_values"] = AutoProcessor.from_pretrained(str(st.checkpoint_path())).image_processor(
        pictures, return_tensors="pt")["pixel_values"]
    logits = {"uncompressed": st.answer_logits(model, data, N),
              "libra": fidelity.evaluate(model, data, libra_fx.method("libra"), 0.5, LAYERS, N, "eager")[0]}
    return {name: [st.VOCAB[t] for t in value.argmax(-1).tolist()] for name, value in logits.items()}


@pytest.mark.first
def test_lmms_eval_runs_the_shapes_task_like_the_fidelity_harness(tmp_path):
    python = eval_python()
    task = tmp_path / "task"
    subprocess.run([str(python), "-m", "libra_fx.cli", "lmms-task", "--out", str(task), "--n", str(N)],
                   env=subprocess_env(tmp_path), check=True, capture_output=True, timeout=300)
    question_rows = rows(N)
    expected = harness_answers(question_rows["image"])
    truth = question_rows["answer"]
    assert expected["uncompressed"] != expected["libra"]  # compression changes answers here

    counts = [st.NUM_VISUAL_TOKENS] + libra_fx.visual_token_counts(st.NUM_VISUAL_TOKENS, 0.5, len(LAYERS))
    for processes in (1, 2):
        runs = lmms_eval(python, tmp_path / f"run{processes}", task, processes)
        for name, run in runs.items():
            accuracy = sum(a == t for a, t in zip(expected[name], truth)) / N
            assert run["answers"] == expected[name], (name, processes)
            assert run["results"]["shapes_vqa"]["accuracy,none"] == accuracy, (name, processes)
            throughput = run["throughput"]
            compressed = name == "libra"
            assert throughput["avg_libra_prefills"] == N  # every process's prefills
            assert throughput["avg_libra_ratio"] == (0.5 if compressed else 0.0)
            assert throughput["avg_libra_stages"] == (len(LAYERS) if compressed else 0)
            seen = [throughput[f"avg_libra_visual_tokens_layer_{i}"] for i in (0, *(i + 1 for i in LAYERS))]
            assert seen == (counts if compressed else [st.NUM_VISUAL_TOKENS] * 3), (name, seen)
            assert "ratio=0.5,layers=2-5,method=libra" in run["config"]["model_args"] or not compressed
            assert run["config"]["model_backend"].endswith("(simple)" if name == "uncompressed" else "(chat)")
