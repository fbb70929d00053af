"""libra-fx in lmms-eval: models that compress, and the shapes-VQA task (``pip install 'libra-fx[eval]'``).

The models register through the entry-point group ``lmms_eval.models`` (:mod:`.registry`), so
lmms-eval finds them without any import::

    lmms-eval --model libra_llava_hf --model_args pretrained=llava-hf/llava-1.5-7b-hf,ratio=0.5,layers=7-15-23 --tasks gqa
    torchrun --nproc_per_node 8 -m lmms_eval --model libra_qwen2_5_vl --model_args pretrained=...,ratio=0.5 ...

======================  ======================================  ======================================
``--model``             lmms-eval class                         models
======================  ======================================  ======================================
``libra_llava_hf``      ``llava_hf`` (simple and chat)          LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision
                                                                (``llava-hf/…`` checkpoints)
``libra_qwen2_vl``      ``qwen2_vl`` (simple)                   Qwen2-VL
``libra_qwen2_5_vl``    ``qwen2_5_vl`` (simple and chat)        Qwen2.5-VL
======================  ======================================  ======================================

lmms-eval's ``llava_onevision`` loads the original LLaVA-NeXT code base (package ``llava``), whose
model classes libra-fx does not know: LLaVA-OneVision goes through ``libra_llava_hf``.

Settings: :mod:`.settings`; what the results JSON records: :mod:`.compression`; the task:
:mod:`.shapes_task` (``libra-fx lmms-task``).
"""
