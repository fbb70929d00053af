"""The shapes-VQA task for lmms-eval: held-out questions of :mod:`libra_fx.shapes_task`, offline.

``libra-fx lmms-task --out DIR --n 16`` writes ``DIR/shapes_vqa.parquet`` (the first ``n`` questions of
``shapes_task.heldout(n)``, each with its picture as an 8-bit PNG) and ``DIR/shapes_vqa.yaml``
(``dataset_path: parquet``, the data file beside it); then, with the shipped model and its processor::

    lmms-eval --model libra_llava_hf --include_path DIR --tasks shapes_vqa --device cpu \\
        --model_args pretrained=$(python -c "import libra_fx.shapes_task as st; print(st.checkpoint_path())"),ratio=0.5,layers=4

The prompt is the question's five words after the picture; the answer is one token
(``max_new_tokens: 1``); ``accuracy`` is the share of exact answers, as ``benchmarks/fidelity.py``
counts them (the argmax of the answer logits).
"""

from __future__ import annotations

import os

from libra_fx import shapes_task as st
from libra_fx.shapes_task.processor import picture

TASK = "shapes_vqa"
YAML = f"""\
task: {TASK}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {TASK}.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function libra_fx.lmms_eval.shapes_task.doc_to_visual
doc_to_text: !function libra_fx.lmms_eval.shapes_task.doc_to_text
doc_to_target: answer
process_results: !function libra_fx.lmms_eval.shapes_task.process_results
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
  num_beams: 1
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0
  questions: {{n}}
  heldout_seed: {{seed}}
"""


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"accuracy": float(results[0].strip() == doc["answer"])}


def rows(n: int, seed: int = st.HELDOUT_SEED) -> dict[str, list]:
    """The task's columns: ``question_id``, ``image`` (PIL), ``question`` (the five words the model reads),
    ``answer``, ``qtype`` and ``question_text`` (plain English)."""
    data = st.heldout(n, seed=seed)
    words = [[st.VOCAB[t] for t in ids[-st.QUESTION_LEN:].tolist()] for ids in data["input_ids"]]
    return {"question_id": list(range(n)), "image": [picture(p) for p in data["pixel_values"]],
            "question": [" ".join(w) for w in words], "answer": [st.VOCAB[a] for a in data["answer"].tolist()],
            "qtype": [st.QTYPES[q] for q in data["qtype"].tolist()], "question_text": [st.question_text(w) for w in words]}


def write_task(out: str, n: int = 16, seed: int = st.HELDOUT_SEED) -> str:
    """Write the task's parquet and YAML to ``out``; returns the YAML's path."""
    try:
        from datasets import Dataset, Features, Image, Value
    except ImportError as e:
        raise SystemExit(f"libra-fx lmms-task needs the [eval] extra (pip install 'libra-fx[eval]'): {e}") from e

    features = Features({"question_id": Value("int32"), "image": Image(), "question": Value("string"),
                         "answer": Value("string"), "qtype": Value("string"), "question_text": Value("string")})
    os.makedirs(out, exist_ok=True)
    Dataset.from_dict(rows(n, seed), features=features).to_parquet(os.path.join(out, f"{TASK}.parquet"))
    path = os.path.join(out, f"{TASK}.yaml")
    with open(path, "w") as f:
        f.write(YAML.format(n=n, seed=seed))
    return path
