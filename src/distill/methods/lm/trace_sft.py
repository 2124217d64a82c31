"""`trace_sft`: cross-entropy on the factory's teacher reasoning traces (verified, unfiltered, or the
shortest verified per prompt; whole or chunk by chunk). The loss is `sft`'s; only the data view the
family builds from the config differs, so one name in the results tells the runs apart."""

from __future__ import annotations

from distill.methods.base import METHODS
from distill.methods.lm.cross_entropy import _CrossEntropy


@METHODS.register("trace_sft")
class TraceSFTMethod(_CrossEntropy):
    name = "trace_sft"
