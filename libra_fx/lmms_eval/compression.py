"""The mixin that makes an lmms-eval model class compress.

Each ``libra_*`` class subclasses lmms-eval's (loading, prompting and the generation loop are theirs) and adds
:class:`LibraCompression`: libra-fx's settings are taken out of ``--model_args``
(:mod:`libra_fx.lmms_eval.settings`), the loaded model is compiled, and after each batch of
requests the settings and the visual tokens the decoder layers saw (:mod:`~.visual_tokens`, summed
over the processes of a data-parallel run) go to lmms-eval's metric log, which the results JSON
writes under ``throughput`` (``avg_libra_ratio``, ``avg_libra_visual_tokens_layer_8``, …).
"""

from __future__ import annotations

from collections import Counter

import torch.distributed as dist
from loguru import logger as eval_logger
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from libra_fx.runtime.compiled_model import num_decoder_layers
from libra_fx.lmms_eval.settings import EvalSettings
from libra_fx.lmms_eval.visual_tokens import VisualTokenCounter


class LibraCompression:
    """Put before an lmms-eval model class: compiles its model with the settings of ``--model_args``."""

    def __init__(self, **kwargs):
        self.libra = EvalSettings.pop_from(kwargs)
        super().__init__(**kwargs)
        model = self.libra.apply(self.model)
        self.libra_counter = VisualTokenCounter(model, self.libra.counted_layers(num_decoder_layers(model)))
        eval_logger.info(f"libra_fx: {type(model).__name__}, {self.libra.describe()}, compiler={self.libra.compiler}")

    def generate_until(self, requests):
        responses = super().generate_until(requests)
        self.libra_report()
        return responses

    def loglikelihood(self, requests):
        if self.libra.config.active:
            raise ValueError("libra_fx: loglikelihood requests score the continuation at its token positions, which "
                             "compression shifts; evaluate generate_until tasks, or ratio=0 for the uncompressed model")
        return super().loglikelihood(requests)

    def libra_report(self) -> None:
        """Log the settings and the visual-token means of every process (a collective when data-parallel)."""
        sums = [self.libra_counter.sums]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            sums = [None] * self.world_size
            dist.all_gather_object(sums, self.libra_counter.sums)
        self.libra_counter.sums = sum(sums, Counter())
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0,
                    additional_metrics={**self.libra.metrics(), **self.libra_counter.means()})
        self.libra_counter.reset()
