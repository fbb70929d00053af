"""Shapes-VQA: a synthetic visual question-answering task, and the small LLaVA trained on it.

No LVLM weights and no benchmark data can be downloaded here, so libra-fx makes its own: pictures
of coloured shapes on a grid, questions whose answers need the picture, single-token answers. The
model is an unmodified ``LlavaForConditionalGeneration`` (a small CLIP tower and a Llama decoder);
the trained checkpoint ships with the package (:func:`load_shapes_lvlm`)::

    model = load_shapes_lvlm()
    data = heldout(512)                       # fixed by seed, disjoint from training
    print(accuracy(model, data))              # uncompressed held-out accuracy

The task (``difficulty`` 1–3):

* a ``96×96`` picture, a ``4×4`` grid of cells (24 px, i.e. 3×3 patches of 8 px each), on each
  occupied cell one shape (circle, square, triangle) in one colour (red, green, blue, yellow),
  jittered in size and position inside its cell; every (colour, shape) pair occurs at most once;
* questions (5 tokens each, so every prompt of a batch has the same length):

  - ``is there a red circle ?`` → yes / no;
  - ``how many red shapes ?``, ``how many circles ?``, ``how many shapes ?`` → 0–8;
  - relational (two hops: find the named object, then look at the adjacent cell):
    ``what colour is the shape left of the red circle ?`` → a colour, and
    ``what shape is the shape above the blue square ?`` → a shape, or ``nothing`` when that cell
    is empty (difficulty 3).

The prompt is ``<bos> <image>×144 q0 q1 q2 q3 q4``; the answer is the next token.

Modules: ``data`` (vocabulary, scenes, questions, pictures, batches, the held-out split),
``model`` (config, the shipped checkpoint, metrics, visual dependence, training) and ``processor``
(the tokenizer and image processor shipped beside the checkpoint, 8-bit pictures); every public name
is re-exported here.
"""

from libra_fx.shapes_task.data import (
    ANSWER_IDS,
    ANSWERS,
    BOS_TOKEN_ID,
    COLOURS,
    COUNTS,
    DEFAULT_LAYERS,
    DEFAULT_TWO_STAGE_LAYERS,
    DIFFICULTIES,
    DIRECTIONS,
    GRID,
    HELDOUT_SEED,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    NUM_VISUAL_TOKENS,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_LEN,
    QTYPES,
    QUESTION_LEN,
    QUESTION_WORDS,
    RGB,
    SHAPES,
    SPECIAL,
    TOKEN,
    VOCAB,
    VOCAB_SIZE,
    Difficulty,
    Obj,
    heldout,
    make_batch,
    model_inputs,
    neighbour,
    question_text,
    render,
    sample_question,
    sample_scene,
    scene_tensor,
)
from libra_fx.shapes_task.model import (
    LlavaForConditionalGeneration,
    accuracy,
    answer_logits,
    batches,
    checkpoint_path,
    drop_visual_after,
    load_shapes_lvlm,
    per_type_accuracy,
    shapes_lvlm_config,
    train,
    visual_dependence,
)
from libra_fx.shapes_task.processor import picture, shapes_processor

__all__ = [
    # data
    "ANSWER_IDS", "ANSWERS", "BOS_TOKEN_ID", "COLOURS", "COUNTS", "DEFAULT_LAYERS", "DEFAULT_TWO_STAGE_LAYERS",
    "DIFFICULTIES", "DIRECTIONS", "GRID", "HELDOUT_SEED", "IMAGE_SIZE", "IMAGE_TOKEN_ID", "NUM_VISUAL_TOKENS",
    "PAD_TOKEN_ID", "PATCH_SIZE", "PIXEL_MEAN", "PIXEL_STD", "PROMPT_LEN", "QTYPES", "QUESTION_LEN",
    "QUESTION_WORDS", "RGB", "SHAPES",
    "SPECIAL", "TOKEN", "VOCAB", "VOCAB_SIZE", "Difficulty", "Obj", "heldout", "make_batch", "model_inputs",
    "neighbour", "question_text", "render", "sample_question", "sample_scene", "scene_tensor",
    # model
    "LlavaForConditionalGeneration", "accuracy", "answer_logits", "batches", "checkpoint_path", "drop_visual_after",
    "load_shapes_lvlm", "per_type_accuracy", "shapes_lvlm_config", "train", "visual_dependence",
    # processor
    "picture", "shapes_processor",
]
